"""Expert parallelism with the all-to-all written out: a capacity-based MoE layer under ``shard_map``.

This is the layer the MoE model trains through: ``ModelConfig(moe_dispatch="all_to_all",
capacity_factor=...)`` makes :class:`mani_jax.models.hybrid.MoEFFN` call :func:`expert_parallel_moe` with
the mesh of the sharded step being traced (:func:`mani_jax.models.sharding.current_mesh`, set by
:func:`mani_jax.parallel.make_sharded_train_step`), so ``MeshConfig(expert=N)`` (times ``data`` / ``fsdp``)
trains with two all-to-alls per MoE layer forward (four with the backward). Off a mesh, or with an
``expert`` axis of 1, the same per-rank code runs on the whole batch (one capacity group, no collectives),
so the one-device run of that config is its reference.

Sharding mode: **manual** over the batch axes ``data``, ``fsdp``, ``expert`` (``jax.shard_map`` with
``axis_names`` = those of size > 1); ``tensor`` stays auto inside the map, so an expert's ``d_ff`` may
still be split by the rules. Tokens are split over the batch axes; the stacked expert weights
``[n_experts, ...]`` over ``expert`` (rank ``r`` owns experts ``[r E/P, (r+1) E/P)``). Per layer (GShard,
Lepikhin et al. 2020, Sec. 3.2 and Alg. 2; Switch Transformer, Fedus et al. 2021, Sec. 2.2):

1. every rank routes its own tokens (softmax -> top-k -> renormalise, :func:`mani_jax.core.router`) and
   packs them into a ``[E, C, d_model]`` buffer, ``C`` slots per expert, in the slot-major order of
   :func:`mani_jax.core.moe.capacity_slots` (first choices before second choices, token order within a
   choice; the same helpers as :func:`mani_jax.core.moe_capacity`'s ``"gather"`` dispatch);
2. ``all_to_all`` over ``expert``: rank ``r`` sends its buffer rows for experts ``[j E/P, (j+1) E/P)`` to rank
   ``j`` and receives ``[E/P, P C, d_model]``: its experts' slots from every rank;
3. the local experts run (SwiGLU, one batched matmul per weight);
4. the reverse ``all_to_all`` returns each token's expert output to its rank, where the router weights
   combine them.

Capacity ``C = capacity(local tokens, E, k, capacity_factor)`` is per rank (GShard's local groups), so
which assignments are dropped depends on how the batch is split; with ``capacity_factor >= E / k`` nothing
can be dropped and the layer equals the unsharded dropless :func:`mani_jax.core.moe_ffn` (tested, and the
model trained on ``data=2 x expert=4`` equals the one-device run). The load-balancing and z-losses are
computed over the *global* batch (their per-expert sums are ``psum``-ed); the routing (``experts``,
``weights``, ``logits``) comes back split over the batch for the utilisation statistics.

The annotation version (any other ``moe_dispatch``, including the dropless MoE: expert weights sharded on
``expert`` by the rules, GSPMD chooses the collectives) remains what a dropless MoE trains with under
``MeshConfig(expert=N)``; it needs no capacity, but GSPMD moves weights rather than tokens for it (more
bytes than data parallelism in ``experiments/parallelism.py``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P

from mani_jax import core
from mani_jax.core.moe import _swiglu_dense, capacity_slots, slots_combine, slots_dispatch
from mani_jax.parallel.mesh import batch_axes

__all__ = ["expert_parallel_moe"]

AXIS = "expert"


def _local_moe(x, w_router, w_gate, w_up, w_down, *, top_k, capacity_factor, ep, baxes):
    """One rank's part (the whole layer when ``ep == 1`` and ``baxes == ()``): route, pack, all-to-all,
    experts, all-to-all back, combine; router losses psum-ed over ``baxes``."""
    n_experts = w_router.shape[1]
    lead, d = x.shape[:-1], x.shape[-1]
    t = math.prod(lead)
    dt, acc = x.dtype, jnp.promote_types(x.dtype, jnp.float32)
    xf = x.reshape(t, d)
    weights, experts, logits = core.router(xf, w_router, top_k=top_k)
    cap = core.capacity(t, n_experts, top_k, capacity_factor)
    _, slot, keep, counts = capacity_slots(experts, n_experts, cap)
    buf = slots_dispatch(xf, slot, n_experts, cap)  # [E, C, d]
    # Each rank sends its slots for expert group j to rank j: [E, C, d] -> [E/ep, ep*C, d].
    recv = jax.lax.all_to_all(buf, AXIS, 0, 1, tiled=True) if ep > 1 else buf
    out = _swiglu_dense(recv, w_gate, w_up, w_down).astype(dt)  # the local experts; sent back in x's dtype
    back = jax.lax.all_to_all(out, AXIS, 1, 0, tiled=True) if ep > 1 else out  # [E, C, d]
    y = slots_combine(back, slot, weights, acc)
    # Router losses over the global batch: psum the per-expert sums, then form the products.
    ct = jnp.float32
    counts = counts.astype(ct)
    probs = jnp.sum(jax.nn.softmax(logits.astype(ct), axis=-1), axis=0)
    lse2 = jnp.sum(jax.nn.logsumexp(logits.astype(ct), axis=-1) ** 2)
    n = jnp.asarray(t, ct)
    dropped = jnp.asarray(top_k * t, ct) - jnp.sum(keep.astype(ct))
    if baxes:
        counts, probs, lse2, n, dropped = (jax.lax.psum(v, baxes) for v in (counts, probs, lse2, n, dropped))
    f = counts / (top_k * n)
    lb = n_experts * jnp.sum(jax.lax.stop_gradient(f) * probs / n)
    aux = {"load_balancing_loss": lb, "router_z_loss": lse2 / n, "dropped_fraction": dropped / (top_k * n),
           "expert_counts": counts, "capacity": jnp.asarray(cap, jnp.int32),
           "experts": experts.reshape(*lead, top_k), "weights": weights.reshape(*lead, top_k),
           "logits": logits.reshape(*lead, n_experts)}
    return y.astype(dt).reshape(x.shape), aux


def expert_parallel_moe(x: jax.Array, w_router: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
                        *, mesh: Mesh | AbstractMesh | None, top_k: int, capacity_factor: float
                        ) -> tuple[jax.Array, dict]:
    """Routed SwiGLU MoE with experts split over the ``expert`` mesh axis and all-to-all dispatch.

    Traceable (no jit of its own): call it under ``jax.jit`` or inside a jitted model (``MoEFFN`` with
    ``moe_dispatch="all_to_all"`` does). With ``mesh=None`` or an ``expert`` axis of size 1 it runs the
    same per-rank code on the whole batch, no ``shard_map``: one capacity group, no collectives.

    Args:
      x: ``[batch, seq, d_model]``; the batch is split over ``data`` x ``fsdp`` x ``expert``.
      w_router: ``[d_model, n_experts]`` (replicated).
      w_gate, w_up: ``[n_experts, d_model, d_ff]``; w_down: ``[n_experts, d_ff, d_model]`` (split on axis 0).
      mesh: a mesh from :func:`mani_jax.parallel.make_mesh` (or its abstract mesh), or None. The map is
        manual over the batch axes only: ``tensor`` / ``pipeline`` stay auto (GSPMD) inside it.
      top_k: experts per token. capacity_factor: slots per expert per rank, as :func:`mani_jax.core.capacity`.

    Returns:
      ``(y like x, aux)``; ``aux``: ``load_balancing_loss``, ``router_z_loss`` (global batch, as
      :func:`mani_jax.core.moe_ffn`), ``dropped_fraction``, ``expert_counts [n_experts]`` (float32, routed
      assignments before dropping), ``capacity`` (slots per expert per rank), and the routing, split over
      the batch like ``x``: ``experts`` (int32) and ``weights`` ``[batch, seq, top_k]``, ``logits``
      ``[batch, seq, n_experts]`` (float32).

    Raises:
      ValueError: ``n_experts`` not divisible by the ``expert`` axis, batch not divisible by the batch
        axes, bad ``top_k`` / ``capacity_factor``, or mismatched weight shapes.
    """
    if x.ndim != 3:
        raise ValueError(f"x: expected [batch, seq, d_model], got shape {x.shape}")
    d = x.shape[-1]
    if w_router.ndim != 2 or w_router.shape[0] != d:
        raise ValueError(f"w_router: expected [d_model={d}, n_experts], got {w_router.shape}")
    n_experts = w_router.shape[1]
    if w_gate.shape[:2] != (n_experts, d) or w_up.shape != w_gate.shape or \
            w_down.shape != (n_experts, w_gate.shape[2], d):
        raise ValueError(f"w_gate, w_up, w_down: expected [{n_experts}, {d}, d_ff] x2 and [{n_experts}, d_ff, {d}], "
                         f"got {w_gate.shape}, {w_up.shape}, {w_down.shape}")
    core.capacity(1, n_experts, top_k, capacity_factor)  # validates top_k and capacity_factor early
    ep = 1 if mesh is None else dict(mesh.shape).get(AXIS, 1)
    if ep == 1:
        return _local_moe(x, w_router, w_gate, w_up, w_down, top_k=top_k, capacity_factor=capacity_factor, ep=1,
                          baxes=())
    if n_experts % ep:
        raise ValueError(f"n_experts={n_experts} is not divisible by the 'expert' mesh axis of size {ep}")
    baxes = tuple(a for a in batch_axes(mesh) if mesh.shape[a] > 1)
    nb = math.prod(mesh.shape[a] for a in baxes)
    if x.shape[0] % nb:
        raise ValueError(f"x: batch {x.shape[0]} is not divisible by the {nb} batch shards {baxes}")
    bspec, wspec = P(baxes), P(AXIS)

    def local(x, w_router, w_gate, w_up, w_down):
        return _local_moe(x, w_router, w_gate, w_up, w_down, top_k=top_k, capacity_factor=capacity_factor,
                          ep=ep, baxes=baxes)

    aux_specs = {"load_balancing_loss": P(), "router_z_loss": P(), "dropped_fraction": P(),
                 "expert_counts": P(), "capacity": P(), "experts": bspec, "weights": bspec, "logits": bspec}
    fn = jax.shard_map(local, mesh=mesh, in_specs=(bspec, P(), wspec, wspec, wspec), out_specs=(bspec, aux_specs),
                       axis_names=set(baxes))
    return fn(x, w_router, w_gate, w_up, w_down)
