"""Training: optimizer + schedule, losses, the jitted train step and loop, orbax checkpoints, metrics.

Public API::

    from mani_jax.train import TrainConfig, train, evaluate, OptimConfig, make_optimizer, lm_loss
    from mani_jax.train import Checkpointer, restore_checkpoint, count_params

Speed note: the train step is ``jax.jit`` over the ``nnx.split`` state of ``(model, optimizer)`` (graph
definition closed over, state donated), not ``nnx.jit`` on the objects. Measured on the 2-core development
CPU (jax 0.11.2, flax 0.12.12), per step after compilation, AdamW, float32:

    model (vocab, d_model, layers, batch x seq)   jax.jit(split)   nnx.jit   nnx.jit(graph=False)
    64, 32, 2, 2x16                                 0.64 ms         2.38 ms      1.17 ms
    64, 32, 12, 2x16                                1.9-2.6 ms      11.5 ms      4.75 ms
    256, 128, 4, 8x128 (compute-bound)              18-35 ms        21-38 ms     35 ms  (noise > difference)

``nnx.jit``'s cost is Python graph traversal per call, growing with the number of modules/variables;
it disappears once compute dominates, so the gain matters for small models and CPU runs.
"""

from mani_jax.train.checkpoint import Checkpointer, checkpoint_steps, restore_checkpoint
from mani_jax.train.losses import lm_loss
from mani_jax.train.metrics import MetricsWriter, count_params, plot_loss_curve, read_metrics, truncate_metrics
from mani_jax.train.optim import OptimConfig, decay_mask, make_optimizer, make_schedule, make_tx
from mani_jax.train.trainer import BATCH_KEYS, TrainConfig, cast_floating, evaluate, make_train_step, train

__all__ = [
    "BATCH_KEYS", "Checkpointer", "MetricsWriter", "OptimConfig", "TrainConfig", "cast_floating",
    "checkpoint_steps", "count_params", "decay_mask", "evaluate", "lm_loss", "make_optimizer", "make_schedule",
    "make_train_step", "make_tx", "plot_loss_curve", "read_metrics", "restore_checkpoint", "train",
    "truncate_metrics",
]
