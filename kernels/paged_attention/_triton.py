"""Split-K (flash-decoding) attention over a paged KV cache, as a Pallas kernel for the Triton lowering (or
interpret mode).

Inputs arrive prepared by :mod:`kernels.paged_attention.api`: queries grouped by kv head and padded,
``q [B, Hkv, Gp, D]`` (``Gp`` = query heads per kv head rounded up to a power of two >= 16, ``D`` a power
of two >= 16); pages ``[n_pages, page_size, Hkv, D]`` (float, or int8 with float32 ``scales [n_pages,
Hkv]``); block tables ``[B, n_splits * pages_per_split]`` (int32, clipped to valid page ids); ``lengths
[B]``.

Grid ``(B, Hkv, n_splits)``. A program owns one sequence, one kv head (all ``Gp`` query heads of its GQA
group as the rows of one ``[Gp, D]`` tile, so each key/value page is read once per group) and one
contiguous range of ``pages_per_split`` block-table entries. It loops over blocks of ``pages_per_block``
pages, only those holding visible tokens (dynamic bounds from ``lengths`` and the sliding window, so an
empty slot or a short sequence costs nothing), gathers the block's pages from HBM by page id, and runs the
online softmax (base-2) of FlashAttention-2 over them. It writes its unnormalised output, running max and
normaliser; :func:`kernels.paged_attention.api.paged_attention` merges the splits with a log-sum-exp
reduction (Dao et al. 2023, "Flash-Decoding").

int8 pages: the page is cast to the query dtype for the matmuls (exact: |int8| <= 127); the key scale
multiplies the logits column of each token, the value scale the probabilities before ``P V`` (one scale per
(page, kv head), so both are per-column factors of the ``[Gp, block]`` tile).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static configuration of one paged-attention call (hashable)."""

    scale: float  # softmax scale (natural-log domain)
    window: int | None  # sliding window (Mistral convention: q_pos - k_pos < window)
    pages_per_block: int
    pages_per_split: int
    n_splits: int
    quantized: bool
    num_warps: int | None
    num_stages: int | None
    interpret: bool
    precision: lax.Precision | None


def _kernel(*refs, cfg: KernelConfig):
    if cfg.quantized:
        q_ref, k_ref, v_ref, ks_ref, vs_ref, bt_ref, len_ref, o_ref, m_ref, l_ref = refs
    else:
        q_ref, k_ref, v_ref, bt_ref, len_ref, o_ref, m_ref, l_ref = refs
        ks_ref = vs_ref = None
    b, split = pl.program_id(0), pl.program_id(2)
    ppb, pps = cfg.pages_per_block, cfg.pages_per_split
    page_size, d = k_ref.shape[1], k_ref.shape[2]
    block_k = ppb * page_size
    length = len_ref[b]
    lo_tok = jnp.int32(0) if cfg.window is None else jnp.maximum(length - cfg.window, 0)
    # Blocks of this split that hold a visible token: pages [lo_tok // ps, cdiv(length, ps)).
    split_first = split * pps
    first_page = jnp.maximum(lo_tok // page_size - split_first, 0)
    last_page = jnp.minimum(pl.cdiv(length, page_size) - split_first, pps)
    blk_lo = first_page // ppb
    blk_hi = jnp.where(last_page > first_page, pl.cdiv(last_page, ppb), blk_lo)

    q = q_ref[...]
    gp = q.shape[0]
    qk_scale = cfg.scale * LOG2E

    def body(j, carry):
        acc, m, l = carry
        start_page = split_first + j * ppb
        pages = bt_ref[pl.ds(start_page, ppb)]  # [ppb] page ids
        k = k_ref[pages].reshape(block_k, d)
        v = v_ref[pages].reshape(block_k, d)
        if cfg.quantized:
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        s = pl_triton.dot(q, k, trans_b=True, precision=cfg.precision) * qk_scale  # [gp, block_k]
        if cfg.quantized:
            ks = jnp.broadcast_to(ks_ref[pages][:, None], (ppb, page_size)).reshape(1, block_k)
            s = s * ks
        tok = start_page * page_size + lax.broadcasted_iota(jnp.int32, (gp, block_k), 1)
        s = jnp.where((tok < length) & (tok >= lo_tok), s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a fully masked row: exp2(-inf) = 0, not NaN
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        if cfg.quantized:
            p = p * jnp.broadcast_to(vs_ref[pages][:, None], (ppb, page_size)).reshape(1, block_k)
        acc = alpha[:, None] * acc + pl_triton.dot(p.astype(v.dtype), v, precision=cfg.precision)
        return acc, m_new, l

    init = (jnp.zeros((gp, d), jnp.float32), jnp.full((gp,), -jnp.inf, jnp.float32), jnp.zeros((gp,), jnp.float32))
    acc, m, l = lax.fori_loop(blk_lo, blk_hi, body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def paged_decode(q, k_pages, v_pages, k_scales, v_scales, block_tables, lengths, cfg: KernelConfig):
    """Per-split partial results: ``(acc [B, Hkv, n_splits, Gp, D], m, l [B, Hkv, n_splits, Gp])`` float32;
    ``m`` is the base-2 running max of the scaled logits (``-inf`` where a split saw nothing), ``acc`` the
    unnormalised output and ``l`` the normaliser relative to ``m``."""
    b, hkv, gp, d = q.shape
    n_pages, page_size = k_pages.shape[:2]
    mp = block_tables.shape[1]
    ns = cfg.n_splits
    page_spec = pl.BlockSpec((n_pages, page_size, None, d), lambda bi, h, s: (0, 0, h, 0))
    in_specs = [pl.BlockSpec((None, None, gp, d), lambda bi, h, s: (bi, h, 0, 0)), page_spec, page_spec]
    args = [q, k_pages, v_pages]
    if cfg.quantized:
        scale_spec = pl.BlockSpec((n_pages, None), lambda bi, h, s: (0, h))
        in_specs += [scale_spec, scale_spec]
        args += [k_scales, v_scales]
    in_specs += [pl.BlockSpec((None, mp), lambda bi, h, s: (bi, 0)), pl.BlockSpec((b,), lambda bi, h, s: (0,))]
    args += [block_tables, lengths]
    f32 = jnp.float32
    return pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        grid=(b, hkv, ns),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, None, gp, d), lambda bi, h, s: (bi, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, gp), lambda bi, h, s: (bi, h, s, 0)),
                   pl.BlockSpec((None, None, None, gp), lambda bi, h, s: (bi, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, ns, gp, d), f32), jax.ShapeDtypeStruct((b, hkv, ns, gp), f32),
                   jax.ShapeDtypeStruct((b, hkv, ns, gp), f32)],
        compiler_params=pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=cfg.interpret,
        name="paged_attention_decode",
    )(*args)
