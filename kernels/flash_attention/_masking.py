"""Mask logic shared by the flash-attention kernels: which (query block, key block) tiles can be skipped,
which need no element mask, and the element mask itself.

Everything here is traced inside a Pallas kernel body (Triton lowering or interpret mode), so it uses only
scalar/vector ``jnp``/``lax`` ops that both lower. Positions follow :func:`mani_jax.core.attention_mask`:
a key at position ``kp`` is visible to a query at position ``qp`` iff ``kp <= qp`` (causal),
``qp - kp < W`` (window) and, when not causal, ``kp - qp < W``, and the segment ids are equal.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static description of the mask (hashable; part of the kernels' static configuration).

    Attributes:
      causal, window: as in :func:`mani_jax.core.attention` (``window`` None = unlimited).
      offset: with ``default_positions``, query ``t`` sits at position ``t + offset`` and key ``s`` at ``s``
        (``offset = seq_kv - seq_q``, the reference's bottom-right alignment).
      default_positions: positions are the indices above; otherwise they are read from position arrays.
      segments: segment ids are read and compared.
      seq_kv: the true (unpadded) number of keys; keys at index ``>= seq_kv`` are padding.
      kv_padded: the padded key length differs from ``seq_kv`` (padding keys must be masked).
    """

    causal: bool
    window: int | None
    offset: int
    default_positions: bool
    segments: bool
    seq_kv: int
    kv_padded: bool

    @property
    def any_mask(self) -> bool:
        """Whether any element can be masked at all (if not, the kernels run one unmasked code path)."""
        return self.causal or self.window is not None or self.segments or self.kv_padded


@dataclasses.dataclass
class Side:
    """One tile's side (queries or keys): index vector, positions vector and their range, segment ids."""

    idx: jnp.ndarray  # int32 [n] sequence indices
    pos: jnp.ndarray  # int32 [n] positions
    pos_lo: jnp.ndarray  # int32 scalar: min position (a lower bound is enough)
    pos_hi: jnp.ndarray  # int32 scalar: max position (an upper bound is enough)
    seg: jnp.ndarray | None = None  # int32 [n]
    seg_lo: jnp.ndarray | None = None
    seg_hi: jnp.ndarray | None = None


def make_side(spec: MaskSpec, start, size: int, *, is_query: bool, pos_ref=None, seg_ref=None) -> Side:
    """Build a :class:`Side` for the tile ``[start, start + size)``.

    ``pos_ref`` / ``seg_ref``: refs holding the whole padded sequence's positions / segment ids (read at
    ``pl.ds(start, size)``), or None when unused.
    """
    from jax.experimental import pallas as pl

    idx = start + lax.broadcasted_iota(jnp.int32, (size,), 0)
    if spec.default_positions:
        off = spec.offset if is_query else 0
        pos = idx + off
        pos_lo, pos_hi = start + off, start + (size - 1 + off)
    else:
        pos = pos_ref[pl.ds(start, size)]
        pos_lo, pos_hi = jnp.min(pos), jnp.max(pos)
    side = Side(idx, pos, pos_lo, pos_hi)
    if spec.segments:
        side.seg = seg_ref[pl.ds(start, size)]
        side.seg_lo, side.seg_hi = jnp.min(side.seg), jnp.max(side.seg)
    return side


def classify(spec: MaskSpec, q: Side, kv: Side, kv_start, block_kv: int):
    """``(any_visible, all_visible)`` scalars for the tile ``q x kv``.

    ``any_visible`` False means every element is masked (the tile is skipped); ``all_visible`` True means
    no element is masked (the tile runs without the element mask). Both are conservative: True/False
    respectively whenever unsure, so the masked path (always exact) runs.
    """
    any_v = jnp.bool_(True)
    all_v = jnp.bool_(True)
    if spec.causal:
        any_v &= kv.pos_lo <= q.pos_hi
        all_v &= kv.pos_hi <= q.pos_lo
    if spec.window is not None:
        w = spec.window
        any_v &= q.pos_lo - kv.pos_hi < w
        all_v &= q.pos_hi - kv.pos_lo < w
        if not spec.causal:
            any_v &= kv.pos_lo - q.pos_hi < w
            all_v &= kv.pos_hi - q.pos_lo < w
    if spec.segments:
        any_v &= (q.seg_lo <= kv.seg_hi) & (kv.seg_lo <= q.seg_hi)
        all_v &= (q.seg_lo == q.seg_hi) & (kv.seg_lo == kv.seg_hi) & (q.seg_lo == kv.seg_lo)
    if spec.kv_padded:
        any_v &= kv_start < spec.seq_kv
        all_v &= kv_start + block_kv <= spec.seq_kv
    return any_v, all_v


def element_mask(spec: MaskSpec, q: Side, kv: Side):
    """Boolean ``[n_q, n_kv]``: True where the query may attend to the key (None when nothing is masked)."""
    if not spec.any_mask:
        return None
    qp, kp = q.pos[:, None], kv.pos[None, :]
    mask = jnp.ones((q.pos.shape[0], kv.pos.shape[0]), jnp.bool_)
    if spec.causal:
        mask &= kp <= qp
    if spec.window is not None:
        mask &= (qp - kp) < spec.window
        if not spec.causal:
            mask &= (kp - qp) < spec.window
    if spec.segments:
        mask &= q.seg[:, None] == kv.seg[None, :]
    if spec.kv_padded:
        mask &= kv.idx[None, :] < spec.seq_kv
    return mask


def _floor_div_clamped(x, b: int):
    """``max(floor(x / b), 0)`` for an int32 scalar ``x`` and a positive int ``b``."""
    return lax.div(jnp.maximum(x, 0), jnp.int32(b))


def _ceil_div_clamped(x, b: int):
    """``max(ceil(x / b), 0)``."""
    return lax.div(jnp.maximum(x, 0) + (b - 1), jnp.int32(b))


def kv_block_range(spec: MaskSpec, q_start, block_q: int, block_kv: int, n_kv_blocks: int):
    """``[lo, hi)`` of the key blocks a query tile ``[q_start, q_start + block_q)`` can see.

    Exact loop bounds for causal / sliding-window masks with default positions (the FlashAttention-2
    causal trick: the upper triangle is never iterated); the whole range otherwise.
    """
    lo, hi = jnp.int32(0), jnp.int32(n_kv_blocks)
    if not spec.default_positions:
        return lo, hi
    q_lo = q_start + spec.offset  # position of the tile's first / last query
    q_hi = q_start + (block_q - 1 + spec.offset)
    w = spec.window
    if spec.causal:  # largest visible key position is q_hi
        hi = jnp.minimum(hi, _ceil_div_clamped(q_hi + 1, block_kv))
    elif w is not None:  # ... or q_hi + w - 1
        hi = jnp.minimum(hi, _ceil_div_clamped(q_hi + w, block_kv))
    if w is not None:  # smallest visible key position is q_lo - w + 1
        lo = _floor_div_clamped(q_lo - w + 1, block_kv)
    return lo, hi


def q_block_range(spec: MaskSpec, kv_start, block_kv: int, block_q: int, n_q_blocks: int):
    """``[lo, hi)`` of the query blocks that can see the key tile ``[kv_start, kv_start + block_kv)``."""
    lo, hi = jnp.int32(0), jnp.int32(n_q_blocks)
    if not spec.default_positions:
        return lo, hi
    k_lo = kv_start
    k_hi = kv_start + (block_kv - 1)
    if spec.kv_padded:  # the last real key, not the padding
        k_hi = jnp.minimum(k_hi, spec.seq_kv - 1)
    w = spec.window
    off = spec.offset
    if spec.causal:  # smallest query position that sees k_lo is k_lo
        lo = _floor_div_clamped(k_lo - off, block_q)
    elif w is not None:  # ... or k_lo - w + 1
        lo = _floor_div_clamped(k_lo - w + 1 - off, block_q)
    if w is not None:  # largest query position that sees k_hi is k_hi + w - 1
        hi = jnp.minimum(hi, _ceil_div_clamped(k_hi + w - off, block_q))
    return lo, hi


def kv_full_range(spec: MaskSpec, q_start, block_q: int, block_kv: int):
    """``[lo, hi)`` of key blocks that no mask element touches for the query tile (default positions only;
    an interval, since each constraint is a half-line in the block index)."""
    q_lo = q_start + spec.offset
    q_hi = q_start + (block_q - 1 + spec.offset)
    w = spec.window
    lo, hi = jnp.int32(0), jnp.int32(2**30)
    if spec.causal:  # every key <= q_lo
        hi = jnp.minimum(hi, _floor_div_clamped(q_lo + 1, block_kv))
    if w is not None:  # every key > q_hi - w
        lo = _ceil_div_clamped(q_hi - w + 1, block_kv)
        if not spec.causal:  # every key < q_lo + w
            hi = jnp.minimum(hi, _floor_div_clamped(q_lo + w, block_kv))
    if spec.kv_padded:  # no padding key in the tile
        hi = jnp.minimum(hi, spec.seq_kv // block_kv)
    return lo, hi


def q_full_range(spec: MaskSpec, kv_start, block_kv: int, block_q: int):
    """``[lo, hi)`` of query blocks that no mask element touches for the key tile (default positions)."""
    k_lo = kv_start
    k_hi = kv_start + (block_kv - 1)
    w = spec.window
    off = spec.offset
    lo, hi = jnp.int32(0), jnp.int32(2**30)
    if spec.causal:  # every query position >= k_hi
        lo = _ceil_div_clamped(k_hi - off, block_q)
    if w is not None:  # every query position < k_lo + w
        hi = _floor_div_clamped(w + k_lo - off, block_q)
        if not spec.causal:  # every query position > k_hi - w
            lo = jnp.maximum(lo, _ceil_div_clamped(k_hi - off - w + 1, block_q))
    if spec.kv_padded:
        hi = jnp.where(kv_start + block_kv <= spec.seq_kv, hi, 0)
    return lo, hi


def masked_loop(spec: MaskSpec, lo, hi, full_lo, full_hi, step, carry):
    """Run ``step(i, carry, masked)`` for ``i`` in ``[lo, hi)``: the tiles in ``[full_lo, full_hi)`` without
    the element mask, the rest with it, as three plain loops (no branches inside a loop body, so Triton
    can software-pipeline the loads)."""
    a = jnp.clip(full_lo, lo, hi)
    b = jnp.clip(full_hi, a, hi)
    carry = lax.fori_loop(lo, a, lambda i, c: step(i, c, True), carry)
    carry = lax.fori_loop(a, b, lambda i, c: step(i, c, False), carry)
    return lax.fori_loop(b, hi, lambda i, c: step(i, c, True), carry)
