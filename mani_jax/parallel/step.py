"""The sharded train step for the annotation strategies: data parallel, FSDP (ZeRO-3), ZeRO-1, tensor
parallel by annotation, expert parallel by annotation, and their products.

Sharding mode: **auto** (GSPMD). The step is the trainer's own
(:func:`mani_jax.train.trainer.make_train_step`: same loss, same AdamW, same metrics) jitted once more
with ``in_shardings`` / ``out_shardings`` from the logical-axis rules, and traced inside
:func:`mani_jax.models.sharding.activation_sharding`, which turns the model's residual-stream hints into
sharding constraints (batch split, sequence and ``d_model`` whole). XLA's SPMD partitioner propagates the
shardings and inserts the collectives. (Without the activation constraints GSPMD spreads FSDP's split of
``d_model`` into the activations: the tiny model's FSDP step then moved 441 MiB per device instead of
62 MiB.)

* **data parallel** (``MeshConfig(data=N)``): parameters and optimizer state replicated, the batch split;
  one all-reduce of the gradients per step.
* **FSDP / ZeRO-3** (``MeshConfig(fsdp=N)``; Rajbhandari et al. 2020, "ZeRO", Sec. 5 P_os+g+p; PyTorch
  FSDP, Zhao et al. 2023): parameters, gradients and moments split along ``d_model``; every weight is
  all-gathered where it is used, its gradient reduced back to the shard (a reduce-scatter on GPU/TPU; the
  CPU backend keeps all-reduce + slice, XLA's reduce-scatter rewrite is not in its pipeline).
* **ZeRO-1** (``MeshConfig(data=N)`` + ``zero1=True``; ZeRO Sec. 5.1 P_os): parameters replicated, Adam
  moments split over ``data``; the gradients are constrained to the moments' sharding (a
  reduce-scatter where the backend forms one, else all-reduce + slice), each replica updates its slice,
  and the new parameters are all-gathered by the replicated ``out_shardings``.
* **tensor parallel by annotation** (``MeshConfig(tensor=N)``): the Megatron column/row splits of
  :data:`~mani_jax.parallel.rules.LOGICAL_RULES` as parameter shardings; GSPMD finds the all-reduce after
  each row-parallel matmul. (The explicit version is :mod:`mani_jax.parallel.tensor`.)
* **expert parallel** (``MeshConfig(expert=N)``): stacked expert weights split on their expert axis, tokens
  on the batch axes. With ``ModelConfig.moe_dispatch="all_to_all"`` the MoE layers are a ``shard_map``
  with the two all-to-alls written out (:mod:`mani_jax.parallel.expert`; they find this step's mesh through
  the activation-sharding context); with any other dispatch GSPMD chooses the collectives.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mani_jax.models.sharding import activation_sharding
from mani_jax.parallel.mesh import batch_axes
from mani_jax.parallel.rules import LOGICAL_RULES, Rules, batch_sharding, shard_train_state, spec_for, \
    tree_shardings, with_rules, _add_axis
from mani_jax.train.trainer import BATCH_KEYS, make_train_step

__all__ = ["make_sharded_train_step", "shard_batch", "sharded_step_factory"]


def shard_batch(batch: dict[str, Any], mesh: Mesh, keys=BATCH_KEYS) -> dict[str, jax.Array]:
    """Place a global batch on ``mesh`` with the batch dimension split over ``data``/``fsdp``/``expert``.

    Every process passes the same full ``[batch, seq]`` host arrays (the usual case in tests and small
    runs); each process materialises only its addressable shards (:func:`jax.make_array_from_callback`),
    so this works in one process and in a ``jax.distributed`` multi-process run alike.

    Raises:
      ValueError: a key is missing, or the batch size is not divisible by the batch axes' total size.
    """
    out = {}
    for k in keys:
        if k not in batch:
            raise ValueError(f"batch: missing key {k!r}; expected {list(keys)}")
        x = np.asarray(batch[k])
        sh = batch_sharding(mesh, x.ndim)
        n = int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))
        if x.ndim == 0 or x.shape[0] % n:
            raise ValueError(f"batch[{k!r}]: shape {x.shape}: the batch size must be divisible by the {n} batch "
                             "shards (mesh axes data x fsdp x expert)")
        out[k] = jax.make_array_from_callback(x.shape, sh, lambda idx, x=x: x[idx])
    return out


def make_sharded_train_step(model: nnx.Module, optimizer: nnx.Optimizer, mesh: Mesh,
                            schedule: optax.Schedule, *, compute_dtype: str = "float32",
                            rules: Rules = LOGICAL_RULES, zero1: bool = False) -> tuple[Callable, Any, Any]:
    """Place ``(model, optimizer)`` on ``mesh`` and build the jitted, sharded train step.

    Args:
      model, optimizer: as the trainer takes them (``optimizer = make_optimizer(cfg, model)``).
      mesh: from :func:`mani_jax.parallel.make_mesh`; its shape picks DP / FSDP / TP / EP and products.
      schedule: the learning-rate schedule (``make_schedule(optim_config)``).
      compute_dtype: ``"float32"`` or ``"bfloat16"`` (as :class:`~mani_jax.train.TrainConfig`).
      rules: logical-axis rules for the parameters (default :data:`~mani_jax.parallel.rules.LOGICAL_RULES`).
      zero1: split the optimizer state (and the gradients) over ``data`` while the parameters stay
        replicated over it (ZeRO-1).

    Returns:
      ``(step, state, shardings)``. ``step(state, batch) -> (state, metrics)`` is the trainer's step
      (same metrics) with ``state`` donated; ``batch`` is a dict of ``[batch, seq]`` arrays, host numpy
      in a single process or :func:`shard_batch` output (required in a multi-process run). ``state`` is
      ``nnx.split((model, optimizer))[1]`` on the mesh; ``nnx.update((model, optimizer), state)`` brings
      the Python objects up to date. ``shardings`` is the state's sharding tree.

    Raises:
      ValueError: the model cannot be split on ``mesh`` (see
        :func:`~mani_jax.parallel.rules.check_model_config`), or an unknown ``compute_dtype``.
    """
    if compute_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"compute_dtype: expected 'float32' or 'bfloat16', got {compute_dtype!r}")
    graphdef, state, shardings = shard_train_state(model, optimizer, mesh, rules, zero1=zero1)
    grad_transform = None
    if zero1 and mesh.shape["data"] > 1:
        opt_rules = with_rules(rules, embed=_add_axis(dict(rules)["embed"], "data"))
        grad_sh = tree_shardings(nnx.state(model, nnx.Param), mesh, opt_rules)

        def constrain_grads(grads):
            return jax.lax.with_sharding_constraint(grads, grad_sh)

        grad_transform = constrain_grads

    inner = make_train_step(graphdef, schedule, compute_dtype, grad_transform=grad_transform)

    def traced(state, batch):
        # The model's activation hints (mani_jax.models.sharding.constrain) become sharding constraints.
        with activation_sharding(mesh, lambda names, shape: spec_for(names, shape, mesh, rules, where="activation")):
            return inner(state, batch)

    step = jax.jit(traced, in_shardings=(shardings, batch_sharding(mesh)),
                   out_shardings=(shardings, NamedSharding(mesh, P())),
                   donate_argnums=0)
    return step, state, shardings


def sharded_step_factory(mesh: Mesh, *, rules: Rules = LOGICAL_RULES, zero1: bool = False) -> Callable:
    """A ``step_factory`` for :func:`mani_jax.train.train`: the loop (logging, evaluation, orbax checkpoints,
    exact resume) then runs :func:`make_sharded_train_step` on ``mesh`` (single process: host batches are
    placed by the step's ``in_shardings``)."""

    def factory(model, optimizer, schedule, compute_dtype):
        step, state, _ = make_sharded_train_step(model, optimizer, mesh, schedule, compute_dtype=compute_dtype,
                                                 rules=rules, zero1=zero1)
        return step, state

    return factory
