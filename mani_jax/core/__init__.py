"""mani_jax.core: pure functions on arrays (jax/numpy only; no Flax, no state, no I/O).

Every kernel under ``kernels/`` mirrors one of these signatures and is tested against it.
"""

from mani_jax.core.activations import gelu, silu, softplus, swiglu
from mani_jax.core.attention import attention, attention_mask, blockwise_attention, positions_from_segments
from mani_jax.core.moe import (capacity, expert_utilisation, load_balancing_loss, moe_capacity, moe_dropless,
                               moe_ffn, router, router_z_loss)
from mani_jax.core.norm import gated_rms_norm, layer_norm, rms_norm
from mani_jax.core.paged_attention import gather_pages, paged_attention
from mani_jax.core.rope import apply_rope, rope_inv_freq, rotate_half
from mani_jax.core.ssd import (causal_conv1d, causal_conv1d_step, segsum, ssd_chunked, ssd_recurrent,
                               ssd_step)

__all__ = [
    "apply_rope", "attention", "capacity", "expert_utilisation", "load_balancing_loss", "moe_capacity",
    "moe_dropless", "moe_ffn", "positions_from_segments", "router", "router_z_loss", "attention_mask", "blockwise_attention", "causal_conv1d", "causal_conv1d_step",
    "gated_rms_norm", "gather_pages", "gelu", "layer_norm", "paged_attention", "rms_norm", "rope_inv_freq", "rotate_half", "segsum", "silu", "softplus", "ssd_chunked",
    "ssd_recurrent", "ssd_step", "swiglu",
]
