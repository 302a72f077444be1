"""Speculative decoding: the exact draft/verify rule and prompt-lookup (n-gram) drafting.

Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding" (arXiv 2211.17192),
Algorithm 1 and Sec. 2.3: a draft distribution ``q`` proposes ``x_1 .. x_g``; the target ``p`` scores all
``g + 1`` prefixes in one pass; ``x_i`` is accepted with probability ``min(1, p_i(x_i) / q_i(x_i))``; at the
first rejection the token is resampled from ``norm(max(0, p_i - q_i))`` and the round ends; if all ``g``
are accepted a bonus token is drawn from ``p_{g+1}``. Every emitted token is then distributed exactly as
``p`` (their App. A.1), so the output distribution is the target's. With greedy decoding (one-hot ``p``
and ``q``) the rule reduces to "accept while the draft equals the target's argmax, then emit the argmax".

Prompt lookup (Saxena 2023, "prompt lookup decoding"): a draft-free proposer that copies the tokens that
followed the most recent earlier occurrence of the sequence's last n-gram.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def speculative_verify(key: Array, draft_tokens: Array, q_probs: Array, p_probs: Array) -> tuple[Array, Array]:
    """One verification round for a batch of sequences.

    Args:
      key: PRNG key (split per row and per use inside).
      draft_tokens: int ``[B, g]``, the draft's proposals (sampled from ``q_probs``).
      q_probs: float ``[B, g, V]``, the draft distribution each proposal was sampled from.
      p_probs: float ``[B, g + 1, V]``, the target distribution after each prefix (the last row is the
        bonus position after all ``g`` proposals).

    Returns:
      ``(tokens int32 [B, g + 1], n_emitted int32 [B])``: row ``b`` emits ``tokens[b, :n_emitted[b]]``
      (``1 <= n_emitted <= g + 1``): the accepted prefix of the draft, then one token from the residual
      (after a rejection) or the bonus distribution. Entries past ``n_emitted`` are undefined. The number of
      accepted draft tokens is ``n_emitted - 1``.

    Raises:
      ValueError: on mismatched shapes.
    """
    b, g = draft_tokens.shape
    if q_probs.shape[:2] != (b, g) or p_probs.shape[:2] != (b, g + 1) or q_probs.shape[2] != p_probs.shape[2]:
        raise ValueError(f"expected draft_tokens [B, g], q_probs [B, g, V], p_probs [B, g + 1, V]; got "
                         f"{draft_tokens.shape}, {q_probs.shape}, {p_probs.shape}")
    p = p_probs.astype(jnp.float32)
    q = q_probs.astype(jnp.float32)
    k_u, k_res = jax.random.split(key)
    u = jax.random.uniform(k_u, (b, g))
    p_x = jnp.take_along_axis(p[:, :g], draft_tokens[..., None], axis=-1)[..., 0]
    q_x = jnp.take_along_axis(q, draft_tokens[..., None], axis=-1)[..., 0]
    # u < p/q  <=>  u q < p (q(x) > 0 for a token drawn from q; the product form also handles q(x) = 0).
    accept = u * q_x < p_x
    n_acc = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)  # leading accepts
    # The distribution of the token after the accepted prefix: residual at a rejection, p itself at g.
    idx = jnp.minimum(n_acc, g)
    p_at = jnp.take_along_axis(p, idx[:, None, None], axis=1)[:, 0]
    q_pad = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # q = 0 at the bonus position
    q_at = jnp.take_along_axis(q_pad, idx[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_at - q_at, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    # mass == 0 only when p == q there, where a rejection has probability 0; fall back to p for safety.
    dist = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_at)
    last = jax.random.categorical(k_res, jnp.log(dist), axis=-1).astype(jnp.int32)
    pos = jnp.arange(g + 1)[None, :]
    drafted = jnp.concatenate([draft_tokens.astype(jnp.int32), jnp.zeros((b, 1), jnp.int32)], axis=1)
    tokens = jnp.where(pos < n_acc[:, None], drafted, jnp.where(pos == n_acc[:, None], last[:, None], 0))
    return tokens, (n_acc + 1).astype(jnp.int32)


def prompt_lookup_draft(tokens: Sequence[int], n_gram: int = 3, gamma: int = 4, min_n_gram: int = 1) -> list[int]:
    """Draft up to ``gamma`` tokens by copying what followed the latest earlier match of the last n-gram.

    Tries ``n = n_gram, n_gram - 1, ..., min_n_gram``; for the first ``n`` whose last-``n``-token suffix
    occurs earlier in ``tokens``, returns the (up to ``gamma``) tokens after its most recent earlier
    occurrence. Returns ``[]`` when nothing matches.

    Raises:
      ValueError: ``gamma < 1`` or ``not 1 <= min_n_gram <= n_gram``.
    """
    if gamma < 1:
        raise ValueError(f"gamma: expected >= 1, got {gamma}")
    if not 1 <= min_n_gram <= n_gram:
        raise ValueError(f"n_gram, min_n_gram: expected 1 <= min_n_gram <= n_gram, got {min_n_gram}, {n_gram}")
    arr = np.asarray(tokens, dtype=np.int64)
    t = len(arr)
    for n in range(n_gram, min_n_gram - 1, -1):
        if t <= n:
            continue
        suffix = arr[t - n:]
        windows = np.lib.stride_tricks.sliding_window_view(arr[:t - 1], n)  # starts 0 .. t-1-n
        hits = np.nonzero(np.all(windows == suffix, axis=1))[0]
        hits = hits[hits + n < t]  # something must follow the match
        if hits.size:
            start = int(hits[-1]) + n
            return [int(x) for x in arr[start:start + gamma]]
    return []
