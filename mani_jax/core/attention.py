"""Reference scaled-dot-product attention: causal, GQA, segment ids, sliding window, logsumexp.

Layout is ``[batch, seq, heads, head_dim]`` everywhere. These functions are the ground truth that the
Pallas kernels in ``kernels/`` are tested against, so they favour clarity and float32 math over speed.

Source: Vaswani et al. 2017 (eq. 1) for attention; Ainslie et al. 2023 for grouped-query attention;
Milakov & Gimelshein 2018 / Dao et al. 2022 (FlashAttention, Alg. 1) for the online-softmax form.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def positions_from_segments(segment_ids: Array) -> Array:
    """Position of each token within its segment (restarting at 0 where the id changes); int32 ``[b, l]``."""
    idx = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    starts = jnp.where((segment_ids != prev) | (idx == 0), idx, 0)
    return idx - jax.lax.cummax(starts, axis=1)


def _check_qkv(q: Array, k: Array, v: Array) -> tuple[int, int, int, int, int, int]:
    if q.ndim != 4:
        raise ValueError(f"q: expected [batch, seq_q, n_heads, head_dim], got shape {q.shape}")
    if k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"k, v: expected [batch, seq_kv, n_kv_heads, head_dim], got {k.shape} and {v.shape}")
    b, t, hq, d = q.shape
    bk, s, hkv, dk = k.shape
    if bk != b or v.shape[0] != b:
        raise ValueError(f"q, k, v: batch sizes differ ({b}, {bk}, {v.shape[0]})")
    if dk != d:
        raise ValueError(f"k: head_dim {dk} != q head_dim {d}")
    if v.shape[1] != s or v.shape[2] != hkv:
        raise ValueError(f"v: expected [batch, {s}, {hkv}, head_dim_v], got {v.shape}")
    if hq % hkv != 0:
        raise ValueError(f"n_heads ({hq}) must be a multiple of n_kv_heads ({hkv}) for grouped-query attention")
    return b, t, s, hq, hkv, d


def attention_mask(
    q_positions: Array,
    kv_positions: Array,
    *,
    causal: bool,
    segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None,
    sliding_window: int | None = None,
) -> Array:
    """Boolean mask ``[batch, seq_q, seq_kv]``: True where query t may attend to key s.

    Args:
      q_positions: int ``[batch, seq_q]`` absolute position of each query.
      kv_positions: int ``[batch, seq_kv]`` absolute position of each key.
      causal: keys with position > the query's position are masked.
      segment_ids: int ``[batch, seq_q]``; queries attend only to keys of the same segment (packed documents).
      kv_segment_ids: int ``[batch, seq_kv]``; defaults to ``segment_ids``.
      sliding_window: if set, a key is visible only when ``q_pos - kv_pos < sliding_window`` (and, when not
        causal, also ``kv_pos - q_pos < sliding_window``), i.e. the query sees at most ``sliding_window``
        keys on each side including itself (Mistral's convention).
    """
    qp = q_positions[:, :, None]
    kp = kv_positions[:, None, :]
    mask = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), dtype=bool)
    if causal:
        mask &= kp <= qp
    if sliding_window is not None:
        mask &= (qp - kp) < sliding_window
        if not causal:
            mask &= (kp - qp) < sliding_window
    if segment_ids is not None:
        kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
        mask &= segment_ids[:, :, None] == kv_seg[:, None, :]
    return mask


def _default_positions(b: int, t: int, s: int, q_positions, kv_positions):
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    if q_positions is None:
        # Bottom-right alignment: the last query sits at the last key (standard for decoding with a cache).
        q_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + (s - t), (b, t))
    return q_positions, kv_positions


def _validate_options(segment_ids, kv_segment_ids, t, s, sliding_window):
    if segment_ids is not None and segment_ids.shape[-1] != t:
        raise ValueError(f"segment_ids: expected [batch, {t}], got {segment_ids.shape}")
    if segment_ids is not None and kv_segment_ids is None and s != t:
        raise ValueError("kv_segment_ids: required when seq_kv != seq_q and segment_ids is given")
    if kv_segment_ids is not None and kv_segment_ids.shape[-1] != s:
        raise ValueError(f"kv_segment_ids: expected [batch, {s}], got {kv_segment_ids.shape}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window: expected a positive int, got {sliding_window}")


def attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool = False,
    segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None,
    q_positions: Array | None = None,
    kv_positions: Array | None = None,
    sliding_window: int | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
) -> Array | tuple[Array, Array]:
    """Reference attention ``softmax(q k^T * scale + mask) v`` with grouped-query heads.

    Args:
      q: ``[batch, seq_q, n_heads, head_dim]``.
      k: ``[batch, seq_kv, n_kv_heads, head_dim]``; ``n_heads % n_kv_heads == 0``; query head ``h`` reads
        kv head ``h // (n_heads // n_kv_heads)`` (the grouping of Hugging Face ``repeat_kv``).
      v: ``[batch, seq_kv, n_kv_heads, head_dim_v]``.
      causal, segment_ids, kv_segment_ids, sliding_window: see :func:`attention_mask`.
      q_positions, kv_positions: int ``[batch, seq]``; default ``arange``, with queries aligned to the end
        of the keys (query ``t`` at position ``seq_kv - seq_q + t``).
      softmax_scale: multiplies the logits; default ``1/sqrt(head_dim)``.
      return_lse: also return the logsumexp of the scaled, masked logits.

    Returns:
      ``out`` ``[batch, seq_q, n_heads, head_dim_v]`` in q's dtype, and if ``return_lse`` also
      ``lse`` float32 ``[batch, seq_q, n_heads]``. Query rows with no visible key give zeros and
      ``lse = -inf`` (never NaN). Math is done in float32.

    Raises:
      ValueError: on mismatched shapes or head counts, or bad segment ids / window.
    """
    b, t, s, hq, hkv, d = _check_qkv(q, k, v)
    _validate_options(segment_ids, kv_segment_ids, t, s, sliding_window)
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    q_positions, kv_positions = _default_positions(b, t, s, q_positions, kv_positions)
    mask = attention_mask(q_positions, kv_positions, causal=causal, segment_ids=segment_ids,
                          kv_segment_ids=kv_segment_ids, sliding_window=sliding_window)
    g = hq // hkv
    qg = q.astype(jnp.float32).reshape(b, t, hkv, g, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) * scale
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m_safe)  # exp(-inf) == 0 for masked keys
    l = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bskd->btkgd", p / jnp.where(l == 0, 1.0, l), v.astype(jnp.float32))
    out = out.reshape(b, t, hq, v.shape[-1]).astype(q.dtype)
    if not return_lse:
        return out
    lse = jnp.where(l[..., 0] > 0, m_safe[..., 0] + jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1.0)), -jnp.inf)
    return out, lse.reshape(b, hq, t).transpose(0, 2, 1)


def blockwise_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    block_kv: int = 64,
    causal: bool = False,
    segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None,
    q_positions: Array | None = None,
    kv_positions: Array | None = None,
    sliding_window: int | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
) -> Array | tuple[Array, Array]:
    """:func:`attention` computed one key block at a time with the online softmax (O(seq) memory in seq_kv).

    The running max ``m``, normaliser ``l`` and unnormalised output are rescaled as each block of
    ``block_kv`` keys arrives (FlashAttention, Dao et al. 2022, Alg. 1; FlashAttention-2, Dao 2023, Alg. 1).
    Same arguments, returns and errors as :func:`attention`, plus ``block_kv`` (positive int; seq_kv is
    padded up to a multiple with masked keys).
    """
    b, t, s, hq, hkv, d = _check_qkv(q, k, v)
    _validate_options(segment_ids, kv_segment_ids, t, s, sliding_window)
    if block_kv < 1:
        raise ValueError(f"block_kv: expected a positive int, got {block_kv}")
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    q_positions, kv_positions = _default_positions(b, t, s, q_positions, kv_positions)
    if segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = segment_ids
    n_blocks = -(-s // block_kv)
    pad = n_blocks * block_kv - s
    valid = jnp.pad(jnp.ones((b, s), bool), ((0, 0), (0, pad)))
    kp = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
    vp = jnp.pad(v.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
    kvpos = jnp.pad(kv_positions, ((0, 0), (0, pad)))
    kvseg = None if kv_segment_ids is None else jnp.pad(kv_segment_ids, ((0, 0), (0, pad)))
    g = hq // hkv
    dv = v.shape[-1]
    qg = q.astype(jnp.float32).reshape(b, t, hkv, g, d) * scale

    def blocks(x):  # [b, n*bk, ...] -> [n, b, bk, ...]
        return jnp.moveaxis(x.reshape(b, n_blocks, block_kv, *x.shape[2:]), 1, 0)

    xs = (blocks(kp), blocks(vp), blocks(kvpos), blocks(valid), None if kvseg is None else blocks(kvseg))

    def step(carry, blk):
        m, l, acc = carry
        kb, vb, posb, validb, segb = blk
        mask = attention_mask(q_positions, posb, causal=causal, segment_ids=segment_ids,
                              kv_segment_ids=segb, sliding_window=sliding_window) & validb[:, None, :]
        logits = jnp.einsum("btkgd,bskd->bkgts", qg, kb)
        logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(logits - m_safe[..., None])
        alpha = jnp.exp(jnp.where(jnp.isfinite(m), m, -jnp.inf) - m_safe)
        l = alpha * l + jnp.sum(p, axis=-1)
        acc = alpha[..., None] * acc + jnp.einsum("bkgts,bskd->bkgtd", p, vb)
        return (m_new, l, acc), None

    init = (jnp.full((b, hkv, g, t), -jnp.inf, jnp.float32), jnp.zeros((b, hkv, g, t), jnp.float32),
            jnp.zeros((b, hkv, g, t, dv), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(step, init, xs)
    out = acc / jnp.where(l == 0, 1.0, l)[..., None]
    out = jnp.einsum("bkgtd->btkgd", out).reshape(b, t, hq, dv).astype(q.dtype)
    if not return_lse:
        return out
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
    return out, lse.reshape(b, hq, t).transpose(0, 2, 1)
