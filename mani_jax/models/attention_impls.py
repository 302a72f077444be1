"""The attention and SSD implementations a model can pick by config (``ModelConfig.attention_impl``,
``ssd_impl``, ``paged_attention_impl``).

Each is a function with :func:`mani_jax.core.attention`'s signature, used by the full-sequence (training /
uncached prefill) path of :class:`mani_jax.models.hybrid.Attention`; contiguous-cache decode always uses the
reference, the paged engine's decode follows ``paged_attention_impl`` (below).

* ``"xla"``: :func:`mani_jax.core.attention`, the reference (XLA fuses it; O(seq^2) memory).
* ``"pallas"``: :func:`kernels.flash_attention.flash_attention`, FlashAttention-2 Pallas kernels (forward
  and backward, O(seq) memory); ``ModelConfig.attention_interpret`` runs them in interpret mode (CPU tests).
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (NVIDIA GPUs, 16-bit dtypes).

:func:`chunked_ssd` (``ssd_impl``): :func:`mani_jax.core.ssd_chunked` (``"xla"``) or the
:func:`kernels.ssd.ssd_chunked` Pallas kernels (``"pallas"``; ``ssd_interpret`` for interpret mode).
:func:`paged_decode_attention` (``paged_attention_impl``): :func:`mani_jax.core.paged_attention`
(``"xla"``) or the :func:`kernels.paged_attention.paged_attention` split-K kernel (``"pallas"``).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from mani_jax import core
from mani_jax.models.config import ATTENTION_IMPLS, PAGED_ATTENTION_IMPLS, SSD_IMPLS, ModelConfig

Array = jax.Array


def cudnn_attention(q: Array, k: Array, v: Array, *, causal: bool = False, segment_ids: Array | None = None,
                    kv_segment_ids: Array | None = None, q_positions: Array | None = None,
                    kv_positions: Array | None = None, sliding_window: int | None = None,
                    softmax_scale: float | None = None) -> Array:
    """``jax.nn.dot_product_attention(implementation="cudnn")`` behind :func:`mani_jax.core.attention`'s
    signature. Layout ``[batch, seq, heads, head_dim]``; GQA as the reference.

    Without segment ids the mask is by token index (cuDNN's in-kernel causal / left window, no mask tensor):
    equal to the reference's position mask when positions increase along the sequence, which is what
    :class:`~mani_jax.models.HybridLM` passes unless the caller gives its own non-increasing positions. With
    segment ids the reference's mask (positions and segments) is passed as an explicit ``[b, 1, t, s]``
    boolean mask.

    Raises:
      ValueError: not on a GPU backend (cuDNN needs CUDA), or a dtype other than float16/bfloat16.
    """
    if jax.default_backend() != "gpu":
        raise ValueError(f"attention_impl='cudnn': needs a CUDA GPU, but jax.default_backend() is "
                         f"{jax.default_backend()!r}; use 'xla' or 'pallas'")
    if q.dtype not in (jnp.float16, jnp.bfloat16):
        raise ValueError(f"attention_impl='cudnn': q, k, v must be float16 or bfloat16 (param_dtype / "
                         f"activations), got {q.dtype}")
    b, t = q.shape[:2]
    s = k.shape[1]
    if segment_ids is None:
        window = None
        if sliding_window is not None:
            window = (sliding_window - 1, 0 if causal else sliding_window - 1)
        return jax.nn.dot_product_attention(q, k, v, scale=softmax_scale, is_causal=causal,
                                            local_window_size=window, implementation="cudnn")
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + (s - t), (b, t))
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    mask = core.attention_mask(q_positions, kv_positions, causal=causal, segment_ids=segment_ids,
                               kv_segment_ids=kv_segment_ids, sliding_window=sliding_window)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=softmax_scale,
                                        implementation="cudnn")


def full_sequence_attention(cfg: ModelConfig) -> Callable[..., Array]:
    """The attention function ``cfg.attention_impl`` selects (same signature as :func:`core.attention`).

    Raises:
      ValueError: an unknown ``attention_impl`` (also caught when the config is built).
    """
    if cfg.attention_impl == "xla":
        return core.attention
    if cfg.attention_impl == "pallas":
        from kernels.flash_attention import flash_attention  # kernels <- models: the allowed direction

        return functools.partial(flash_attention, interpret=cfg.attention_interpret)
    if cfg.attention_impl == "cudnn":
        return cudnn_attention
    raise ValueError(f"attention_impl: expected one of {ATTENTION_IMPLS}, got {cfg.attention_impl!r}")


def chunked_ssd(cfg: ModelConfig) -> Callable[..., tuple[Array, Array]]:
    """The chunked SSD ``cfg.ssd_impl`` selects (same signature as :func:`core.ssd_chunked`).

    Raises:
      ValueError: an unknown ``ssd_impl`` (also caught when the config is built).
    """
    if cfg.ssd_impl == "xla":
        return core.ssd_chunked
    if cfg.ssd_impl == "pallas":
        from kernels.ssd import ssd_chunked  # kernels <- models: the allowed direction

        return functools.partial(ssd_chunked, interpret=cfg.ssd_interpret)
    raise ValueError(f"ssd_impl: expected one of {SSD_IMPLS}, got {cfg.ssd_impl!r}")


def paged_decode_attention(cfg: ModelConfig) -> Callable[..., Array]:
    """Decode attention over a paged KV cache that ``cfg.paged_attention_impl`` selects: a function
    ``f(q [B, Hq, D], k_pages, v_pages, block_tables, lengths, *, softmax_scale, sliding_window) -> [B, Hq, D]``
    with :func:`core.paged_attention`'s decode semantics (the query sits at position ``lengths - 1``).

    Raises:
      ValueError: an unknown ``paged_attention_impl`` (also caught when the config is built).
    """
    if cfg.paged_attention_impl == "xla":
        return core.paged_attention
    if cfg.paged_attention_impl == "pallas":
        from kernels.paged_attention import paged_attention

        return functools.partial(paged_attention, interpret=cfg.attention_interpret)
    raise ValueError(f"paged_attention_impl: expected one of {PAGED_ATTENTION_IMPLS}, got "
                     f"{cfg.paged_attention_impl!r}")
