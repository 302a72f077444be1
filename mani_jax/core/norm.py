"""RMSNorm, LayerNorm, and the gated, grouped RMSNorm of Mamba-2.

Sources: Zhang & Sennrich 2019 (RMSNorm, eq. 4); Dao & Gu 2024 (Mamba-2, Sec. 7: the gate ``y * silu(z)``
before a normalisation computed per group of ``d_inner / n_groups`` channels), as llama.cpp's
``granitehybrid`` graph computes it (``ggml_rms_norm`` over groups, then ``ssm_norm``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def rms_norm(x: Array, weight: Array, eps: float = 1e-6) -> Array:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis, in float32, cast back to ``x.dtype``.

    Args:
      x: ``[..., d]``.
      weight: ``[d]``.
      eps: added to the mean square (``norm_eps``).

    Raises:
      ValueError: if ``weight`` is not ``[d]``.
    """
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight: expected shape ({x.shape[-1]},), got {weight.shape}")
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def layer_norm(x: Array, weight: Array, bias: Array, eps: float = 1e-5) -> Array:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last axis (biased variance), in float32,
    cast back to ``x.dtype``. Ba et al. 2016, eq. 4; ``torch.nn.LayerNorm`` (Whisper's norm).

    Args:
      x: ``[..., d]``.
      weight, bias: ``[d]``.
      eps: added to the variance.

    Raises:
      ValueError: if ``weight`` or ``bias`` is not ``[d]``.
    """
    d = x.shape[-1]
    if weight.shape != (d,) or bias.shape != (d,):
        raise ValueError(f"weight, bias: expected shape ({d},), got {weight.shape} and {bias.shape}")
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    xc = x32 - mean
    y = xc * jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def gated_rms_norm(y: Array, z: Array, weight: Array, *, n_groups: int = 1, eps: float = 1e-6) -> Array:
    """Mamba-2 output norm: ``rms_norm_per_group(y * silu(z)) * weight``.

    Args:
      y: ``[..., d_inner]`` SSM output.
      z: ``[..., d_inner]`` gate branch of ``in_proj``.
      weight: ``[d_inner]``.
      n_groups: the norm is taken over each of ``n_groups`` contiguous chunks of ``d_inner / n_groups``
        channels (llama.cpp's grouped ``ssm_norm``; equal to a full-width norm when ``n_groups == 1``).
      eps: shared with the model's other norms.

    Returns:
      ``[..., d_inner]`` in ``y.dtype``; computed in float32.

    Raises:
      ValueError: on mismatched shapes or ``d_inner % n_groups != 0``.
    """
    d = y.shape[-1]
    if z.shape != y.shape:
        raise ValueError(f"z: expected shape {y.shape}, got {z.shape}")
    if weight.shape != (d,):
        raise ValueError(f"weight: expected shape ({d},), got {weight.shape}")
    if n_groups < 1 or d % n_groups:
        raise ValueError(f"n_groups: {n_groups} must be positive and divide d_inner={d}")
    h = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    hg = h.reshape(*h.shape[:-1], n_groups, d // n_groups)
    hg = hg * jax.lax.rsqrt(jnp.mean(hg * hg, axis=-1, keepdims=True) + eps)
    return (hg.reshape(h.shape) * weight.astype(jnp.float32)).astype(y.dtype)
