"""Attention over a paged KV cache: the ``jnp`` reference that gathers pages (PagedAttention, Kwon et al.
2023, arXiv 2309.06180, Sec. 4.1).

Layout (the one the engine and the paged-attention kernel share): key/value pages
``[n_pages, page_size, n_kv_heads, head_dim]``; ``block_tables [batch, max_pages]`` (int32) lists each
sequence's pages in order, so token ``i`` of sequence ``b`` lives at
``pages[block_tables[b, i // page_size], i % page_size]``; ``lengths [batch]`` counts the tokens cached
(including those written for the current step). Entries of a block table past ``ceil(length / page_size)``
are ignored (any page id, e.g. 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mani_jax.core.attention import attention

Array = jax.Array


def gather_pages(pages: Array, block_tables: Array) -> Array:
    """``pages [n_pages, page_size, H, D]`` and ``block_tables [B, P]`` -> contiguous ``[B, P * page_size, H, D]``."""
    b, p = block_tables.shape
    g = pages[block_tables]  # [B, P, page_size, H, D]
    return g.reshape(b, p * pages.shape[1], *pages.shape[2:])


def paged_attention(
    q: Array,
    k_pages: Array,
    v_pages: Array,
    block_tables: Array,
    lengths: Array,
    *,
    q_positions: Array | None = None,
    softmax_scale: float | None = None,
    sliding_window: int | None = None,
) -> Array:
    """Causal attention of new queries over the cached tokens of each sequence.

    Args:
      q: ``[B, Hq, D]`` (one decode token per sequence, at position ``lengths - 1``) or ``[B, T, Hq, D]``
        (a prefill chunk; then ``q_positions`` is required).
      k_pages, v_pages: ``[n_pages, page_size, Hkv, D]``; ``Hq % Hkv == 0`` (GQA).
      block_tables: int ``[B, max_pages]``.
      lengths: int ``[B]`` cached tokens per sequence (0 = an empty slot: its output is zeros).
      q_positions: int ``[B, T]`` absolute positions of the queries; each must be ``< lengths[b]`` (its
        own key already written) for a meaningful result. Default for 3-d ``q``: ``lengths - 1``.
      softmax_scale: default ``1/sqrt(D)``. sliding_window: as :func:`mani_jax.core.attention`.

    Returns:
      like ``q`` (``[B, Hq, D]`` or ``[B, T, Hq, D]``), q's dtype; float32 math. Query ``t`` sees keys at
      positions ``<= q_positions[b, t]`` and ``< lengths[b]``; rows that see nothing give zeros.

    Raises:
      ValueError: on inconsistent shapes or a missing ``q_positions`` for 4-d ``q``.
    """
    decode = q.ndim == 3
    if decode:
        q = q[:, None]
    if q.ndim != 4:
        raise ValueError(f"q: expected [B, Hq, D] or [B, T, Hq, D], got shape {q.shape}")
    b, t = q.shape[:2]
    if k_pages.ndim != 4 or v_pages.shape[:3] != k_pages.shape[:3]:
        raise ValueError(f"k_pages/v_pages: expected [n_pages, page_size, Hkv, D] alike, got {k_pages.shape} and "
                         f"{v_pages.shape}")
    if block_tables.ndim != 2 or block_tables.shape[0] != b:
        raise ValueError(f"block_tables: expected [{b}, max_pages], got {block_tables.shape}")
    if lengths.shape != (b,):
        raise ValueError(f"lengths: expected [{b}], got {lengths.shape}")
    if q_positions is None:
        if not decode:
            raise ValueError("q_positions: required when q is [B, T, Hq, D]")
        q_positions = (lengths - 1)[:, None]
    if q_positions.shape != (b, t):
        raise ValueError(f"q_positions: expected [{b}, {t}], got {q_positions.shape}")
    k = gather_pages(k_pages, block_tables)
    v = gather_pages(v_pages, block_tables)
    s = k.shape[1]
    kv_pos = jnp.arange(s, dtype=jnp.int32)
    # Keys at or past `lengths` get a position no query can see (causal), so they are masked out.
    kv_positions = jnp.where(kv_pos[None, :] < lengths[:, None], kv_pos[None, :], jnp.iinfo(jnp.int32).max)
    out = attention(q, k.astype(q.dtype), v.astype(q.dtype), causal=True, q_positions=q_positions.astype(jnp.int32),
                    kv_positions=kv_positions, softmax_scale=softmax_scale, sliding_window=sliding_window)
    return out[:, 0] if decode else out
