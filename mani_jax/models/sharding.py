"""Activation sharding constraints by logical axis name: a no-op unless a caller activates a mesh.

The model marks a few activations with logical names (the residual stream between blocks is
``("batch", "act_seq", "act_embed")``); :func:`constrain` turns them into
``jax.lax.with_sharding_constraint`` only inside an :func:`activation_sharding` context, which
:mod:`mani_jax.parallel` opens while it traces a sharded step, with its mesh and a function from logical
names to a ``PartitionSpec`` (its rules table). Outside such a context (single-device training,
inference, export) nothing changes. This is flax.linen's ``logical_axis_rules`` /
``with_logical_constraint`` pattern (MaxText annotates activations the same way): without these
constraints GSPMD propagates the FSDP weight sharding (split ``d_model``) into the activations and
all-reduces partial activations instead of all-gathering weights, which multiplies the traffic.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["activation_sharding", "constrain", "current_mesh"]

_STATE = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, to_spec: Callable[[Sequence[str | None], tuple[int, ...]], PartitionSpec]
                        ) -> Iterator[None]:
    """Within the block, :func:`constrain` pins activations to ``NamedSharding(mesh, to_spec(names, shape))``.

    Open it around the tracing of a jitted function (``jit(f).lower(...)`` or its first call)."""
    prev = getattr(_STATE, "ctx", None)
    _STATE.ctx = (mesh, to_spec)
    try:
        yield
    finally:
        _STATE.ctx = prev


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """``x`` with the sharding its logical axis names map to, inside :func:`activation_sharding`; else ``x``."""
    ctx = getattr(_STATE, "ctx", None)
    if ctx is None:
        return x
    mesh, to_spec = ctx
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, to_spec(tuple(logical), tuple(x.shape))))


def current_mesh() -> Mesh | jax.sharding.AbstractMesh | None:
    """The mesh a sharded step is being traced on: that of the enclosing :func:`activation_sharding`
    (:func:`mani_jax.parallel.make_sharded_train_step` opens it), else the mesh set with ``jax.set_mesh``,
    else None. Layers that write their collectives out (``MoEFFN``'s all-to-all) read it."""
    ctx = getattr(_STATE, "ctx", None)
    if ctx is not None:
        return ctx[0]
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh
