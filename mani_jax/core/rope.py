"""Rotary position embedding (RoPE) in the rotate-half (NEOX) layout, the one layout used project-wide.

Source: Su et al. 2021, RoFormer (eq. 34); the rotate-half pairing of dimension ``i`` with ``i + d/2`` is
GPT-NeoX's and Hugging Face Qwen2/Granite's (``apply_rotary_pos_emb``). llama.cpp's ``llama`` and
``granitehybrid`` archs pair adjacent dimensions instead (NORM); the GGUF exporter permutes q/k rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def rope_inv_freq(rotary_dim: int, theta: float = 10000.0) -> Array:
    """Inverse frequencies ``theta ** (-2i / rotary_dim)`` for ``i < rotary_dim / 2``; float32 ``[rotary_dim/2]``."""
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim: expected a positive even int, got {rotary_dim}")
    return 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))


def rotate_half(x: Array) -> Array:
    """``[-x2, x1]`` for ``x = [x1, x2]`` split in halves along the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: Array, positions: Array, *, theta: float = 10000.0, rotary_dim: int | None = None) -> Array:
    """Rotate ``x`` by angle ``position * inv_freq`` in the rotate-half layout.

    Args:
      x: ``[batch, seq, heads, head_dim]``.
      positions: int ``[batch, seq]`` absolute positions (restart at 0 per packed document).
      theta: RoPE base (``rope_theta``).
      rotary_dim: rotate only the first ``rotary_dim`` dims (partial rotary); default all of ``head_dim``.

    Returns:
      Array like ``x`` (same dtype); the rotation is computed in float32.

    Raises:
      ValueError: if shapes disagree or ``rotary_dim`` is odd or larger than ``head_dim``.
    """
    if x.ndim != 4:
        raise ValueError(f"x: expected [batch, seq, heads, head_dim], got shape {x.shape}")
    if positions.shape != x.shape[:2]:
        raise ValueError(f"positions: expected shape {x.shape[:2]}, got {positions.shape}")
    d = x.shape[-1]
    rd = d if rotary_dim is None else rotary_dim
    if rd > d:
        raise ValueError(f"rotary_dim: {rd} exceeds head_dim {d}")
    inv_freq = rope_inv_freq(rd, theta)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, rd/2]
    emb = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [b, t, 1, rd]
    xr = x[..., :rd].astype(jnp.float32)
    out = xr * jnp.cos(emb) + rotate_half(xr) * jnp.sin(emb)
    if rd < d:
        out = jnp.concatenate([out, x[..., rd:].astype(jnp.float32)], axis=-1)
    return out.astype(x.dtype)
