"""Activations used by the model family.

Source: Shazeer 2020, "GLU Variants Improve Transformer" (SwiGLU, eq. 6); SiLU (Elfwing et al. 2018); GELU
(Hendrycks & Gimpel 2016).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def silu(x: Array) -> Array:
    """``x * sigmoid(x)``, elementwise, same shape and dtype."""
    return jax.nn.silu(x)


def gelu(x: Array) -> Array:
    """Exact GELU ``x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`` (not the tanh approximation), elementwise;
    ``torch.nn.functional.gelu``'s default and Whisper's activation."""
    return jax.nn.gelu(x, approximate=False)


def swiglu(gate: Array, up: Array) -> Array:
    """``silu(gate) * up``: the gated half of a SwiGLU feed-forward (``down(silu(x W_gate) * x W_up)``).

    Args:
      gate, up: ``[..., d_ff]``, same shape.

    Raises:
      ValueError: if the shapes differ.
    """
    if gate.shape != up.shape:
        raise ValueError(f"gate, up: shapes differ ({gate.shape} vs {up.shape})")
    return jax.nn.silu(gate) * up


def softplus(x: Array) -> Array:
    """``log(1 + exp(x))`` computed stably; Mamba-2 applies it to ``dt + dt_bias``."""
    return jnp.logaddexp(x, 0.0)
