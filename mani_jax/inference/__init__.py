"""Inference: a plain cached decode loop now; the paged-KV engine with continuous batching builds here."""

from mani_jax.inference.generate import generate

__all__ = ["generate"]
