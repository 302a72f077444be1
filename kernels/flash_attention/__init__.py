"""Flash attention (FlashAttention-2 forward and backward) as Pallas kernels; see ``docs/kernels.md``."""

from kernels.flash_attention.api import BACKENDS, BlockSizes, flash_attention

__all__ = ["BACKENDS", "BlockSizes", "flash_attention"]
