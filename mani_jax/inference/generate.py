"""A plain cached decode loop: prefill the prompt, then one ``decode_step`` per new token.

This is the simple path (one sequence at a time, contiguous cache): the reference the engine
(:mod:`mani_jax.inference.engine`) is tested against and the one-at-a-time baseline of its benchmark. The
jitted prefill and step are cached per model structure, cache length and sampling settings, so repeated
calls with the same shapes do not recompile.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mani_jax.core.sampling import sample_token


@functools.partial(jax.jit, static_argnums=0)
def _prefill(graphdef, state, tokens, cache):
    return nnx.merge(graphdef, state).prefill(tokens, cache)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _step(graphdef, state, token, cache, key, temperature, top_k, top_p):
    logits, cache = nnx.merge(graphdef, state).decode_step(token, cache)
    key, sub = jax.random.split(key)
    return sample_token(sub, logits, temperature=temperature, top_k=top_k, top_p=top_p), cache, key


def generate(
    model,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: Sequence[int] = (),
    cache_len: int | None = None,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Sample up to ``max_new_tokens`` tokens after ``prompt`` from a :class:`~mani_jax.models.HybridLM`.

    Args:
      model: a model with ``init_cache``, ``prefill`` and ``decode_step``.
      prompt: token ids (non-empty; include BOS yourself).
      max_new_tokens: how many tokens at most (>= 0).
      temperature, top_k, top_p: see :func:`mani_jax.core.sampling.sample_token` (0 = greedy).
      seed: PRNG seed; the same seed gives the same tokens.
      stop_ids: generation stops after emitting any of these (the stop token is included).
      cache_len: KV-cache length (default ``len(prompt) + max_new_tokens``); a fixed value (e.g.
        ``max_seq_len``) lets prompts of different lengths share one compiled decode step.
      on_token: called with each new token id as soon as it is on the host (streaming, timing).

    Returns:
      The new token ids (not including the prompt).

    Raises:
      ValueError: empty prompt, negative ``max_new_tokens``, a prompt + generation longer than
        ``model.config.max_seq_len``, or ``cache_len`` shorter than prompt + generation.
    """
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("prompt: expected at least one token id")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected >= 0, got {max_new_tokens}")
    total = len(prompt) + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {total} exceeds max_seq_len={model.config.max_seq_len}")
    if max_new_tokens == 0:
        return []
    cache_len = total if cache_len is None else cache_len
    if cache_len < total:
        raise ValueError(f"cache_len: expected >= len(prompt) + max_new_tokens = {total}, got {cache_len}")
    graphdef, state = nnx.split(model)
    cache = model.init_cache(1, cache_len)
    logits, cache = _prefill(graphdef, state, jnp.asarray([prompt], jnp.int32), cache)
    key, sub = jax.random.split(jax.random.PRNGKey(seed))
    token = sample_token(sub, logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p)
    out: list[int] = []

    def emit(t: int) -> None:
        out.append(t)
        if on_token is not None:
            on_token(t)

    emit(int(token[0]))
    stops = set(int(s) for s in stop_ids)
    while len(out) < max_new_tokens and out[-1] not in stops:
        token, cache, key = _step(graphdef, state, token, cache, key, float(temperature), int(top_k), float(top_p))
        emit(int(token[0]))
    return out
