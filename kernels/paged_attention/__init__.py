"""Decode attention over a paged KV cache (split-K flash-decoding, GQA, int8 KV) as a Pallas kernel; see
``docs/kernels.md``."""

from kernels.paged_attention.api import BACKENDS, paged_attention

__all__ = ["BACKENDS", "paged_attention"]
