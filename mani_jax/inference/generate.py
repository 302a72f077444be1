"""A plain cached decode loop: prefill the prompt, then one ``decode_step`` per new token.

This is the simple path (one sequence at a time, dense cache) used by the experiments for samples; the
engine with a paged KV cache and continuous batching is ``mani_jax.inference``'s larger job.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mani_jax.core.sampling import sample_token


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
) -> list[int]:
    """Sample up to ``max_new_tokens`` tokens after ``prompt`` from a :class:`~mani_jax.models.HybridLM`.

    Args:
      model: a model with ``init_cache``, ``prefill`` and ``decode_step``.
      prompt: token ids (non-empty; include BOS yourself).
      max_new_tokens: how many tokens at most (>= 0).
      temperature, top_k, top_p: see :func:`mani_jax.core.sampling.sample_token` (0 = greedy).
      seed: PRNG seed; the same seed gives the same tokens.
      stop_ids: generation stops after emitting any of these (the stop token is included).

    Returns:
      The new token ids (not including the prompt).

    Raises:
      ValueError: empty prompt, negative ``max_new_tokens``, or a prompt + generation longer than
        ``model.config.max_seq_len``.
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
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, tokens, cache):
        return nnx.merge(graphdef, state).prefill(tokens, cache)

    @jax.jit
    def step(state, token, cache, key):
        logits, cache = nnx.merge(graphdef, state).decode_step(token, cache)
        key, sub = jax.random.split(key)
        return sample_token(sub, logits, temperature=temperature, top_k=top_k, top_p=top_p), cache, key

    cache = model.init_cache(1, total)
    logits, cache = prefill(state, jnp.asarray([prompt], jnp.int32), cache)
    key, sub = jax.random.split(jax.random.PRNGKey(seed))
    token = sample_token(sub, logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p)
    out = [int(token[0])]
    stops = set(int(s) for s in stop_ids)
    while len(out) < max_new_tokens and out[-1] not in stops:
        token, cache, key = step(state, token, cache, key)
        out.append(int(token[0]))
    return out
