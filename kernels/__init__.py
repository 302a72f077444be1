"""Pallas kernels; each mirrors a ``mani_jax.core`` function's signature and is tested against it."""
