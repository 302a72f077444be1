"""Public entry point of the paged decode-attention kernel: argument checks, head grouping and padding,
split sizes, and the log-sum-exp merge of the splits."""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from kernels.paged_attention import _triton

Array = jax.Array

BACKENDS = ("triton",)
_MIN_BLOCK = 16  # tl.dot needs every matmul dimension >= 16
_TARGET_PROGRAMS = 512  # auto n_splits: aim for this many programs (~4 per SM on an H100's 132)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def paged_attention(
    q: Array,
    k_pages: Array,
    v_pages: Array,
    block_tables: Array,
    lengths: Array,
    *,
    softmax_scale: float | None = None,
    sliding_window: int | None = None,
    k_scales: Array | None = None,
    v_scales: Array | None = None,
    backend: str = "triton",
    pages_per_block: int | None = None,
    n_splits: int | None = None,
    num_warps: int | None = 4,
    num_stages: int | None = 2,
    interpret: bool = False,
) -> Array:
    """Decode attention of one query per sequence over a paged KV cache (split-K / flash-decoding), as a
    Pallas kernel.

    Same semantics as :func:`mani_jax.core.paged_attention` with a 3-d ``q`` (the reference it is tested
    against): the query of sequence ``b`` sits at position ``lengths[b] - 1`` and sees the cached tokens
    ``max(0, lengths[b] - sliding_window) <= i < lengths[b]``; token ``i`` lives at
    ``pages[block_tables[b, i // page_size], i % page_size]``; query head ``h`` reads kv head
    ``h // (Hq / Hkv)`` (GQA). Forward only (decoding needs no gradient).

    Algorithm: PagedAttention's layout (Kwon et al. 2023, arXiv 2309.06180) read by a flash-decoding kernel
    (Dao et al. 2023): grid ``(batch, kv heads, n_splits)``; each program takes the query heads of one GQA
    group as a ``[G, D]`` tile, walks its share of the block table in blocks of ``pages_per_block`` pages
    (skipping pages past the length or before the window), gathers them by page id and keeps an online
    softmax (FlashAttention-2) in float32; the ``n_splits`` partial results are merged in ``jnp`` with
    ``m = max_s m_s``, ``l = sum_s 2^(m_s - m) l_s``, ``out = sum_s 2^(m_s - m) acc_s / l``.

    Args:
      q: ``[B, Hq, D]`` float16 / bfloat16 / float32.
      k_pages, v_pages: ``[n_pages, page_size, Hkv, D]``, one float dtype (if it differs from q's, q is cast
        to it for the matmuls; the cache is never copied), or int8 with ``k_scales`` / ``v_scales``;
        ``Hq % Hkv == 0``; ``page_size`` a power of two.
      block_tables: int ``[B, max_pages]``; entries past a sequence's pages are ignored (clipped to a valid
        page id; they may be read but are masked).
      lengths: int ``[B]`` tokens cached per sequence; 0 = an empty slot, whose output is zeros.
      softmax_scale: default ``1/sqrt(D)``. sliding_window: None or a positive int.
      k_scales, v_scales: float32 ``[n_pages, Hkv]``: one scale per (page, kv head) for int8 pages
        (:func:`mani_jax.core.paged_attention.quantize_pages`); both or neither.
      backend: ``"triton"`` (the Pallas Triton lowering; any backend with ``interpret=True``).
      pages_per_block: pages gathered per inner step (a power of two, ``pages_per_block * page_size >= 16``;
        default: 128 tokens' worth, at least one page, fewer when the block table is shorter).
      n_splits: block-table partitions per sequence (default: enough programs to fill the GPU, about
        512 over ``B * Hkv``, at most one per block of pages).
      num_warps, num_stages: Triton launch parameters.
      interpret: run in Pallas interpret mode (CPU, for testing).

    Returns:
      ``[B, Hq, D]`` in q's dtype.

    Raises:
      ValueError: mismatched shapes or head counts, a non-power-of-two ``page_size``, key and value pages
        of different dtypes, int8 pages without both scales (or scales with float pages, or mis-shaped
        scales), non-integer block tables / lengths, a bad window, block or split counts, or an unknown
        backend.
    """
    if q.ndim != 3:
        raise ValueError(f"q: expected [B, Hq, D], got shape {q.shape}")
    b, hq, d = q.shape
    if k_pages.ndim != 4 or v_pages.shape != k_pages.shape:
        raise ValueError(f"k_pages/v_pages: expected [n_pages, page_size, Hkv, D] alike, got {k_pages.shape} and "
                         f"{v_pages.shape}")
    n_pages, page_size, hkv, dk = k_pages.shape
    if dk != d:
        raise ValueError(f"k_pages: head_dim {dk} differs from q's {d}")
    if hq % hkv:
        raise ValueError(f"q: n_heads ({hq}) must be a multiple of the pages' n_kv_heads ({hkv})")
    if page_size & (page_size - 1):
        raise ValueError(f"k_pages: page_size must be a power of two, got {page_size}")
    if q.dtype not in (jnp.float16, jnp.bfloat16, jnp.float32):
        raise ValueError(f"q: expected float16, bfloat16 or float32, got {q.dtype}")
    quantized = k_pages.dtype == jnp.int8
    if quantized:
        if k_scales is None or v_scales is None or v_pages.dtype != jnp.int8:
            raise ValueError("k_scales, v_scales: int8 pages need both scales ([n_pages, Hkv] float32)")
        for name, s in (("k_scales", k_scales), ("v_scales", v_scales)):
            if s.shape != (n_pages, hkv):
                raise ValueError(f"{name}: expected shape {(n_pages, hkv)}, got {s.shape}")
    else:
        if k_scales is not None or v_scales is not None:
            raise ValueError("k_scales, v_scales: only int8 pages take scales")
        floats = (jnp.float16, jnp.bfloat16, jnp.float32)
        if k_pages.dtype not in floats or v_pages.dtype != k_pages.dtype:
            raise ValueError(f"k_pages, v_pages: expected one float dtype (or int8), got {k_pages.dtype}, "
                             f"{v_pages.dtype}")
    if block_tables.ndim != 2 or block_tables.shape[0] != b or not jnp.issubdtype(block_tables.dtype, jnp.integer):
        raise ValueError(f"block_tables: expected int [{b}, max_pages], got {block_tables.dtype} {block_tables.shape}")
    if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths: expected int [{b}], got {lengths.dtype} {lengths.shape}")
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, numbers.Integral) or sliding_window < 1:
            raise ValueError(f"sliding_window: expected None or a positive int, got {sliding_window!r}")
        sliding_window = int(sliding_window)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    max_pages = block_tables.shape[1]
    if pages_per_block is None:
        pages_per_block = min(max(1, 128 // page_size), max(_next_pow2(max_pages), max(1, _MIN_BLOCK // page_size)))
    if not isinstance(pages_per_block, int) or pages_per_block < 1 or pages_per_block & (pages_per_block - 1) \
            or pages_per_block * page_size < _MIN_BLOCK:
        raise ValueError(f"pages_per_block: expected a power of two with pages_per_block * page_size >= "
                         f"{_MIN_BLOCK}, got {pages_per_block!r}")
    n_blocks = -(-max_pages // pages_per_block)
    if n_splits is None:
        n_splits = max(1, min(n_blocks, -(-_TARGET_PROGRAMS // (b * hkv))))
    if not isinstance(n_splits, int) or n_splits < 1:
        raise ValueError(f"n_splits: expected a positive int, got {n_splits!r}")
    pages_per_split = -(-n_blocks // n_splits) * pages_per_block
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    # Matmul dtype: the pages' (a float cache in another dtype is read as it is; q is cast to it), or q's
    # for int8 pages (cast in the kernel, exact).
    mm_dtype = q.dtype if quantized else k_pages.dtype
    cfg = _triton.KernelConfig(
        scale=scale, window=sliding_window, pages_per_block=pages_per_block, pages_per_split=pages_per_split,
        n_splits=n_splits, quantized=quantized, num_warps=num_warps, num_stages=num_stages,
        interpret=bool(interpret), precision=lax.Precision.HIGHEST if mm_dtype == jnp.float32 else None)
    return _run(q, k_pages, v_pages, k_scales, v_scales, block_tables, lengths, cfg=cfg)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _run(q, k_pages, v_pages, k_scales, v_scales, block_tables, lengths, *, cfg):
    b, hq, d = q.shape
    n_pages, _, hkv, _ = k_pages.shape
    g = hq // hkv
    gp, dp = max(_MIN_BLOCK, _next_pow2(g)), max(_MIN_BLOCK, _next_pow2(d))
    mm_dtype = q.dtype if k_pages.dtype == jnp.int8 else k_pages.dtype
    qg = jnp.pad(q.astype(mm_dtype).reshape(b, hkv, g, d), ((0, 0), (0, 0), (0, gp - g), (0, dp - d)))
    if dp != d:  # a copy of the cache: use head dims that are powers of two >= 16 to avoid it
        pad = ((0, 0), (0, 0), (0, 0), (0, dp - d))
        k_pages, v_pages = jnp.pad(k_pages, pad), jnp.pad(v_pages, pad)
    mp = cfg.n_splits * cfg.pages_per_split
    tables = jnp.clip(block_tables.astype(jnp.int32), 0, n_pages - 1)
    tables = jnp.pad(tables, ((0, 0), (0, mp - tables.shape[1])))
    if k_scales is not None:
        k_scales, v_scales = k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)
    acc, m, l = _triton.paged_decode(qg, k_pages, v_pages, k_scales, v_scales, tables,
                                     lengths.astype(jnp.int32), cfg)
    # Log-sum-exp merge of the splits (base 2, as the kernel's running max).
    m_all = jnp.max(m, axis=2, keepdims=True)
    m_all = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
    w = jnp.exp2(m - m_all)  # 0 for splits that saw nothing (m = -inf)
    l_all = jnp.sum(w * l, axis=2)  # [b, hkv, gp]
    out = jnp.sum(w[..., None] * acc, axis=2) / jnp.where(l_all > 0, l_all, 1.0)[..., None]
    return out[:, :, :g, :d].reshape(b, hq, d).astype(q.dtype)
