"""Training: optimizer + schedule, losses, the jitted train step and loop, orbax checkpoints, metrics.

Public API::

    from mani_jax.train import TrainConfig, train, evaluate, OptimConfig, make_optimizer, lm_loss
    from mani_jax.train import sequence_logprobs, dpo_loss, kl_estimate, sequence_kl, group_advantages, grpo_loss
    from mani_jax.train import Checkpointer, restore_checkpoint, count_params

Speed note: the train step is ``jax.jit`` over the ``nnx.split`` state of ``(model, optimizer)`` (graph
definition closed over, state donated), not ``nnx.jit`` on the objects: ``nnx.jit`` traverses the Python
object graph on every call, a cost that grows with the number of modules and matters for small models and
CPU runs; it disappears once compute dominates.
"""

from mani_jax.train.checkpoint import Checkpointer, checkpoint_steps, restore_checkpoint
from mani_jax.train.losses import (
    dpo_loss,
    group_advantages,
    grpo_loss,
    kl_estimate,
    lm_loss,
    sequence_kl,
    sequence_logprobs,
    token_logprobs,
)
from mani_jax.train.metrics import MetricsWriter, count_params, plot_loss_curve, read_metrics, truncate_metrics
from mani_jax.train.optim import OptimConfig, decay_mask, make_optimizer, make_schedule, make_tx
from mani_jax.train.trainer import BATCH_KEYS, TrainConfig, cast_floating, evaluate, make_train_step, train

__all__ = [
    "BATCH_KEYS", "Checkpointer", "MetricsWriter", "OptimConfig", "TrainConfig", "cast_floating",
    "checkpoint_steps", "count_params", "decay_mask", "dpo_loss", "evaluate", "group_advantages", "grpo_loss",
    "kl_estimate", "lm_loss", "make_optimizer", "make_schedule", "make_train_step", "make_tx", "plot_loss_curve",
    "read_metrics", "restore_checkpoint", "sequence_kl", "sequence_logprobs", "token_logprobs", "train",
    "truncate_metrics",
]
