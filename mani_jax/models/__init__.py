"""Flax NNX model zoo built only from ``mani_jax.core`` (and kernels, chosen by config)."""

from mani_jax.core import positions_from_segments  # re-exported: it defines the positions models consume
from mani_jax.models.config import (ATTENTION_IMPLS, PRESETS, ModelConfig, config_from_dict, get_config,
                                    hybrid_layer_types)
from mani_jax.models.hf import config_from_hf, load_hf
from mani_jax.models.hybrid import (Attention, Block, HybridLM, Mamba2Mixer, MLP, MoEFFN, RMSNorm, abstract_params,
                                    assemble_model, count_params)

__all__ = ["ATTENTION_IMPLS", "PRESETS", "Attention", "Block", "HybridLM", "MLP", "Mamba2Mixer", "MoEFFN",
           "ModelConfig", "RMSNorm", "abstract_params", "assemble_model", "config_from_dict", "config_from_hf", "count_params", "get_config",
           "hybrid_layer_types", "load_hf", "positions_from_segments"]
