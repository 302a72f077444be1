"""Mamba-2 SSD chunk kernels (forward and backward) for the Pallas Triton lowering (or interpret mode).

Inputs arrive padded by :mod:`kernels.ssd.api`: the sequence to a multiple of the chunk ``Q`` (a power of
two >= 16), head dim ``p`` and state size ``n`` to powers of two >= 16. Layouts: ``x [b, L, h, p]``;
``dt``, log-decays ``a``, ``e``, ``f`` float32 ``[b, h, L]``; grouped ``B, C [b, L, g, n]`` (head ``i``
reads group ``i // (h / g)`` through the index map); segment ids int32 ``[b, L]``; per-chunk states
float32 ``[b, n_chunks, h, p, n]``.

For one (chunk, batch, head), with ``u = x * dt`` (Dao & Gu 2024, arXiv 2405.21060, Sec. 6)::

    chunk state   s = sum_j exp(e_j) u_j^T B_j                          e_j = a_{Q-1} - a_j  (or -inf)
    output        y_i = sum_{j <= i} (C_i . B_j) exp(a_i - a_j) u_j  +  exp(f_i) C_i S^T     f_i = a_i (or -inf)

where ``a`` is the chunk-local inclusive cumulative sum of ``dt * A`` and ``S [p, n]`` the state entering
the chunk. ``e``/``f`` carry the packed-segment masks as ``-inf`` (computed in ``jnp``); the intra-chunk
segment mask ``seg_i == seg_j`` is applied in the kernel.

Kernels (five), each with grid ``(n_chunks, batch, heads)`` and a loop over ``block_t``-token tiles of its chunk:

* ``chunk_state_fwd``: accumulates ``s`` (float32 ``[p, n]``) over the tiles.
* ``chunk_state_bwd``: from ``ds``: ``dB = (u w)^T ds``-rows, ``du = B ds^T w``, ``d dt``, ``de`` per tile.
* ``chunk_output_fwd``: per row tile, the state term ``exp(f) C S^T`` plus the causal intra-chunk sum over
  column tiles ``j <= i`` of ``((C_i B_j^T) o exp(a_i - a_j) o mask) u_j`` (the "attention-like" diagonal
  block; the ``[Q, Q]`` matrix exists only tile by tile in registers).
* ``chunk_output_bwd_rows`` / ``_cols``: with ``P = G o M``, ``dP = dy_i u_j^T``, ``dG = dP o M``,
  ``R = dP o P``: the row kernel loops row tiles ``i`` (outer) and ``j <= i`` (inner) for
  ``dC_i += dG B_j`` and ``da_i += rowsum R``, plus the state terms ``dC += exp(f) dy S``,
  ``df = exp(f) rowsum(dy o C S^T)``, ``dS = (exp(f) dy)^T C``; the column kernel loops ``j`` (outer) and
  ``i >= j`` (inner) for ``du_j += P^T dy_i``, ``dB_j += dG^T C_i``, ``da_j -= colsum R``. Each output
  element is written once by one program (no read-modify-write of global memory, which Triton does not
  order between threads without a barrier); ``G``, ``M``, ``dP`` are computed in both.

Matmul operands are cast to the input dtype (bf16 tensor-core dots) and accumulate in float32; float32
inputs use ``Precision.HIGHEST`` (no TF32). Gradients w.r.t. B and C are written per head (float32) and
summed over each group's heads in ``jnp``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static configuration of one SSD call (hashable, so jit/custom_vjp can key on it)."""

    chunk: int  # Q: tokens per chunk (power of two >= 16)
    block_t: int  # tokens per tile inside a chunk (power of two >= 16, divides chunk)
    heads_per_group: int
    segments: bool
    num_warps: int | None
    num_stages: int | None
    interpret: bool
    precision: lax.Precision | None  # HIGHEST for float32 inputs, None for 16-bit


def _params(cfg: KernelConfig):
    return pl_triton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _dot(a, b, cfg: KernelConfig, mm_dtype, *, trans_a=False, trans_b=False):
    return pl_triton.dot(a.astype(mm_dtype), b.astype(mm_dtype), trans_a=trans_a, trans_b=trans_b,
                         precision=cfg.precision)


def _tile(i, bt):
    return pl.ds(pl.multiple_of(i * bt, bt), bt)


def _decay_matrix(a_i, a_j, seg_i, seg_j, i, j, bt):
    """``M[r, c] = exp(a_i[r] - a_j[c])`` where token ``j*bt + c <= i*bt + r`` (and same segment), else 0."""
    rows = i * bt + lax.broadcasted_iota(jnp.int32, (bt, bt), 0)
    cols = j * bt + lax.broadcasted_iota(jnp.int32, (bt, bt), 1)
    mask = cols <= rows
    if seg_i is not None:
        mask = mask & (seg_i[:, None] == seg_j[None, :])
    return jnp.exp(jnp.where(mask, a_i[:, None] - a_j[None, :], -jnp.inf))


# ------------------------------------------------------------------------------------------ specs

def _specs(cfg: KernelConfig, p: int, n: int, names):
    """BlockSpecs (grid ``(c, b, h)``) of whole-chunk operands by name."""
    q, hpg = cfg.chunk, cfg.heads_per_group
    table = {
        "x": pl.BlockSpec((None, q, None, p), lambda c, b, h: (b, c, h, 0)),
        "tok": pl.BlockSpec((None, None, q), lambda c, b, h: (b, h, c)),  # dt, a, e, f: [b, h, L]
        "seg": pl.BlockSpec((None, q), lambda c, b, h: (b, c)),
        "bc": pl.BlockSpec((None, q, None, n), lambda c, b, h: (b, c, lax.div(h, hpg), 0)),
        "bc_head": pl.BlockSpec((None, q, None, n), lambda c, b, h: (b, c, h, 0)),
        "state": pl.BlockSpec((None, None, None, p, n), lambda c, b, h: (b, c, h, 0, 0)),
    }
    return [table[k] for k in names]


# ------------------------------------------------------------------------------------- chunk state

def _state_fwd_kernel(x_ref, dt_ref, e_ref, b_ref, s_ref, *, cfg: KernelConfig):
    bt = cfg.block_t
    mm = x_ref.dtype

    def body(j, s):
        sl = _tile(j, bt)
        w = jnp.exp(e_ref[sl]) * dt_ref[sl]  # [bt]
        xw = x_ref[sl, :].astype(jnp.float32) * w[:, None]  # [bt, p]
        return s + _dot(xw, b_ref[sl, :], cfg, mm, trans_a=True)  # [p, n]

    p, n = s_ref.shape
    s_ref[...] = lax.fori_loop(0, cfg.chunk // bt, body, jnp.zeros((p, n), jnp.float32))


def chunk_state_fwd(x, dt, e, B, cfg: KernelConfig):
    """``x [b, L, h, p]``, ``dt``/``e`` float32 ``[b, h, L]``, ``B [b, L, g, n]`` -> float32 chunk states
    ``[b, L / Q, h, p, n]`` (each chunk's own contribution to the state at its end)."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    nc = l // cfg.chunk
    return pl.pallas_call(
        functools.partial(_state_fwd_kernel, cfg=cfg), grid=(nc, b, h),
        in_specs=_specs(cfg, p, n, ("x", "tok", "tok", "bc")),
        out_specs=_specs(cfg, p, n, ("state",))[0],
        out_shape=jax.ShapeDtypeStruct((b, nc, h, p, n), jnp.float32),
        compiler_params=_params(cfg), interpret=cfg.interpret, name="ssd_chunk_state_fwd",
    )(x, dt, e, B)


def _state_bwd_kernel(x_ref, dt_ref, e_ref, b_ref, ds_ref, dx_ref, ddt_ref, de_ref, db_ref, *,
                      cfg: KernelConfig):
    bt = cfg.block_t
    mm = x_ref.dtype
    ds = ds_ref[...]  # [p, n] float32

    def body(j, carry):
        sl = _tile(j, bt)
        x = x_ref[sl, :].astype(jnp.float32)
        dt = dt_ref[sl]
        ee = jnp.exp(e_ref[sl])
        w = ee * dt
        db_ref[sl, :] = _dot(x * w[:, None], ds, cfg, mm)  # [bt, n]
        dxw = _dot(b_ref[sl, :], ds, cfg, mm, trans_b=True)  # [bt, p] = d(x w)
        dx_ref[sl, :] = dxw * w[:, None]
        dw = jnp.sum(dxw * x, axis=1)
        ddt_ref[sl] = dw * ee
        de_ref[sl] = dw * w
        return carry

    lax.fori_loop(0, cfg.chunk // bt, body, 0)


def chunk_state_bwd(x, dt, e, B, ds, cfg: KernelConfig):
    """Cotangents of :func:`chunk_state_fwd` for ``ds [b, nc, h, p, n]``: ``(dx [b, L, h, p], ddt [b, h, L],
    de [b, h, L], dB_per_head [b, L, h, n])``, all float32."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    nc = l // cfg.chunk
    f32 = jnp.float32
    return pl.pallas_call(
        functools.partial(_state_bwd_kernel, cfg=cfg), grid=(nc, b, h),
        in_specs=_specs(cfg, p, n, ("x", "tok", "tok", "bc", "state")),
        out_specs=_specs(cfg, p, n, ("x", "tok", "tok", "bc_head")),
        out_shape=[jax.ShapeDtypeStruct((b, l, h, p), f32), jax.ShapeDtypeStruct((b, h, l), f32),
                   jax.ShapeDtypeStruct((b, h, l), f32), jax.ShapeDtypeStruct((b, l, h, n), f32)],
        compiler_params=_params(cfg), interpret=cfg.interpret, name="ssd_chunk_state_bwd",
    )(x, dt, e, B, ds)


# ------------------------------------------------------------------------------------ chunk output

def _unpack(refs, cfg: KernelConfig, n_in: int):
    """Split ``refs`` into inputs (with ``seg`` None when there are no segment ids) and outputs."""
    refs = list(refs)
    ins = refs[:n_in]
    if cfg.segments:
        seg = ins.pop(4)
    else:
        seg = None
    return ins, seg, refs[n_in:]


def _output_fwd_kernel(*refs, cfg: KernelConfig):
    (x_ref, dt_ref, a_ref, f_ref, b_ref, c_ref, s_ref), seg_ref, (y_ref,) = _unpack(refs, cfg,
                                                                                   8 if cfg.segments else 7)
    bt, nt = cfg.block_t, cfg.chunk // cfg.block_t
    mm = x_ref.dtype
    state = s_ref[...]  # [p, n] float32

    def row(i, carry):
        si = _tile(i, bt)
        ci = c_ref[si, :]
        ai = a_ref[si]
        segi = None if seg_ref is None else seg_ref[si]
        acc = jnp.exp(f_ref[si])[:, None] * _dot(ci, state, cfg, mm, trans_b=True)  # [bt, p]

        def col(j, acc):
            sj = _tile(j, bt)
            segj = None if seg_ref is None else seg_ref[sj]
            g = _dot(ci, b_ref[sj, :], cfg, mm, trans_b=True)  # [bt, bt]
            pm = g * _decay_matrix(ai, a_ref[sj], segi, segj, i, j, bt)
            u = x_ref[sj, :].astype(jnp.float32) * dt_ref[sj][:, None]
            return acc + _dot(pm, u, cfg, mm)

        acc = lax.fori_loop(0, i + 1, col, acc)
        y_ref[si, :] = acc.astype(y_ref.dtype)
        return carry

    lax.fori_loop(0, nt, row, 0)


def _output_args(x, dt, a, f, B, C, seg, states):
    args = [x, dt, a, f] + ([seg] if seg is not None else []) + [B, C, states]
    names = ["x", "tok", "tok", "tok"] + (["seg"] if seg is not None else []) + ["bc", "bc", "state"]
    return args, names


def chunk_output_fwd(x, dt, a, f, B, C, seg, states, cfg: KernelConfig):
    """``y [b, L, h, p]`` (x's dtype) from the padded inputs and the states entering each chunk
    ``states [b, nc, h, p, n]`` (float32). ``a``: chunk-local cumulative log-decay; ``f``: ``a`` or ``-inf``
    where the incoming state does not reach (another segment); ``seg``: int32 ``[b, L]`` or None."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    args, names = _output_args(x, dt, a, f, B, C, seg, states)
    return pl.pallas_call(
        functools.partial(_output_fwd_kernel, cfg=cfg), grid=(l // cfg.chunk, b, h),
        in_specs=_specs(cfg, p, n, names),
        out_specs=_specs(cfg, p, n, ("x",))[0],
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=_params(cfg), interpret=cfg.interpret, name="ssd_chunk_output_fwd",
    )(*args)


def _output_bwd_rows_kernel(*refs, cfg: KernelConfig):
    """Row side of the output backward: each row tile ``i`` accumulates over column tiles ``j <= i``."""
    ins, seg_ref, outs = _unpack(refs, cfg, 9 if cfg.segments else 8)
    x_ref, dt_ref, a_ref, f_ref, b_ref, c_ref, s_ref, dy_ref = ins
    da_ref, df_ref, dc_ref, ds_ref = outs
    bt, nt = cfg.block_t, cfg.chunk // cfg.block_t
    mm = x_ref.dtype
    state = s_ref[...]  # [p, n] float32

    def row(i, ds):
        si = _tile(i, bt)
        ci = c_ref[si, :]
        ai = a_ref[si]
        segi = None if seg_ref is None else seg_ref[si]
        dyi = dy_ref[si, :]
        dy32 = dyi.astype(jnp.float32)
        # State terms: dC = exp(f) dy S, df = exp(f) rowsum(dy o C S^T), dS += (exp(f) dy)^T C.
        ef = jnp.exp(f_ref[si])
        cs = _dot(ci, state, cfg, mm, trans_b=True)  # [bt, p]
        df_ref[si] = ef * jnp.sum(dy32 * cs, axis=1)
        dc = ef[:, None] * _dot(dy32, state, cfg, mm)  # [bt, n]

        def col(j, acc):  # intra-chunk: dC_i += (dP o M) B_j, da_i += rowsum(dP o P)
            dc, da = acc
            sj = _tile(j, bt)
            bj = b_ref[sj, :]
            segj = None if seg_ref is None else seg_ref[sj]
            m = _decay_matrix(ai, a_ref[sj], segi, segj, i, j, bt)
            pm = _dot(ci, bj, cfg, mm, trans_b=True) * m  # P = G o M
            uj = x_ref[sj, :].astype(jnp.float32) * dt_ref[sj][:, None]
            dp = _dot(dyi, uj, cfg, mm, trans_b=True)  # dP = dy_i u_j^T
            return dc + _dot(dp * m, bj, cfg, mm), da + jnp.sum(dp * pm, axis=1)

        dc, da = lax.fori_loop(0, i + 1, col, (dc, jnp.zeros((bt,), jnp.float32)))
        dc_ref[si, :] = dc
        da_ref[si] = da
        return ds + _dot(dy32 * ef[:, None], ci, cfg, mm, trans_a=True)  # [p, n]

    p, n = ds_ref.shape
    ds_ref[...] = lax.fori_loop(0, nt, row, jnp.zeros((p, n), jnp.float32))


def _output_bwd_cols_kernel(*refs, cfg: KernelConfig):
    """Column side of the output backward: each column tile ``j`` accumulates over row tiles ``i >= j``."""
    ins, seg_ref, outs = _unpack(refs, cfg, 9 if cfg.segments else 8)
    x_ref, dt_ref, a_ref, f_ref, b_ref, c_ref, s_ref, dy_ref = ins
    dx_ref, ddt_ref, da_ref, db_ref = outs
    bt, nt = cfg.block_t, cfg.chunk // cfg.block_t
    mm = x_ref.dtype
    n = b_ref.shape[-1]

    def col(j, carry):
        sj = _tile(j, bt)
        bj = b_ref[sj, :]
        aj = a_ref[sj]
        segj = None if seg_ref is None else seg_ref[sj]
        xj = x_ref[sj, :].astype(jnp.float32)
        dtj = dt_ref[sj]
        uj = xj * dtj[:, None]

        def row(i, acc):  # du_j += P^T dy_i, dB_j += (dP o M)^T C_i, da_j -= colsum(dP o P)
            du, db, da = acc
            si = _tile(i, bt)
            ci = c_ref[si, :]
            segi = None if seg_ref is None else seg_ref[si]
            dyi = dy_ref[si, :]
            m = _decay_matrix(a_ref[si], aj, segi, segj, i, j, bt)
            pm = _dot(ci, bj, cfg, mm, trans_b=True) * m
            dp = _dot(dyi, uj, cfg, mm, trans_b=True)
            return (du + _dot(pm, dyi, cfg, mm, trans_a=True), db + _dot(dp * m, ci, cfg, mm, trans_a=True),
                    da - jnp.sum(dp * pm, axis=0))

        init = (jnp.zeros(uj.shape, jnp.float32), jnp.zeros((bt, n), jnp.float32), jnp.zeros((bt,), jnp.float32))
        du, db, da = lax.fori_loop(j, nt, row, init)
        da_ref[sj] = da
        db_ref[sj, :] = db
        dx_ref[sj, :] = du * dtj[:, None]
        ddt_ref[sj] = jnp.sum(du * xj, axis=1)
        return carry

    lax.fori_loop(0, nt, col, 0)


def chunk_output_bwd(x, dt, a, f, B, C, seg, states, dy, cfg: KernelConfig):
    """Cotangents of :func:`chunk_output_fwd` for ``dy``: ``(dx [b, L, h, p], ddt, da, df [b, h, L],
    dB_per_head, dC_per_head [b, L, h, n], dstates [b, nc, h, p, n])``, all float32.

    Two kernels, so that every output element is written exactly once (no read-modify-write of global
    memory, which Triton does not order between a program's threads): the row kernel (``dC``, ``df``,
    ``dS`` and the row half of ``da``) and the column kernel (``dx``, ``d dt``, ``dB`` and the column half
    of ``da``); each recomputes ``G``, ``M`` and ``dP`` (7 matmuls per tile pair instead of 5)."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    nc = l // cfg.chunk
    f32 = jnp.float32
    args, names = _output_args(x, dt, a, f, B, C, seg, states)
    in_specs = _specs(cfg, p, n, names + ["x"])
    tok = jax.ShapeDtypeStruct((b, h, l), f32)
    per_head = jax.ShapeDtypeStruct((b, l, h, n), f32)
    da_rows, df, dc, ds = pl.pallas_call(
        functools.partial(_output_bwd_rows_kernel, cfg=cfg), grid=(nc, b, h),
        in_specs=in_specs,
        out_specs=_specs(cfg, p, n, ("tok", "tok", "bc_head", "state")),
        out_shape=[tok, tok, per_head, jax.ShapeDtypeStruct((b, nc, h, p, n), f32)],
        compiler_params=_params(cfg), interpret=cfg.interpret, name="ssd_chunk_output_bwd_rows",
    )(*args, dy)
    dx, ddt, da_cols, db = pl.pallas_call(
        functools.partial(_output_bwd_cols_kernel, cfg=cfg), grid=(nc, b, h),
        in_specs=in_specs,
        out_specs=_specs(cfg, p, n, ("x", "tok", "tok", "bc_head")),
        out_shape=[jax.ShapeDtypeStruct((b, l, h, p), f32), tok, tok, per_head],
        compiler_params=_params(cfg), interpret=cfg.interpret, name="ssd_chunk_output_bwd_cols",
    )(*args, dy)
    return dx, ddt, da_rows + da_cols, df, db, dc, ds
