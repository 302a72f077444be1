"""Logits processors and token sampling (temperature, top-k, top-p), batched and jit-friendly.

Sources: Fan et al. 2018 (top-k sampling); Holtzman et al. 2020 (nucleus / top-p sampling, Sec. 3.1).
Behaviour matches Hugging Face ``TemperatureLogitsWarper`` / ``TopKLogitsWarper`` / ``TopPLogitsWarper``:
top-k keeps the ``k`` largest logits (ties at the boundary kept), top-p keeps the smallest set of most
likely tokens whose probability reaches ``p`` (the most likely token always kept).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def apply_temperature(logits: Array, temperature: float | Array) -> Array:
    """``logits / temperature``; ``logits [..., vocab]`` float, temperature > 0."""
    return logits.astype(jnp.float32) / temperature


def top_k_filter(logits: Array, k: int) -> Array:
    """Set every logit below the ``k``-th largest (per row) to ``-inf``; ``k <= 0`` or ``k >= vocab`` keeps all."""
    vocab = logits.shape[-1]
    if k <= 0 or k >= vocab:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: Array, p: float) -> Array:
    """Nucleus filter: keep the most likely tokens until their cumulative probability reaches ``p``.

    ``p >= 1`` keeps all. ``logits [..., vocab]``; returns the same shape with dropped entries ``-inf``.
    """
    if p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
    keep_sorted = before < p
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)  # back to vocab order
    return jnp.where(keep, logits, -jnp.inf)


def sample_token(key: Array, logits: Array, *, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0) -> Array:
    """Sample one token id per row from ``logits [batch, vocab]``; ``temperature == 0`` is greedy (argmax).

    Returns int32 ``[batch]``.

    Raises:
      ValueError: negative temperature, ``top_p`` outside (0, 1].
    """
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected in (0, 1], got {top_p}")
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = top_p_filter(top_k_filter(apply_temperature(logits, temperature), top_k), top_p)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)
