"""Public entry point of the flash-attention kernels: argument checks, padding, block sizes, custom VJP."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from kernels.flash_attention import _triton
from kernels.flash_attention._masking import MaskSpec
from mani_jax.core.attention import _check_qkv, _validate_options

Array = jax.Array

BACKENDS = ("triton",)
_MIN_BLOCK = 16  # tl.dot needs every matmul dimension >= 16


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and Triton launch parameters of the forward and the two backward kernels.

    Attributes:
      block_q, block_kv: forward tile (queries x keys).
      block_q_dkv, block_kv_dkv: dK/dV kernel tile (the key tile stays resident, query tiles stream).
      block_q_dq, block_kv_dq: dQ kernel tile (the query tile stays resident, key tiles stream).
      num_warps, num_stages: Triton launch parameters of the forward kernel (None = Triton's default).
      num_warps_bwd, num_stages_bwd: the same for both backward kernels.

    Every block must be a power of two >= 16 (Triton's ``tl.dot`` minimum).
    """

    block_q: int = 64
    block_kv: int = 64
    block_q_dkv: int = 64
    block_kv_dkv: int = 64
    block_q_dq: int = 64
    block_kv_dq: int = 64
    num_warps: int | None = 4
    num_stages: int | None = 2
    num_warps_bwd: int | None = 4
    num_stages_bwd: int | None = 2

    @classmethod
    def baseline(cls) -> "BlockSizes":
        """The FlashAttention-2 baseline the project documents: 64x64 tiles in all three kernels."""
        return cls()

    @classmethod
    def for_shape(cls, head_dim: int, dtype) -> "BlockSizes":
        """Default tiles for a head dim and dtype (see ``docs/kernels.md``, "Block sizes").

        Not tuned on hardware yet (no GPU was available when this was written): the 16-bit rows follow the
        shapes the Triton FlashAttention tutorial and JAX's Pallas ``ops/gpu/attention.py`` use on A100/H100
        (128x64 forward tiles; narrow-by-wide backward tiles so the resident side is the wide one), sized so
        the float32 dK and dV accumulators of the resident key tile (``2 * block_kv_dkv * head_dim`` floats
        over ``32 * num_warps_bwd`` threads) take at most 128 registers per thread; float32 inputs halve
        every tile (twice the bytes per element).
        """
        wide = jnp.dtype(dtype).itemsize >= 4
        if head_dim <= 64:
            bs = cls(128, 64, 32, 128, 128, 32, 4, 3, 4, 3)
        elif head_dim <= 128:
            bs = cls(128, 64, 32, 64, 64, 32, 8, 3, 8, 2)
        else:
            bs = cls(64, 32, 16, 32, 32, 16, 8, 2, 8, 1)
        if wide:
            bs = dataclasses.replace(bs, **{f: max(_MIN_BLOCK, getattr(bs, f) // 2) for f in _BLOCK_FIELDS})
        return bs


_BLOCK_FIELDS = ("block_q", "block_kv", "block_q_dkv", "block_kv_dkv", "block_q_dq", "block_kv_dq")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _check_int_array(name: str, x, shape):
    if x is None:
        return
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name}: expected an integer dtype, got {x.dtype}")


def flash_attention(
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
    backend: str = "triton",
    block_q: int | None = None,
    block_kv: int | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> Array | tuple[Array, Array]:
    """IO-aware exact attention ``softmax(q k^T * scale + mask) v`` as Pallas kernels, forward and backward.

    Same arguments, semantics and outputs as :func:`mani_jax.core.attention` (the reference it is tested
    against): layout ``[batch, seq, heads, head_dim]``; grouped-query heads (query head ``h`` reads kv head
    ``h // (n_heads // n_kv_heads)``); causal masking by position with queries aligned to the end of the
    keys by default (query ``t`` at position ``seq_kv - seq_q + t``); packed-document segment ids; a
    Mistral-convention sliding window; optional logsumexp. Differentiable (``jax.custom_vjp``): gradients
    for ``q``, ``k``, ``v``, including through ``lse`` when ``return_lse``.

    Algorithm: FlashAttention-2 (Dao 2023, arXiv 2307.08691, Alg. 1 and 2): the online softmax
    ``m_j = max(m_{j-1}, rowmax(S_j))``, ``l_j = e^{m_{j-1}-m_j} l_{j-1} + rowsum(e^{S_j - m_j})``,
    ``O_j = e^{m_{j-1}-m_j} O_{j-1} + e^{S_j - m_j} V_j`` over key tiles, ``O = O_N / l_N``,
    ``lse = m_N + log l_N``; backward recomputes ``P = exp(S - lse)`` tile by tile with
    ``dP = dO V^T``, ``dS = P * (dP - delta)``, ``delta = rowsum(dO * O)``, ``dQ = scale dS K``,
    ``dK = scale dS^T Q``, ``dV = P^T dO``. Memory is O(seq) beyond the inputs: only ``out`` and ``lse``
    are stored, never the ``[seq_q, seq_kv]`` matrix. Tiles that the mask hides entirely are skipped
    (causal upper triangle and outside the sliding window by loop bounds; other tiles, e.g. different
    segments, by a per-tile min/max test); tiles that the mask does not touch skip the element mask.

    Args:
      q: ``[batch, seq_q, n_heads, head_dim]``, float16 / bfloat16 / float32.
      k: ``[batch, seq_kv, n_kv_heads, head_dim]``, same dtype; ``n_heads % n_kv_heads == 0``.
      v: ``[batch, seq_kv, n_kv_heads, head_dim_v]``, same dtype.
      causal, segment_ids, kv_segment_ids, q_positions, kv_positions, sliding_window, softmax_scale,
        return_lse: as :func:`mani_jax.core.attention` (int ``[batch, seq]`` ids/positions; window a
        positive int). Explicit positions disable the causal/window loop bounds (tiles are still skipped by
        the per-tile test).
      backend: ``"triton"``: the Pallas Triton lowering (NVIDIA Ampere or newer; any backend with
        ``interpret=True``).
      block_q, block_kv: one tile size for all three kernels (powers of two >= 16), e.g. 64 and 64 for the
        FlashAttention-2 baseline; default: :meth:`BlockSizes.for_shape`. Clamped to the (power-of-two
        rounded) sequence lengths.
      block_sizes: full control over the forward and backward tiles and launch parameters (exclusive
        with ``block_q`` / ``block_kv``).
      interpret: run the kernels in Pallas interpret mode (CPU, for testing; slow).

    Returns:
      ``out [batch, seq_q, n_heads, head_dim_v]`` in q's dtype, and with ``return_lse`` also ``lse``
      float32 ``[batch, seq_q, n_heads]``. A query that sees no key gives zeros and ``lse = -inf`` (never
      NaN), and zero gradients.

    Raises:
      ValueError: mismatched shapes or head counts, a dtype other than float16/bfloat16/float32 (or q, k, v
        differing), non-integer or mis-shaped ids/positions, a bad window, an unknown backend, a block size
        that is not a power of two >= 16, or both ``block_sizes`` and ``block_q``/``block_kv``.
    """
    b, t, s, hq, hkv, d = _check_qkv(q, k, v)
    _validate_options(segment_ids, kv_segment_ids, t, s, sliding_window)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in (jnp.float16, jnp.bfloat16, jnp.float32):
            raise ValueError(f"{name}: expected float16, bfloat16 or float32, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if t == 0 or s == 0:
        raise ValueError(f"q, k: expected non-empty sequences, got seq_q={t}, seq_kv={s}")
    _check_int_array("segment_ids", segment_ids, (b, t))
    _check_int_array("kv_segment_ids", kv_segment_ids, (b, s))
    _check_int_array("q_positions", q_positions, (b, t))
    _check_int_array("kv_positions", kv_positions, (b, s))
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, numbers.Integral):
            raise ValueError(f"sliding_window: expected None or a positive int, got {sliding_window!r}")
        sliding_window = int(sliding_window)  # static (part of the kernels' configuration)
    if block_sizes is not None and (block_q is not None or block_kv is not None):
        raise ValueError("block_sizes: give either block_sizes or block_q/block_kv, not both")
    if block_sizes is None:
        block_sizes = BlockSizes.for_shape(d, q.dtype)
        if block_q is not None or block_kv is not None:
            bq = block_sizes.block_q if block_q is None else block_q
            bk = block_sizes.block_kv if block_kv is None else block_kv
            block_sizes = dataclasses.replace(block_sizes, block_q=bq, block_kv=bk, block_q_dkv=bq,
                                              block_kv_dkv=bk, block_q_dq=bq, block_kv_dq=bk)
    for f in _BLOCK_FIELDS:
        val = getattr(block_sizes, f)
        if not isinstance(val, int) or val < _MIN_BLOCK or val & (val - 1):
            name = f if f in ("block_q", "block_kv") else f"block_sizes.{f}"
            raise ValueError(f"{name}: expected a power of two >= {_MIN_BLOCK}, got {val!r}")
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)

    # Clamp tiles to the sequence (rounded up to a power of two) so short sequences are not over-padded.
    cap_q, cap_kv = max(_MIN_BLOCK, _next_pow2(t)), max(_MIN_BLOCK, _next_pow2(s))
    q_fields, kv_fields = ("block_q", "block_q_dkv", "block_q_dq"), ("block_kv", "block_kv_dkv", "block_kv_dq")
    bs = {f: min(getattr(block_sizes, f), cap_q) for f in q_fields}
    bs |= {f: min(getattr(block_sizes, f), cap_kv) for f in kv_fields}
    mult_q, mult_kv = max(bs[f] for f in q_fields), max(bs[f] for f in kv_fields)  # powers of two
    tp, sp = -(-t // mult_q) * mult_q, -(-s // mult_kv) * mult_kv
    default_positions = q_positions is None and kv_positions is None
    segments = segment_ids is not None
    mask = MaskSpec(causal=bool(causal), window=sliding_window, offset=s - t,
                    default_positions=default_positions, segments=segments, seq_kv=s, kv_padded=sp != s)
    cfg = _triton.KernelConfig(
        mask=mask, scale=scale, **bs,
        num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages,
        num_warps_bwd=block_sizes.num_warps_bwd, num_stages_bwd=block_sizes.num_stages_bwd,
        interpret=bool(interpret),
        precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None)

    if not default_positions:
        base_q = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + (s - t), (b, t))
        base_kv = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        q_positions = base_q if q_positions is None else q_positions.astype(jnp.int32)
        kv_positions = base_kv if kv_positions is None else kv_positions.astype(jnp.int32)
    if segments:
        segment_ids = segment_ids.astype(jnp.int32)
        kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
    else:
        kv_segment_ids = None
    out, lse = _run(q, k, v, q_positions, kv_positions, segment_ids, kv_segment_ids, cfg=cfg, tp=tp, sp=sp)
    return (out, lse) if return_lse else out


@functools.partial(jax.jit, static_argnames=("cfg", "tp", "sp"))
def _run(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, cfg, tp, sp):
    """Pad to whole tiles and power-of-two head dims, run the kernels, slice back."""
    b, t, hq, d = q.shape
    s, dv = k.shape[1], v.shape[3]
    dp, dvp = max(_MIN_BLOCK, _next_pow2(d)), max(_MIN_BLOCK, _next_pow2(dv))

    def pad(x, length, width):
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, width - x.shape[3])))

    def pad_ids(x, length):  # edge padding keeps each tile's min/max tight; padded rows/keys are masked
        return None if x is None else jnp.pad(x, ((0, 0), (0, length - x.shape[1])), mode="edge")

    out, lse = _flash(pad(q, tp, dp), pad(k, sp, dp), pad(v, sp, dvp), pad_ids(q_pos, tp), pad_ids(kv_pos, sp),
                      pad_ids(q_seg, tp), pad_ids(kv_seg, sp), cfg)
    return out[:, :t, :, :dv], lse[:, :, :t].transpose(0, 2, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, q_pos, kv_pos, q_seg, kv_seg, cfg):
    return _triton.forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, cfg)


def _flash_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, cfg):
    out, lse = _triton.forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, cfg)
    return (out, lse), (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _flash_bwd(cfg, res, cts):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = res
    dout, dlse = cts
    finite = jnp.isfinite(lse)
    # Base-2 lse for the kernels; +inf on rows that see no key makes P = exp2(S - lse2) = 0 there.
    lse2 = jnp.where(finite, lse * _triton.LOG2E, jnp.inf)
    # delta = rowsum(dO * O) (FlashAttention-2 Alg. 2 line 4); a cotangent on lse adds P * dlse to dS,
    # i.e. subtracts dlse from delta (d lse / d S = P).
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), dout.astype(jnp.float32))
    delta = delta - jnp.where(finite, dlse, 0.0)
    dq, dk, dv = _triton.backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, dout.astype(q.dtype), lse2, delta,
                                  cfg)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
