"""Optimizer: AdamW with linear warmup + cosine decay, global-norm clipping and a weight-decay mask.

The update rule is AdamW (decoupled weight decay; Loshchilov & Hutter, "Decoupled Weight Decay
Regularization", ICLR 2019, Algorithm 2) as implemented by ``optax.adamw``, preceded by gradient clipping
to a maximum global L2 norm (Pascanu et al. 2013). The learning rate follows
``optax.warmup_cosine_decay_schedule``: linear from 0 to ``learning_rate`` over ``warmup_steps``, then a
half-cosine down to ``learning_rate * min_lr_ratio`` at ``total_steps`` (Loshchilov & Hutter, SGDR, 2017),
and constant after that.

Weight decay is *not* applied to parameters that should not be pulled toward zero: norm scales/biases,
biases, Mamba-2's ``A_log``, ``D`` and ``dt_bias``, and every parameter with at most one dimension
(see :func:`decay_mask`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax
from flax import nnx

__all__ = ["OptimConfig", "make_schedule", "make_tx", "make_optimizer", "decay_mask", "NO_DECAY_NAMES"]

#: Path elements (module or parameter names) whose parameters get no weight decay. A path element that
#: *contains* ``"norm"`` (``norm``, ``final_norm``, ``q_norm``, ``RMSNorm_0`` ...) also excludes it.
NO_DECAY_NAMES: frozenset[str] = frozenset({"bias", "A_log", "D", "dt_bias"})


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW + warmup/cosine schedule + clipping hyperparameters.

    Attributes:
      learning_rate: peak learning rate (after warmup), > 0.
      warmup_steps: linear-warmup length in optimizer steps, >= 0.
      total_steps: step at which the cosine reaches its floor; must be > ``warmup_steps``.
      min_lr_ratio: cosine floor as a fraction of ``learning_rate``, in [0, 1].
      weight_decay: decoupled weight-decay coefficient (AdamW's lambda), >= 0.
      b1, b2: Adam moment decay rates, in [0, 1).
      eps: Adam denominator epsilon, > 0.
      grad_clip_norm: maximum global L2 norm of the gradient; ``0`` disables clipping.
    """

    learning_rate: float = 3e-4
    warmup_steps: int = 100
    total_steps: int = 1000
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip_norm: float = 1.0

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"total_steps must be > warmup_steps, got total_steps={self.total_steps}, "
                f"warmup_steps={self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("b1", "b2"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.grad_clip_norm < 0:
            raise ValueError(f"grad_clip_norm must be >= 0 (0 disables clipping), got {self.grad_clip_norm}")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Learning-rate schedule ``step -> lr``: linear warmup from 0, then cosine decay to the floor.

    Args:
      cfg: the optimizer config.

    Returns:
      An optax schedule; called with an int scalar step (Python or jax), returns a float32 scalar.
      ``lr(0) = 0``, ``lr(warmup_steps) = learning_rate``, ``lr(t >= total_steps) = learning_rate *
      min_lr_ratio``.
    """
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.total_steps,  # optax: total length including warmup
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def _key_name(k: Any) -> str:
    """The name of one pytree path element (dict key, attribute or sequence index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _decays(path: tuple, leaf: Any) -> bool:
    if getattr(leaf, "ndim", 0) <= 1:
        return False
    for k in path:
        name = _key_name(k)
        if name in NO_DECAY_NAMES or "norm" in name.lower():
            return False
    return True


def decay_mask(params: Any) -> Any:
    """Which parameters get weight decay: a pytree of bools with the structure of ``params``.

    ``False`` (no decay) for a leaf whose path has an element named ``bias``, ``A_log``, ``D`` or
    ``dt_bias``, or an element containing ``norm`` (case-insensitive), or whose array has ``ndim <= 1``;
    ``True`` otherwise (matrices: embeddings, projections, convolution kernels).

    Args:
      params: a pytree of arrays (an ``nnx.State``, a pure dict, ...). Works both on ``nnx.State`` holding
        ``Variable`` nodes and on pure dicts, so it can be given to ``optax.adamw(mask=...)``.
    """
    return jax.tree_util.tree_map_with_path(_decays, params)


def make_tx(cfg: OptimConfig, mask: Any = decay_mask) -> optax.GradientTransformation:
    """``optax.chain(clip_by_global_norm, adamw(schedule, mask=mask))`` for ``cfg``.

    ``mask``: the weight-decay mask (a pytree of bools or a function of the parameters), default
    :func:`decay_mask`; pipeline-stacked parameters pass one computed on the unstacked shapes."""
    parts = []
    if cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(optax.adamw(
        make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        weight_decay=cfg.weight_decay, mask=mask))
    return optax.chain(*parts)


def make_optimizer(cfg: OptimConfig, model: nnx.Module) -> nnx.Optimizer:
    """An ``nnx.Optimizer`` over the ``nnx.Param`` variables of ``model`` with :func:`make_tx`'s update.

    Optimizer state (Adam moments, step counts) is float32 whenever the parameters are float32 (master
    weights); the trainer keeps parameters in float32 and casts to bfloat16 only inside the step.

    Args:
      cfg: the optimizer config.
      model: the NNX module to optimize.

    Raises:
      TypeError: ``cfg`` is not an ``OptimConfig`` or ``model`` is not an ``nnx.Module``.
    """
    if not isinstance(cfg, OptimConfig):
        raise TypeError(f"cfg must be an OptimConfig, got {type(cfg).__name__}")
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
    return nnx.Optimizer(model, make_tx(cfg), wrt=nnx.Param)
