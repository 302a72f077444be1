"""The device mesh: five named axes, sized by a frozen config.

Axes (outermost first, so that the innermost, most talkative axis gets neighbouring devices)::

    pipeline   stages of the layer stack               point-to-point (ppermute) once per microbatch
    data       batch replicas (DP, ZeRO-1)             gradient all-reduce once per step
    fsdp       batch replicas with sharded weights     weight all-gather / gradient reduce-scatter per layer
    expert     MoE experts (and the batch elsewhere)   all-to-all of tokens per MoE layer
    tensor     Megatron column/row splits, vocab       all-reduce of activations per layer

Every mesh this package builds has all five axes; a strategy that does not use one leaves it at size 1,
so the logical-axis rules (:mod:`mani_jax.parallel.rules`) are one table for every layout. The mesh is
built with :func:`jax.make_mesh` (which orders devices for the physical topology on TPU/GPU) and
``AxisType.Auto`` axes: the annotation strategies rely on GSPMD sharding propagation through the model,
whose code carries no per-op sharding annotations, and the ``shard_map`` parts (tensor, pipeline, expert)
make their axes manual inside the map. Explicit axes (sharding in types) are not used: under them the
unmodified model fails at its first ambiguous op (the embedding gather with batch-sharded token ids
asks for an ``out_sharding``), so explicit mode would mean annotating the model's every op.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh

__all__ = ["AXES", "MeshConfig", "make_mesh", "batch_axes"]

#: The mesh axis names, outermost first.
AXES: tuple[str, ...] = ("pipeline", "data", "fsdp", "expert", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the five mesh axes; their product must equal the number of devices used.

    Attributes:
      data, fsdp, tensor, pipeline, expert: axis sizes (positive ints). At most one of them may be ``-1``,
        meaning "all the devices the others leave". ``data`` defaults to ``-1`` unless another axis is
        ``-1`` (then to 1).

    Examples: ``MeshConfig(data=8)`` is pure data parallelism on 8 devices; ``MeshConfig(fsdp=-1)`` FSDP
    over every device; ``MeshConfig(data=2, tensor=2, pipeline=2)`` DP x TP x PP on 8.
    """

    data: int | None = None
    fsdp: int = 1
    tensor: int = 1
    pipeline: int = 1
    expert: int = 1

    def __post_init__(self):
        if self.data is None:
            others = any(getattr(self, a) == -1 for a in AXES if a != "data")
            object.__setattr__(self, "data", 1 if others else -1)
        fills = [a for a in AXES if getattr(self, a) == -1]
        for a in AXES:
            v = getattr(self, a)
            if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
                raise ValueError(f"MeshConfig.{a}: expected a positive int or -1 (fill), got {v!r}")
        if len(fills) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1 (fill), got {fills}")

    def sizes(self, n_devices: int) -> dict[str, int]:
        """The axis sizes for ``n_devices`` devices, the ``-1`` axis resolved.

        Raises:
          ValueError: the sizes do not multiply to ``n_devices`` (or do not divide it, with a fill axis).
        """
        fixed = {a: getattr(self, a) for a in AXES}
        known = math.prod(v for v in fixed.values() if v != -1)
        fill = [a for a, v in fixed.items() if v == -1]
        if fill:
            if n_devices % known:
                raise ValueError(f"MeshConfig: the fixed axes {({a: v for a, v in fixed.items() if v != -1})} "
                                 f"use {known} devices, which does not divide the {n_devices} devices")
            fixed[fill[0]] = n_devices // known
        elif known != n_devices:
            raise ValueError(f"MeshConfig: axis sizes {fixed} multiply to {known}, but {n_devices} devices "
                             "are in use")
        return fixed


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None, **sizes) -> Mesh:
    """A :class:`jax.sharding.Mesh` with axes :data:`AXES` sized by ``config`` (or keyword sizes).

    Args:
      config: a :class:`MeshConfig`; or pass the sizes as keywords (``make_mesh(data=2, tensor=4)``).
      devices: the devices to use (default: all of ``jax.devices()``, every process's in a multi-process
        run).

    Returns:
      The mesh, built by :func:`jax.make_mesh` with ``Auto`` axis types.

    Raises:
      ValueError: both ``config`` and keyword sizes given, or sizes that do not match the device count.
    """
    if config is not None and sizes:
        raise ValueError("make_mesh: pass either config or keyword sizes, not both")
    config = config if config is not None else MeshConfig(**sizes)
    devices = list(jax.devices() if devices is None else devices)
    s = config.sizes(len(devices))
    return jax.make_mesh(tuple(s[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=devices)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over: ``data``, ``fsdp`` and ``expert`` (as MaxText:
    outside the MoE layers the expert axis is one more data axis)."""
    return tuple(a for a in ("data", "fsdp", "expert") if a in mesh.axis_names)
