"""Distributed training on JAX's own runtime: mesh, logical-axis rules, and the strategies built on them.

===================================  ===========================================  ==========================
strategy                             how                                          sharding mode
===================================  ===========================================  ==========================
data parallel, FSDP (ZeRO-3),        :func:`make_sharded_train_step` (the         auto (GSPMD propagation)
ZeRO-1, tensor / expert parallel     trainer's step + rules' shardings)
by annotation, and their products
tensor parallel, collectives         :func:`make_tp_train_step`,                  manual (``shard_map``)
written out                          :mod:`~mani_jax.parallel.tensor`
pipeline (GPipe, 1F1B), x DP x TP    :func:`make_pipeline_train_step`             manual over ``pipeline``,
                                                                                  auto over the rest
expert parallel, all-to-all          :func:`expert_parallel_moe`; the MoE model   manual over the batch
                                     with ``moe_dispatch="all_to_all"`` under     axes (``shard_map``)
                                     :func:`make_sharded_train_step`
remat per block                      ``ModelConfig.remat``                        --
multi-process                        :func:`initialize_distributed`               --
===================================  ===========================================  ==========================

See ``docs/distributed.md`` for how each works and when each wins.
"""

from mani_jax.parallel.expert import expert_parallel_moe
from mani_jax.parallel.hlo import collective_stats, memory_stats
from mani_jax.parallel.mesh import AXES, MeshConfig, batch_axes, make_mesh
from mani_jax.parallel.multiprocess import initialize_distributed
from mani_jax.parallel.pipeline import (bubble_fraction, make_pipeline_train_step, merge_stages, peak_in_flight,
                                        pipeline_loss, schedule_table, split_stages)
from mani_jax.parallel.rules import (LOGICAL_RULES, PARAM_AXES, ZERO1_OPT_RULES, batch_sharding, check_model_config,
                                     describe_shardings, logical_axes, model_shardings, shard_model,
                                     shard_train_state, spec_for, tree_shardings, with_rules)
from mani_jax.parallel.step import make_sharded_train_step, shard_batch, sharded_step_factory
from mani_jax.parallel.tensor import (from_tp_layout, make_tp_loss, make_tp_train_step, tp_logits, to_tp_layout,
                                      vocab_parallel_cross_entropy)

__all__ = [
    "AXES", "LOGICAL_RULES", "MeshConfig", "PARAM_AXES", "ZERO1_OPT_RULES", "batch_axes", "batch_sharding",
    "bubble_fraction", "check_model_config", "collective_stats", "describe_shardings", "expert_parallel_moe",
    "from_tp_layout", "initialize_distributed", "logical_axes", "make_mesh", "make_pipeline_train_step",
    "make_sharded_train_step", "make_tp_loss", "make_tp_train_step", "memory_stats", "merge_stages",
    "model_shardings", "peak_in_flight", "pipeline_loss", "schedule_table", "shard_batch", "shard_model",
    "shard_train_state", "sharded_step_factory", "spec_for", "split_stages", "to_tp_layout", "tp_logits",
    "tree_shardings",
    "vocab_parallel_cross_entropy", "with_rules",
]
