"""Public entry point of the Mamba-2 SSD kernels: argument checks, padding, the inter-chunk recurrence,
and one ``jax.custom_vjp`` per kernel pair."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels.ssd import _triton
from mani_jax.core.ssd import _check_ssd

Array = jax.Array

BACKENDS = ("triton",)
_MIN_BLOCK = 16  # tl.dot needs every matmul dimension >= 16


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def ssd_chunked(
    x: Array,
    dt: Array,
    A: Array,
    B: Array,
    C: Array,
    *,
    chunk_size: int,
    D: Array | None = None,
    initial_state: Array | None = None,
    segment_ids: Array | None = None,
    backend: str = "triton",
    block_t: int = 64,
    num_warps: int | None = 4,
    num_stages: int | None = 2,
    interpret: bool = False,
) -> tuple[Array, Array]:
    """Mamba-2 SSD by chunks as Pallas kernels, forward and backward.

    Same arguments, semantics and outputs as :func:`mani_jax.core.ssd.ssd_chunked` (the reference it is
    tested against): per head, ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T``, ``y_t = h_t C_t + D x_t``;
    layout ``[batch, seq, heads, ...]``; grouped ``B``/``C`` (head ``i`` reads group ``i // (h / g)``);
    packed ``segment_ids`` (no state crosses a change of id); ``initial_state`` in, ``final_state`` out
    (what prefill hands to decoding). Differentiable: gradients for ``x, dt, A, B, C, D`` and
    ``initial_state``.

    Algorithm: Dao & Gu 2024 ("Transformers are SSMs", arXiv 2405.21060, Sec. 6 / Listing 1), in three
    phases: (1) a kernel computes each chunk's own end state ``sum_j exp(a_end - a_j) dt_j x_j B_j^T``;
    (2) the recurrence over chunks ``S_c = exp(a_end(c-1)) S_{c-1} + s_{c-1}`` runs in ``jnp`` (a
    ``lax.scan`` over ``seq / chunk`` steps of ``[b, h, p, n]`` elementwise work: small next to the chunk
    matmuls, and XLA fuses it); (3) a kernel computes the outputs, the intra-chunk "attention-like" term
    ``(L o C B^T)(dt x)`` with ``L = exp(segsum(dt A))`` fused with the state term ``exp(a_i) C_i S_c^T``.
    The backward has one kernel per phase-1/3 kernel (see :mod:`kernels.ssd._triton`); the cumulative sums
    of ``dt A``, the segment masks, the recurrence and the ``D`` skip term are ``jnp`` and differentiate by
    autodiff. All kernel math accumulates in float32; matmul operands are in the input dtype.

    Args:
      x: ``[b, l, h, p]`` float32 / bfloat16 / float16.
      dt: ``[b, l, h]`` (after softplus); A: ``[h]``; B, C: ``[b, l, g, n]`` (same dtype as each other);
        D: ``[h]`` or None; initial_state: ``[b, h, p, n]`` or None (zeros); segment_ids: int ``[b, l]`` or
        None.
      chunk_size: tokens per chunk. The kernels use ``max(16, next_pow2(chunk_size))`` (``tl.dot`` needs
        power-of-two tiles >= 16); the result does not depend on the chunk size beyond float rounding.
        ``seq`` need not be a multiple (padded with ``dt = 0``: no decay, no input, as the reference).
      backend: ``"triton"``: the Pallas Triton lowering (NVIDIA Ampere or newer; any backend with
        ``interpret=True``).
      block_t: tokens per tile inside a chunk (power of two >= 16; clamped to the chunk).
      num_warps, num_stages: Triton launch parameters of every kernel.
      interpret: run the kernels in Pallas interpret mode (CPU, for testing; slow).

    Returns:
      ``(y [b, l, h, p] in x.dtype, final_state [b, h, p, n] float32)``.

    Raises:
      ValueError: inconsistent shapes (as the reference), a non-positive ``chunk_size``, an unknown
        backend, a ``block_t`` that is not a power of two >= 16, or a non-float / mismatched dtype.
    """
    b, l, h, p, g, n = _check_ssd(x, dt, A, B, C, D)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        raise ValueError(f"initial_state: expected shape {(b, h, p, n)}, got {initial_state.shape}")
    if segment_ids is not None:
        if segment_ids.shape != (b, l):
            raise ValueError(f"segment_ids: expected shape {(b, l)}, got {segment_ids.shape}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids: expected an integer dtype, got {segment_ids.dtype}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if not isinstance(block_t, int) or block_t < _MIN_BLOCK or block_t & (block_t - 1):
        raise ValueError(f"block_t: expected a power of two >= {_MIN_BLOCK}, got {block_t!r}")
    floats = (jnp.float16, jnp.bfloat16, jnp.float32)
    if x.dtype not in floats:
        raise ValueError(f"x: expected float16, bfloat16 or float32, got {x.dtype}")
    if B.dtype != C.dtype or B.dtype not in floats:
        raise ValueError(f"B, C: expected one float dtype, got {B.dtype} and {C.dtype}")
    q = max(_MIN_BLOCK, _next_pow2(chunk_size))
    cfg = _triton.KernelConfig(
        chunk=q, block_t=min(block_t, q), heads_per_group=h // g, segments=segment_ids is not None,
        num_warps=num_warps, num_stages=num_stages, interpret=bool(interpret),
        precision=lax.Precision.HIGHEST if x.dtype == jnp.float32 else None)
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    return _run(x, dt, A, B, C, D, initial_state, seg, cfg=cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _run(x, dt, A, B, C, D, initial_state, seg, *, cfg):
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    q = cfg.chunk
    nc = -(-l // q)
    lp, pp, np_ = nc * q, max(_MIN_BLOCK, _next_pow2(p)), max(_MIN_BLOCK, _next_pow2(n))
    f32 = jnp.float32

    # Pad: seq to whole chunks (dt = 0: decay 1 and no input), p and n to powers of two (zeros change no
    # product). B, C stay in their dtype (the kernels read them as matmul operands).
    xp = jnp.pad(x, ((0, 0), (0, lp - l), (0, 0), (0, pp - p)))
    Bp = jnp.pad(B.astype(x.dtype), ((0, 0), (0, lp - l), (0, 0), (0, np_ - n)))
    Cp = jnp.pad(C.astype(x.dtype), ((0, 0), (0, lp - l), (0, 0), (0, np_ - n)))
    dtT = jnp.pad(dt.astype(f32), ((0, 0), (0, lp - l), (0, 0))).transpose(0, 2, 1)  # [b, h, lp]
    a = (dtT * A.astype(f32)[None, :, None]).reshape(b, h, nc, q)
    a_cs = jnp.cumsum(a, axis=-1)  # chunk-local inclusive cumulative log-decay
    a_end = a_cs[..., -1]  # [b, h, nc]
    e = a_end[..., None] - a_cs  # log-decay from each token to its chunk's end
    segc = None
    if seg is not None:
        seg = jnp.pad(seg, ((0, 0), (0, lp - l)), mode="edge")
        segc = seg.reshape(b, nc, q)
        # Only tokens of the chunk's last segment reach its end state.
        e = jnp.where((segc == segc[..., -1:])[:, None], e, -jnp.inf)

    states = _chunk_state(xp, dtT, e.reshape(b, h, lp), Bp, cfg)  # [b, nc, h, pp, np]

    # Inter-chunk recurrence (jnp): S_c = exp(a_end(c-1)) * keep * S_{c-1} + s_{c-1}.
    if initial_state is None:
        s0 = jnp.zeros((b, h, pp, np_), f32)
    else:
        s0 = jnp.pad(initial_state.astype(f32), ((0, 0), (0, 0), (0, pp - p), (0, np_ - n)))
    if seg is not None:
        seg0, end_seg = segc[:, 0, 0], segc[:, :, -1]
    else:
        seg0, end_seg = jnp.zeros((b,), jnp.int32), jnp.zeros((b, nc), jnp.int32)

    def step(carry, inp):
        state, state_seg = carry
        decay, new, seg_end = inp
        keep = (state_seg == seg_end).astype(f32)[:, None, None, None]
        return (state * decay[:, :, None, None] * keep + new, seg_end), (state, state_seg)

    (final, _), (states_in, states_in_seg) = lax.scan(
        step, (s0, seg0), (jnp.exp(a_end).transpose(2, 0, 1), states.transpose(1, 0, 2, 3, 4), end_seg.T))
    states_in = states_in.transpose(1, 0, 2, 3, 4)  # state entering each chunk [b, nc, h, pp, np]
    f = a_cs
    if seg is not None:  # the incoming state reaches only the tokens of its own segment
        f = jnp.where((segc == states_in_seg.T[:, :, None])[:, None], f, -jnp.inf)

    y = _chunk_output(xp, dtT, a_cs.reshape(b, h, lp), f.reshape(b, h, lp), Bp, Cp, seg, states_in, cfg)
    y = y[:, :l, :, :p]
    if D is not None:
        y = (y.astype(f32) + x.astype(f32) * D.astype(f32)[:, None]).astype(x.dtype)
    return y, final[:, :, :p, :n]


def _group_sum(d_per_head, heads_per_group, dtype):
    b, l, h, n = d_per_head.shape
    return d_per_head.reshape(b, l, h // heads_per_group, heads_per_group, n).sum(3).astype(dtype)


# Phase 1: chunk states.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunk_state(x, dt, e, B, cfg):
    return _triton.chunk_state_fwd(x, dt, e, B, cfg)


def _chunk_state_fwd(x, dt, e, B, cfg):
    return _triton.chunk_state_fwd(x, dt, e, B, cfg), (x, dt, e, B)


def _chunk_state_bwd(cfg, res, ds):
    x, dt, e, B = res
    dx, ddt, de, db = _triton.chunk_state_bwd(x, dt, e, B, ds, cfg)
    return dx.astype(x.dtype), ddt, de, _group_sum(db, cfg.heads_per_group, B.dtype)


_chunk_state.defvjp(_chunk_state_fwd, _chunk_state_bwd)


# Phase 3: outputs (intra-chunk + incoming state).
@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _chunk_output(x, dt, a, f, B, C, seg, states, cfg):
    return _triton.chunk_output_fwd(x, dt, a, f, B, C, seg, states, cfg)


def _chunk_output_fwd(x, dt, a, f, B, C, seg, states, cfg):
    return _triton.chunk_output_fwd(x, dt, a, f, B, C, seg, states, cfg), (x, dt, a, f, B, C, seg, states)


def _chunk_output_bwd(cfg, res, dy):
    x, dt, a, f, B, C, seg, states = res
    dx, ddt, da, df, db, dc, ds = _triton.chunk_output_bwd(x, dt, a, f, B, C, seg, states, dy, cfg)
    hpg = cfg.heads_per_group
    return (dx.astype(x.dtype), ddt, da, df, _group_sum(db, hpg, B.dtype), _group_sum(dc, hpg, C.dtype), None, ds)


_chunk_output.defvjp(_chunk_output_fwd, _chunk_output_bwd)
