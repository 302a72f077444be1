"""Expert parallelism with the all-to-all written out: a capacity-based MoE layer under ``shard_map``.

Sharding mode: **manual** (``jax.shard_map`` over the batch axes ``data``, ``fsdp``, ``expert``). Tokens
are split over the batch axes; the stacked expert weights ``[n_experts, ...]`` over ``expert`` (rank ``r``
owns experts ``[r E/P, (r+1) E/P)``). Per layer (GShard, Lepikhin et al. 2020, Sec. 3.2 and Alg. 2;
Switch Transformer, Fedus et al. 2021, Sec. 2.2):

1. every rank routes its own tokens (softmax -> top-k -> renormalise, :func:`mani_jax.core.router`) and
   packs them into a ``[E, C, d_model]`` buffer, ``C`` slots per expert, in the slot-major order of
   :func:`mani_jax.core.moe_capacity` (first choices before second choices, token order within a choice);
2. ``all_to_all`` over ``expert``: rank ``r`` sends its buffer rows for experts ``[j E/P, (j+1) E/P)`` to rank
   ``j`` and receives ``[E/P, P C, d_model]``: its experts' slots from every rank;
3. the local experts run (SwiGLU, one batched matmul per weight);
4. the reverse ``all_to_all`` returns each token's expert output to its rank, where the router weights
   combine them.

Capacity ``C = capacity(local tokens, E, k, capacity_factor)`` is per rank (GShard's local groups), so
which assignments are dropped depends on how the batch is split; with ``capacity_factor >= E / k`` nothing
can be dropped and the layer equals the unsharded dropless :func:`mani_jax.core.moe_ffn` (tested). The
load-balancing and z-losses are computed over the *global* batch (their per-expert sums are ``psum``-ed).

The annotation version (expert weights sharded on ``expert`` by the rules, GSPMD chooses the
collectives) is what :func:`mani_jax.parallel.make_sharded_train_step` trains with ``MeshConfig(expert=N)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from mani_jax import core
from mani_jax.parallel.mesh import batch_axes

__all__ = ["expert_parallel_moe"]

AXIS = "expert"


def _local_moe(x, w_router, w_gate, w_up, w_down, *, top_k, capacity_factor, n_experts, ep, baxes):
    lead, d = x.shape[:-1], x.shape[-1]
    t = math.prod(lead)
    xf = x.reshape(t, d)
    weights, experts, logits = core.router(xf, w_router, top_k=top_k)
    cap = core.capacity(t, n_experts, top_k, capacity_factor)
    # Slot-major assignment order a = j * t + token, positions by a running count per expert (GShard).
    e_a = experts.T.reshape(top_k * t)
    onehot = jax.nn.one_hot(e_a, n_experts, dtype=jnp.int32)
    pos_a = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)
    keep_a = pos_a < cap
    slot = jnp.where(keep_a, e_a * cap + pos_a, n_experts * cap).reshape(top_k, t)  # out of range = dropped
    buf = jnp.zeros((n_experts * cap, d), x.dtype)
    for j in range(top_k):
        buf = buf.at[slot[j]].set(xf, mode="drop")
    buf = buf.reshape(n_experts, cap, d)
    # Each rank sends its slots for expert group j to rank j: [E, C, d] -> [E/ep, ep*C, d].
    recv = jax.lax.all_to_all(buf, AXIS, 0, 1, tiled=True) if ep > 1 else buf
    dt, acc = x.dtype, jnp.promote_types(x.dtype, jnp.float32)
    g = jnp.einsum("ecd,edf->ecf", recv, w_gate.astype(dt), preferred_element_type=acc)
    u = jnp.einsum("ecd,edf->ecf", recv, w_up.astype(dt), preferred_element_type=acc)
    h = (jax.nn.silu(g) * u).astype(dt)
    out = jnp.einsum("ecf,efd->ecd", h, w_down.astype(dt), preferred_element_type=acc).astype(dt)
    back = jax.lax.all_to_all(out, AXIS, 1, 0, tiled=True) if ep > 1 else out  # [E, C, d]
    back = back.reshape(n_experts * cap, d)
    y = jnp.zeros((t, d), acc)
    for j in range(top_k):
        y = y + weights[:, j, None].astype(acc) * back.at[slot[j]].get(mode="fill", fill_value=0)
    # Router losses over the global batch: psum the per-expert sums, then form the products.
    ct = jnp.float32
    counts = jnp.sum(jax.nn.one_hot(experts, n_experts, dtype=ct), axis=(0, 1))
    probs = jnp.sum(jax.nn.softmax(logits.astype(ct), axis=-1), axis=0)
    lse2 = jnp.sum(jax.nn.logsumexp(logits.astype(ct), axis=-1) ** 2)
    n = jnp.asarray(t, ct)
    dropped = jnp.asarray(top_k * t, ct) - jnp.sum(keep_a.astype(ct))
    if baxes:
        counts, probs, lse2, n, dropped = (jax.lax.psum(v, baxes) for v in (counts, probs, lse2, n, dropped))
    f = counts / (top_k * n)
    lb = n_experts * jnp.sum(jax.lax.stop_gradient(f) * probs / n)
    aux = {"load_balancing_loss": lb, "router_z_loss": lse2 / n, "dropped_fraction": dropped / (top_k * n),
           "expert_counts": counts, "capacity": jnp.asarray(cap, jnp.int32)}
    return y.astype(dt).reshape(x.shape), aux


def expert_parallel_moe(x: jax.Array, w_router: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
                        *, mesh: Mesh, top_k: int, capacity_factor: float) -> tuple[jax.Array, dict]:
    """Routed SwiGLU MoE with experts split over the ``expert`` mesh axis and all-to-all dispatch.

    Args:
      x: ``[batch, seq, d_model]``; the batch is split over ``data`` x ``fsdp`` x ``expert``.
      w_router: ``[d_model, n_experts]`` (replicated).
      w_gate, w_up: ``[n_experts, d_model, d_ff]``; w_down: ``[n_experts, d_ff, d_model]`` (split on axis 0).
      mesh: a mesh from :func:`mani_jax.parallel.make_mesh`; ``tensor`` and ``pipeline`` must be 1.
      top_k: experts per token. capacity_factor: slots per expert per rank, as :func:`mani_jax.core.capacity`.

    Returns:
      ``(y like x, aux)``; ``aux``: ``load_balancing_loss``, ``router_z_loss`` (global batch, as
      :func:`mani_jax.core.moe_ffn`), ``dropped_fraction``, ``expert_counts [n_experts]`` (float32, routed
      assignments before dropping), ``capacity`` (slots per expert per rank).

    Raises:
      ValueError: ``n_experts`` not divisible by the ``expert`` axis, batch not divisible by the batch
        axes, other axes > 1, or mismatched weight shapes.
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
    other = {a: n for a, n in mesh.shape.items() if a in ("tensor", "pipeline") and n > 1}
    if other:
        raise ValueError(f"mesh: expert_parallel_moe splits tokens and experts only; got {other}")
    ep = mesh.shape.get(AXIS, 1)
    if n_experts % ep:
        raise ValueError(f"n_experts={n_experts} is not divisible by the 'expert' mesh axis of size {ep}")
    baxes = tuple(a for a in batch_axes(mesh) if mesh.shape[a] > 1)
    nb = math.prod(mesh.shape[a] for a in baxes)
    if x.shape[0] % nb:
        raise ValueError(f"x: batch {x.shape[0]} is not divisible by the {nb} batch shards {baxes}")
    core.capacity(1, n_experts, top_k, capacity_factor)  # validates top_k and capacity_factor early
    bspec = P(baxes if baxes else None)
    wspec = P(AXIS if ep > 1 else None)

    def local(x, w_router, w_gate, w_up, w_down):
        return _local_moe(x, w_router, w_gate, w_up, w_down, top_k=top_k, capacity_factor=capacity_factor,
                          n_experts=n_experts, ep=ep, baxes=baxes)

    aux_specs = {"load_balancing_loss": P(), "router_z_loss": P(), "dropped_fraction": P(),
                 "expert_counts": P(), "capacity": P()}
    fn = jax.shard_map(local, mesh=mesh, in_specs=(bspec, P(), wspec, wspec, wspec), out_specs=(bspec, aux_specs))
    return jax.jit(fn)(x, w_router, w_gate, w_up, w_down)
