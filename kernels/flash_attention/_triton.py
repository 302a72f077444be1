"""FlashAttention-2 forward and backward as Pallas kernels for the Triton lowering (or interpret mode).

Inputs arrive padded by :mod:`kernels.flash_attention.api`: sequence lengths to a multiple of every block
size, head dims to a power of two >= 16. Layout ``[batch, seq, heads, head_dim]``.

Kernels (Dao 2023, "FlashAttention-2", Alg. 1 forward and Alg. 2 backward):

* forward, grid ``(q blocks, batch, q heads)``: one query tile stays in registers while the loop streams
  key/value tiles, keeping the running max ``m``, normaliser ``l`` and unnormalised output (online softmax,
  base-2 exponentials); writes ``out`` and ``lse``.
* dK/dV, grid ``(kv blocks, batch, kv heads)``: one key/value tile stays resident while the loop streams
  query tiles of every query head of its GQA group, so the group sum of dK/dV happens in registers (no
  atomics, no second pass).
* dQ, grid ``(q blocks, batch, q heads)``: one query tile stays resident while key/value tiles stream.

``P`` is recomputed in the backward from ``lse`` (never stored). ``delta = rowsum(dO * O)`` is computed
outside (one fused XLA elementwise-reduce over ``O``; the same bytes a preprocessing kernel would read).
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

from kernels.flash_attention._masking import (MaskSpec, classify, element_mask, kv_block_range, kv_full_range,
                                              make_side, masked_loop, q_block_range, q_full_range)

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static configuration of one flash-attention call (hashable, so jit/custom_vjp can key on it)."""

    mask: MaskSpec
    scale: float  # softmax scale (natural-log domain)
    block_q: int
    block_kv: int
    block_q_dkv: int
    block_kv_dkv: int
    block_q_dq: int
    block_kv_dq: int
    num_warps: int | None
    num_stages: int | None
    num_warps_bwd: int | None
    num_stages_bwd: int | None
    interpret: bool
    precision: lax.Precision | None  # for float32 inputs: HIGHEST (no TF32); None for 16-bit inputs


def _params(num_warps, num_stages):
    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _dot(a, b, cfg: KernelConfig, *, trans_a=False, trans_b=False):
    return pl_triton.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=cfg.precision)


def _online_softmax_step(carry, s, v, masked: bool, cfg: KernelConfig):
    """One FlashAttention-2 update with the (already scaled, base-2, maybe -inf masked) logits tile ``s``."""
    acc, m, l = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    # A row whose keys so far are all masked has m_new = -inf; use 0 so exp2(-inf - 0) = 0, never NaN.
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
    alpha = jnp.exp2(m - m_use)  # m = -inf at the start gives 0
    p = jnp.exp2(s - m_use[:, None])
    l = alpha * l + jnp.sum(p, axis=1)
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, cfg)
    return acc, m_new, l


def _tile_loop(spec: MaskSpec, lo, hi, full_range, make_other_side, classify_tile, tile, carry,
               block_other: int):
    """Loop ``tile(carry, start, other_side, masked)`` over the other side's blocks ``[lo, hi)``.

    ``full_range()`` gives the blocks no mask element touches (default positions only);
    ``make_other_side(start)`` builds the other side's :class:`Side`; ``classify_tile(side, start)`` gives
    ``(any_visible, all_visible)``.

    Three strategies, chosen statically: no mask at all -> one plain loop; default positions without
    segment ids -> :func:`masked_loop` (mask only on the boundary tiles, bounds by arithmetic);
    otherwise -> one loop whose body tests each tile (:func:`classify`) and skips invisible tiles.
    """
    def start_of(j):
        return pl.multiple_of(j * block_other, block_other)

    if not spec.any_mask:
        return lax.fori_loop(lo, hi, lambda j, c: tile(c, start_of(j), None, False), carry)
    if spec.default_positions and not spec.segments:
        def step(j, c, masked):
            start = start_of(j)
            return tile(c, start, make_other_side(start) if masked else None, masked)
        full_lo, full_hi = full_range()
        return masked_loop(spec, lo, hi, full_lo, full_hi, step, carry)

    def body(j, c):
        start = start_of(j)
        other = make_other_side(start)
        any_v, all_v = classify_tile(other, start)
        run = lambda c: lax.cond(all_v, lambda c: tile(c, start, other, False),
                                 lambda c: tile(c, start, other, True), c)
        return lax.cond(any_v, run, lambda c: c, c)

    return lax.fori_loop(lo, hi, body, carry)


# ----------------------------------------------------------------------------------------------- forward

def _fwd_kernel(*refs, cfg: KernelConfig, has_pos: bool, n_kv_blocks: int):
    spec = cfg.mask
    it = iter(refs)
    q_ref, k_ref, v_ref = next(it), next(it), next(it)
    qpos_ref = kvpos_ref = qseg_ref = kvseg_ref = None
    if has_pos:
        qpos_ref, kvpos_ref = next(it), next(it)
    if spec.segments:
        qseg_ref, kvseg_ref = next(it), next(it)
    o_ref, lse_ref = next(it), next(it)

    bq, bk = cfg.block_q, cfg.block_kv
    i = pl.program_id(0)
    q_start = i * bq
    q = q_ref[...]
    qside = make_side(spec, q_start, bq, is_query=True, pos_ref=qpos_ref, seg_ref=qseg_ref)
    qk_scale = cfg.scale * LOG2E
    dv = v_ref.shape[-1]

    def tile(carry, kv_start, kside, masked: bool):
        k = k_ref[pl.ds(kv_start, bk), :]
        v = v_ref[pl.ds(kv_start, bk), :]
        s = _dot(q, k, cfg, trans_b=True) * qk_scale
        if masked:
            s = jnp.where(element_mask(spec, qside, kside), s, -jnp.inf)
        return _online_softmax_step(carry, s, v, masked, cfg)

    lo, hi = kv_block_range(spec, q_start, bq, bk, n_kv_blocks)
    init = (jnp.zeros((bq, dv), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc, m, l = _tile_loop(
        spec, lo, hi, lambda: kv_full_range(spec, q_start, bq, bk),
        lambda start: make_side(spec, start, bk, is_query=False, pos_ref=kvpos_ref, seg_ref=kvseg_ref),
        lambda kside, start: classify(spec, qside, kside, start, bk), tile, init, bk)
    nonempty = l > 0.0
    o_ref[...] = (acc / jnp.where(nonempty, l, 1.0)[:, None]).astype(o_ref.dtype)
    # Natural-log logsumexp; -inf for a row with nothing to attend to (as the reference).
    lse_ref[...] = jnp.where(nonempty, (m + jnp.log2(jnp.where(nonempty, l, 1.0))) * LN2, -jnp.inf)


def forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, cfg: KernelConfig):
    """Padded forward: ``q [B, Tp, Hq, D]``, ``k [B, Sp, Hkv, D]``, ``v [B, Sp, Hkv, Dv]``; int32 positions
    ``[B, Tp] / [B, Sp]`` (or None with default positions) and segment ids (or None).

    Returns ``out [B, Tp, Hq, Dv]`` (q's dtype) and ``lse`` float32 ``[B, Hq, Tp]`` (natural log).
    """
    b, tp, hq, d = q.shape
    sp, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    bq, bk = cfg.block_q, cfg.block_kv
    nq = tp // bq
    has_pos = q_pos is not None
    in_specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, bi, h: (bi, i, h, 0)),
        pl.BlockSpec((None, sp, None, d), lambda i, bi, h: (bi, 0, lax.div(h, g), 0)),
        pl.BlockSpec((None, sp, None, dv), lambda i, bi, h: (bi, 0, lax.div(h, g), 0)),
    ]
    args = [q, k, v]
    q_tile = pl.BlockSpec((None, bq), lambda i, bi, h: (bi, i))
    kv_full = pl.BlockSpec((None, sp), lambda i, bi, h: (bi, 0))
    if has_pos:
        in_specs += [q_tile, kv_full]
        args += [q_pos, kv_pos]
    if cfg.mask.segments:
        in_specs += [q_tile, kv_full]
        args += [q_seg, kv_seg]
    kernel = functools.partial(_fwd_kernel, cfg=cfg, has_pos=has_pos, n_kv_blocks=sp // bk)
    out, lse = pl.pallas_call(
        kernel,
        grid=(nq, b, hq),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bq, None, dv), lambda i, bi, h: (bi, i, h, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, i))],
        out_shape=[jax.ShapeDtypeStruct((b, tp, hq, dv), q.dtype),
                   jax.ShapeDtypeStruct((b, hq, tp), jnp.float32)],
        compiler_params=_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(*args)
    return out, lse


# ---------------------------------------------------------------------------------------------- backward

def _dkdv_kernel(*refs, cfg: KernelConfig, has_pos: bool, n_q_blocks: int, group: int):
    spec = cfg.mask
    it = iter(refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = (next(it) for _ in range(6))
    qpos_ref = kvpos_ref = qseg_ref = kvseg_ref = None
    if has_pos:
        qpos_ref, kvpos_ref = next(it), next(it)
    if spec.segments:
        qseg_ref, kvseg_ref = next(it), next(it)
    dk_ref, dv_ref = next(it), next(it)

    bq, bk = cfg.block_q_dkv, cfg.block_kv_dkv
    j = pl.program_id(0)
    kv_start = j * bk
    k = k_ref[...]
    v = v_ref[...]
    kside = make_side(spec, kv_start, bk, is_query=False, pos_ref=kvpos_ref, seg_ref=kvseg_ref)
    qk_scale = cfg.scale * LOG2E

    def tile(carry, hg, q_start, qside, masked: bool):
        dk, dv = carry
        q = q_ref[pl.ds(q_start, bq), hg, :]
        do = do_ref[pl.ds(q_start, bq), hg, :]
        lse2 = lse_ref[hg, pl.ds(q_start, bq)]  # base-2 lse; +inf on empty rows, so p = 0 there
        delta = delta_ref[hg, pl.ds(q_start, bq)]
        s = _dot(q, k, cfg, trans_b=True) * qk_scale  # [bq, bk]
        if masked:
            s = jnp.where(element_mask(spec, qside, kside), s, -jnp.inf)
        p = jnp.exp2(s - lse2[:, None])
        dv = dv + _dot(p.astype(do.dtype), do, cfg, trans_a=True)
        dp = _dot(do, v, cfg, trans_b=True)
        ds = p * (dp - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, cfg, trans_a=True)
        return dk, dv

    lo, hi = q_block_range(spec, kv_start, bk, bq, n_q_blocks)

    def head_body(hg, carry):
        return _tile_loop(
            spec, lo, hi, lambda: q_full_range(spec, kv_start, bk, bq),
            lambda start: make_side(spec, start, bq, is_query=True, pos_ref=qpos_ref, seg_ref=qseg_ref),
            lambda qside, start: classify(spec, qside, kside, kv_start, bk),
            lambda c, start, qside, masked: tile(c, hg, start, qside, masked), carry, bq)

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, group, head_body, init)
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, cfg: KernelConfig, has_pos: bool, n_kv_blocks: int):
    spec = cfg.mask
    it = iter(refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = (next(it) for _ in range(6))
    qpos_ref = kvpos_ref = qseg_ref = kvseg_ref = None
    if has_pos:
        qpos_ref, kvpos_ref = next(it), next(it)
    if spec.segments:
        qseg_ref, kvseg_ref = next(it), next(it)
    dq_ref = next(it)

    bq, bk = cfg.block_q_dq, cfg.block_kv_dq
    i = pl.program_id(0)
    q_start = i * bq
    q = q_ref[...]
    do = do_ref[...]
    lse2 = lse_ref[...]
    delta = delta_ref[...]
    qside = make_side(spec, q_start, bq, is_query=True, pos_ref=qpos_ref, seg_ref=qseg_ref)
    qk_scale = cfg.scale * LOG2E

    def tile(dq, kv_start, kside, masked: bool):
        k = k_ref[pl.ds(kv_start, bk), :]
        v = v_ref[pl.ds(kv_start, bk), :]
        s = _dot(q, k, cfg, trans_b=True) * qk_scale
        if masked:
            s = jnp.where(element_mask(spec, qside, kside), s, -jnp.inf)
        p = jnp.exp2(s - lse2[:, None])
        dp = _dot(do, v, cfg, trans_b=True)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, cfg)

    lo, hi = kv_block_range(spec, q_start, bq, bk, n_kv_blocks)
    dq = _tile_loop(
        spec, lo, hi, lambda: kv_full_range(spec, q_start, bq, bk),
        lambda start: make_side(spec, start, bk, is_query=False, pos_ref=kvpos_ref, seg_ref=kvseg_ref),
        lambda kside, start: classify(spec, qside, kside, start, bk), tile, jnp.zeros(q.shape, jnp.float32), bk)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, do, lse2, delta, cfg: KernelConfig):
    """Padded backward. ``lse2``: float32 ``[B, Hq, Tp]`` base-2 logsumexp with ``+inf`` on rows that see no
    key; ``delta``: float32 ``[B, Hq, Tp]`` = ``rowsum(dO * O) - dlse``. Returns ``(dq, dk, dv)``."""
    b, tp, hq, d = q.shape
    sp, hkv, dvd = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    has_pos = q_pos is not None

    # dK, dV: grid over key tiles; each program covers the g query heads of its kv head.
    bq, bk = cfg.block_q_dkv, cfg.block_kv_dkv
    in_specs = [
        pl.BlockSpec((None, tp, g, d), lambda j, bi, h: (bi, 0, h, 0)),
        pl.BlockSpec((None, bk, None, d), lambda j, bi, h: (bi, j, h, 0)),
        pl.BlockSpec((None, bk, None, dvd), lambda j, bi, h: (bi, j, h, 0)),
        pl.BlockSpec((None, tp, g, dvd), lambda j, bi, h: (bi, 0, h, 0)),
        pl.BlockSpec((None, g, tp), lambda j, bi, h: (bi, h, 0)),
        pl.BlockSpec((None, g, tp), lambda j, bi, h: (bi, h, 0)),
    ]
    args = [q, k, v, do, lse2, delta]
    q_full = pl.BlockSpec((None, tp), lambda j, bi, h: (bi, 0))
    kv_tile = pl.BlockSpec((None, bk), lambda j, bi, h: (bi, j))
    if has_pos:
        in_specs += [q_full, kv_tile]
        args += [q_pos, kv_pos]
    if cfg.mask.segments:
        in_specs += [q_full, kv_tile]
        args += [q_seg, kv_seg]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg, has_pos=has_pos, n_q_blocks=tp // bq, group=g),
        grid=(sp // bk, b, hkv),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bk, None, d), lambda j, bi, h: (bi, j, h, 0)),
                   pl.BlockSpec((None, bk, None, dvd), lambda j, bi, h: (bi, j, h, 0))],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(cfg.num_warps_bwd, cfg.num_stages_bwd),
        interpret=cfg.interpret,
        name="flash_attention_bwd_dkdv",
    )(*args)

    # dQ: grid over query tiles.
    bq, bk = cfg.block_q_dq, cfg.block_kv_dq
    in_specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, bi, h: (bi, i, h, 0)),
        pl.BlockSpec((None, sp, None, d), lambda i, bi, h: (bi, 0, lax.div(h, g), 0)),
        pl.BlockSpec((None, sp, None, dvd), lambda i, bi, h: (bi, 0, lax.div(h, g), 0)),
        pl.BlockSpec((None, bq, None, dvd), lambda i, bi, h: (bi, i, h, 0)),
        pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, i)),
        pl.BlockSpec((None, None, bq), lambda i, bi, h: (bi, h, i)),
    ]
    args = [q, k, v, do, lse2, delta]
    q_tile = pl.BlockSpec((None, bq), lambda i, bi, h: (bi, i))
    kv_full = pl.BlockSpec((None, sp), lambda i, bi, h: (bi, 0))
    if has_pos:
        in_specs += [q_tile, kv_full]
        args += [q_pos, kv_pos]
    if cfg.mask.segments:
        in_specs += [q_tile, kv_full]
        args += [q_seg, kv_seg]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, has_pos=has_pos, n_kv_blocks=sp // bk),
        grid=(tp // bq, b, hq),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bq, None, d), lambda i, bi, h: (bi, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(cfg.num_warps_bwd, cfg.num_stages_bwd),
        interpret=cfg.interpret,
        name="flash_attention_bwd_dq",
    )(*args)
    return dq, dk, dv
