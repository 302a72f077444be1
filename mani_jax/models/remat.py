"""Activation rematerialisation (gradient checkpointing) per block, by name.

Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost": keep fewer forward intermediates and
recompute them in the backward pass. Policies (``ModelConfig.remat``, one for every block or one per
layer; :data:`mani_jax.models.config.REMAT_POLICIES`):

* ``"none"``      -- no remat: autodiff keeps every residual it needs (most memory, no recompute).
* ``"full"``      -- keep only the block's input (``jax.checkpoint_policies.nothing_saveable``); the whole
  block's forward runs again in the backward pass (least memory, ~1 extra forward).
* ``"save_dots"`` -- keep the outputs of matmuls without batch dimensions (the projections:
  ``dots_with_no_batch_dims_saveable``), recompute the cheap elementwise ops, norms and the attention
  score / SSD chunk products (MaxText's ``minimal``-style policy).
* ``"offload"``   -- like ``save_dots`` but the saved matmul outputs go to pinned host memory
  (``offload_dot_with_no_batch_dims("device", "pinned_host")``) and come back for the backward pass. On
  GPU/TPU this trades PCIe/host bandwidth for device memory; on the CPU backend host and device memory are
  the same, so it compiles and runs with nothing to move.

Remat changes memory and time, never values: gradients are identical up to floating-point reassociation
(tested in ``tests/test_parallel.py``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

__all__ = ["checkpoint_policy", "remat_call"]


def checkpoint_policy(name: str) -> Callable | None:
    """The :func:`jax.checkpoint` policy of a remat policy name (``None`` for ``"full"``: save nothing).

    Raises:
      ValueError: ``name`` is not one of ``none``, ``full``, ``save_dots``, ``offload`` (``"none"`` has
        no policy: do not checkpoint at all).
    """
    cp = jax.checkpoint_policies
    if name == "full":
        return cp.nothing_saveable
    if name == "save_dots":
        return cp.dots_with_no_batch_dims_saveable
    if name == "offload":
        return cp.offload_dot_with_no_batch_dims("device", "pinned_host")
    raise ValueError(f"remat: expected 'full', 'save_dots' or 'offload' for a checkpoint policy, got {name!r}")


def remat_call(block: nnx.Module, policy: str, x: jax.Array, **kwargs) -> Any:
    """``block(x, **kwargs)`` under the remat ``policy`` (``"none"`` calls it directly).

    ``kwargs`` are arrays or ``None`` (``positions``, ``segment_ids``); the block's parameters are
    closed over by :func:`flax.nnx.remat`, so their gradients flow as usual.
    """
    if policy == "none":
        return block(x, **kwargs)
    names = sorted(kwargs)

    def run(b, x, *vals):
        return b(x, **dict(zip(names, vals)))

    return nnx.remat(run, policy=checkpoint_policy(policy))(block, x, *(kwargs[k] for k in names))
