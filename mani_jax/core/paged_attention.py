"""Attention over a paged KV cache: the ``jnp`` reference that gathers pages (PagedAttention, Kwon et al.
2023, arXiv 2309.06180, Sec. 4.1).

Layout (the one the engine and the paged-attention kernel share): key/value pages
``[n_pages, page_size, n_kv_heads, head_dim]``; ``block_tables [batch, max_pages]`` (int32) lists each
sequence's pages in order, so token ``i`` of sequence ``b`` lives at
``pages[block_tables[b, i // page_size], i % page_size]``; ``lengths [batch]`` counts the tokens cached
(including those written for the current step). Entries of a block table past ``ceil(length / page_size)``
are ignored (any page id, e.g. 0).

int8 KV: pages stored as int8 with one float32 scale per (page, kv head), ``scales [n_pages, Hkv]``;
a key is ``k_pages[p, s, h].astype(f32) * k_scales[p, h]`` (symmetric absmax, :func:`quantize_pages`).
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


def _gather_dequantized(pages: Array, scales: Array | None, block_tables: Array, name: str) -> Array:
    """Gathered ``[B, P * page_size, H, D]``; float32 times the per-(page, head) scale for int8 pages."""
    g = gather_pages(pages, block_tables)
    if scales is None:
        return g
    if scales.shape != (pages.shape[0], pages.shape[2]):
        raise ValueError(f"{name}: expected [n_pages, n_kv_heads] = {(pages.shape[0], pages.shape[2])}, "
                         f"got {scales.shape}")
    per_token = jnp.repeat(scales.astype(jnp.float32)[block_tables], pages.shape[1], axis=1)  # [B, S, H]
    return g.astype(jnp.float32) * per_token[..., None]


def quantize_pages(pages: Array) -> tuple[Array, Array]:
    """Symmetric int8 quantization with one scale per (page, kv head): ``pages [n_pages, page_size, H, D]``
    -> ``(int8 pages, float32 scales [n_pages, H])`` with ``scale = max |x| / 127`` over the page's tokens
    and head dims (1 where the page is all zeros), ``q = round(x / scale)``."""
    if pages.ndim != 4:
        raise ValueError(f"pages: expected [n_pages, page_size, n_kv_heads, head_dim], got {pages.shape}")
    amax = jnp.max(jnp.abs(pages.astype(jnp.float32)), axis=(1, 3))  # [n_pages, H]
    scales = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.round(pages.astype(jnp.float32) / scales[:, None, :, None])
    return jnp.clip(q, -127, 127).astype(jnp.int8), scales


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
    k_scales: Array | None = None,
    v_scales: Array | None = None,
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
      k_scales, v_scales: float32 ``[n_pages, Hkv]`` for int8 pages (see the module docstring), or None.

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
    k = _gather_dequantized(k_pages, k_scales, block_tables, "k_scales")
    v = _gather_dequantized(v_pages, v_scales, block_tables, "v_scales")
    s = k.shape[1]
    kv_pos = jnp.arange(s, dtype=jnp.int32)
    # Keys at or past `lengths` get a position no query can see (causal), so they are masked out.
    kv_positions = jnp.where(kv_pos[None, :] < lengths[:, None], kv_pos[None, :], jnp.iinfo(jnp.int32).max)
    out = attention(q, k.astype(q.dtype), v.astype(q.dtype), causal=True, q_positions=q_positions.astype(jnp.int32),
                    kv_positions=kv_positions, softmax_scale=softmax_scale, sliding_window=sliding_window)
    return out[:, 0] if decode else out
