"""Weight-only quantization: int8 per channel, int4 group-wise, NF4 (with optional double quantization).

Weights are matmul right-hand sides ``w [..., d_in, d_out]`` (``y = x @ w``; leading axes, e.g. the
experts of an MoE layer, are kept). Every scheme quantizes along the **reduction axis** ``d_in`` so that
one scale serves a contiguous run of the inputs of one output column, and dequantization is an elementwise
``q * scale (+ offset)`` that XLA fuses in front of the matmul ("dequantize on the fly"). Scales are
float32; the dequantized matrix comes out in the requested compute dtype.

* ``int8`` -- symmetric per output channel (absmax over ``d_in``): ``w ~ scale[j] * q[i, j]``,
  ``q in [-127, 127]`` (LLM.int8's vector-wise scheme without outliers, Dettmers et al. 2022; torchao
  ``int8_weight_only``). 8 bits + 32 / d_in per weight.
* ``int4`` -- asymmetric group-wise over ``group_size`` consecutive inputs (32, 64 or 128): ``w ~ scale * q
  + minimum``, ``q in [0, 15]``, two codes packed per byte (torchao ``int4_weight_only``; the affine form of
  GGUF Q4_1). 4 bits + 64 / group_size per weight.
* ``nf4`` -- 4-bit NormalFloat (Dettmers et al. 2023, QLoRA, arXiv 2305.14314, Sec. 3 and eq. 4): blocks of
  ``block_size`` (64) inputs scaled by their absmax into [-1, 1], each value stored as the index of the
  nearest of the 16 NF4 levels :data:`NF4_CODE`. ``double_quant=True`` quantizes the float32 block absmaxes
  again (QLoRA "Double Quantization"): subtract their mean, int8 absmax-quantize them in blocks of 256 with
  float32 second-level scales -- 4 + 8/64 + 32/(64*256) = 4.127 bits per weight instead of 4.5.

:func:`quantize` returns a :class:`QuantizedArray` (a pytree: arrays are leaves, the scheme is static), so
it passes through ``jax.jit`` and lives inside NNX variables; :func:`dequantize` inverts it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Scheme = Literal["int8", "int4", "nf4"]
SCHEMES = ("int8", "int4", "nf4")

# The 16 NF4 levels exactly as QLoRA / bitsandbytes define them (float32): the quantiles of N(0, 1) at 8
# evenly spaced probabilities in [0.5, 0.9677083] for the positive half and 7 for the negative half, joined
# at an exact 0 and normalised by the largest (QLoRA eq. 4, bitsandbytes ``create_normal_map``).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
    1.0], dtype=np.float32)

_DQ_BLOCK = 256  # QLoRA's second-level block size for double quantization


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A quantized ``[..., d_in, d_out]`` weight. Arrays are pytree leaves; ``scheme``, ``shape``,
    ``group_size`` and ``double_quant`` are static metadata.

    Fields by scheme (``G = d_in // group_size`` groups; ``lead`` = the leading axes):

    * int8: ``codes`` int8 ``[*lead, d_in, d_out]``; ``scale`` float32 ``[*lead, 1, d_out]``.
    * int4: ``codes`` uint8 ``[*lead, G, group_size // 2, d_out]`` (two codes per byte, low nibble first);
      ``scale``, ``offset`` float32 ``[*lead, G, 1, d_out]``.
    * nf4: ``codes`` as int4 (indices into :data:`NF4_CODE`); ``scale`` float32 ``[*lead, G, 1, d_out]``
      (the block absmax) or, with ``double_quant``, int8 ``scale`` of the same shape plus ``scale_scale``
      float32 ``[n_scale_blocks]`` and ``scale_mean`` float32 ``[]``.
    """

    codes: Array
    scale: Array
    offset: Array | None = None
    scale_scale: Array | None = None
    scale_mean: Array | None = None
    scheme: str = dataclasses.field(default="int8", metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    group_size: int = dataclasses.field(default=0, metadata=dict(static=True))
    double_quant: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def nbytes(self) -> int:
        """Storage in bytes of every array (codes, scales, offsets)."""
        return sum(int(a.size) * a.dtype.itemsize for a in (self.codes, self.scale, self.offset,
                                                             self.scale_scale, self.scale_mean) if a is not None)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / math.prod(self.shape)

    def dequantize(self, dtype=jnp.float32) -> Array:
        return dequantize(self, dtype)


def _check_weight(w, name: str = "w") -> None:
    if not hasattr(w, "ndim") or w.ndim < 2:
        raise ValueError(f"{name}: expected a [..., d_in, d_out] weight, got shape {getattr(w, 'shape', None)}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"{name}: expected a floating dtype, got {w.dtype}")


def _grouped(w: Array, group_size: int, what: str) -> Array:
    """``[*lead, d_in, d_out] -> [*lead, G, group_size, d_out]``."""
    d_in = w.shape[-2]
    if group_size < 2 or group_size % 2 or d_in % group_size:
        raise ValueError(f"{what}: expected an even group size dividing d_in={d_in}, got {group_size}")
    return w.reshape(*w.shape[:-2], d_in // group_size, group_size, w.shape[-1])


def _pack_nibbles(q: Array) -> Array:
    """uint8 codes in [0, 15] ``[..., g, d_out]`` (g even) -> ``[..., g // 2, d_out]``, low nibble first."""
    q = q.astype(jnp.uint8)
    return q[..., 0::2, :] | (q[..., 1::2, :] << 4)


def _unpack_nibbles(p: Array) -> Array:
    lo, hi = p & 0xF, p >> 4
    return jnp.stack([lo, hi], axis=-2).reshape(*p.shape[:-2], 2 * p.shape[-2], p.shape[-1])


def quantize(w: Array, scheme: Scheme, *, group_size: int = 64, double_quant: bool = False) -> QuantizedArray:
    """Quantize a weight ``w [..., d_in, d_out]`` (float) along ``d_in``.

    Args:
      w: the weight (any float dtype; math in float32).
      scheme: ``"int8"`` (per output channel), ``"int4"`` (asymmetric, ``group_size`` inputs per scale) or
        ``"nf4"`` (``group_size`` is the NF4 block size; QLoRA uses 64).
      group_size: 32, 64 or 128 typically; must be even and divide ``d_in`` (ignored for int8).
      double_quant: NF4 only: quantize the block scales to int8 too (QLoRA Sec. 3).

    Returns:
      a :class:`QuantizedArray`; ``dequantize(quantize(w))`` approximates ``w``.

    Raises:
      ValueError: ``w`` not a float array of rank >= 2, unknown ``scheme``, a group size that does not
        divide ``d_in``, or ``double_quant`` with a scheme other than nf4.
    """
    _check_weight(w)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
    if double_quant and scheme != "nf4":
        raise ValueError(f"double_quant: only defined for scheme='nf4', got scheme={scheme!r}")
    wf = jnp.asarray(w, jnp.float32)
    shape = tuple(w.shape)
    if scheme == "int8":
        amax = jnp.max(jnp.abs(wf), axis=-2, keepdims=True)
        scale = jnp.where(amax > 0, amax / 127.0, 1.0)
        codes = jnp.clip(jnp.round(wf / scale), -127, 127).astype(jnp.int8)
        return QuantizedArray(codes=codes, scale=scale, scheme="int8", shape=shape)
    g = _grouped(wf, group_size, "group_size")
    if scheme == "int4":
        lo = jnp.min(g, axis=-2, keepdims=True)
        hi = jnp.max(g, axis=-2, keepdims=True)
        scale = jnp.where(hi > lo, (hi - lo) / 15.0, 1.0)
        q = jnp.clip(jnp.round((g - lo) / scale), 0, 15)
        return QuantizedArray(codes=_pack_nibbles(q), scale=scale, offset=lo, scheme="int4", shape=shape,
                              group_size=group_size)
    # nf4
    absmax = jnp.max(jnp.abs(g), axis=-2, keepdims=True)
    safe = jnp.where(absmax > 0, absmax, 1.0)
    code = jnp.asarray(NF4_CODE)
    # Nearest level: the levels are sorted, so compare with the midpoints between neighbours.
    mids = (code[1:] + code[:-1]) / 2
    q = jnp.sum((g / safe)[..., None] > mids, axis=-1)
    if not double_quant:
        return QuantizedArray(codes=_pack_nibbles(q), scale=absmax, scheme="nf4", shape=shape,
                              group_size=group_size)
    flat = absmax.reshape(-1)
    mean = jnp.mean(flat)
    centred = flat - mean
    n = flat.shape[0]
    n_blocks = -(-n // _DQ_BLOCK)
    padded = jnp.pad(centred, (0, n_blocks * _DQ_BLOCK - n)).reshape(n_blocks, _DQ_BLOCK)
    amax2 = jnp.max(jnp.abs(padded), axis=-1, keepdims=True)
    s2 = jnp.where(amax2 > 0, amax2 / 127.0, 1.0)
    q2 = jnp.clip(jnp.round(padded / s2), -127, 127).astype(jnp.int8).reshape(-1)[:n].reshape(absmax.shape)
    return QuantizedArray(codes=_pack_nibbles(q), scale=q2, scale_scale=s2[:, 0], scale_mean=mean,
                          scheme="nf4", shape=shape, group_size=group_size, double_quant=True)


def dequantize(qa: QuantizedArray, dtype=jnp.float32) -> Array:
    """The approximate weight ``[..., d_in, d_out]`` of ``qa`` in ``dtype`` (math in float32)."""
    if not isinstance(qa, QuantizedArray):
        raise ValueError(f"qa: expected a QuantizedArray, got {type(qa).__name__}")
    if qa.scheme == "int8":
        return (qa.codes.astype(jnp.float32) * qa.scale).astype(dtype)
    q = _unpack_nibbles(qa.codes)
    if qa.scheme == "int4":
        w = q.astype(jnp.float32) * qa.scale + qa.offset
    else:
        scale = qa.scale
        if qa.double_quant:
            n = math.prod(scale.shape)
            s2 = jnp.repeat(qa.scale_scale, _DQ_BLOCK)[:n].reshape(scale.shape)
            scale = scale.astype(jnp.float32) * s2 + qa.scale_mean
        w = jnp.asarray(NF4_CODE)[q] * scale
    return w.reshape(qa.shape).astype(dtype)


def quantized_matmul(x: Array, w: QuantizedArray | Array) -> Array:
    """``x [..., d_in] @ w [d_in, d_out]`` with ``w`` dequantized on the fly to ``x``'s dtype (float32
    accumulation). A plain array ``w`` is used as is."""
    wd = dequantize(w, x.dtype) if isinstance(w, QuantizedArray) else w.astype(x.dtype)
    return jnp.matmul(x, wd, preferred_element_type=jnp.float32).astype(x.dtype)
