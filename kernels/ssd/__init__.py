"""Mamba-2 SSD (chunked scan, forward and backward) as Pallas kernels; see ``docs/kernels.md``."""

from kernels.ssd.api import BACKENDS, ssd_chunked

__all__ = ["BACKENDS", "ssd_chunked"]
