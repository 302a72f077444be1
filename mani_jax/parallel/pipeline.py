"""Pipeline parallelism: the layer stack cut into stages over the ``pipeline`` mesh axis, microbatches
passed stage to stage with ``ppermute``, GPipe and 1F1B schedules.

Sharding mode: ``jax.shard_map`` **manual over ``pipeline``** and over the batch axes that split no
parameter (``data``, ``expert``: each shard accumulates its gradients over the ticks and ``psum`` s them
once at the end); ``fsdp`` and ``tensor`` stay ``Auto``, so inside a stage GSPMD still applies the FSDP /
tensor shardings of the rules (DP x TP x PP is one mesh). Stage ``s`` holds layers ``[s L/p, (s+1) L/p)``: the parameters of each stage's blocks
are stacked along a leading ``[p]`` axis split over ``pipeline`` (logical axis ``stage``). Every stage must
have the same block pattern (attention / Mamba-2 per position), e.g. ``hybrid_layer_types(12, 3)`` on 2 or
4 stages. The embedding runs before the pipeline, replicated over ``pipeline``; the final norm, the LM
head and the loss run on the last stage.

Schedules (``p`` stages, ``m`` microbatches; one tick = one stage op, all stages in lock step):

* **GPipe** (Huang et al. 2019): all forwards (ticks ``0 .. m+p-2``; stage ``s`` runs microbatch
  ``t - s``), then all backwards. Written as the forward loop only; ``jax.grad`` transposes it (the
  transpose of a ``ppermute`` to the next stage is a ``ppermute`` to the previous one), so the backward
  is the mirror image. Every stage keeps the residuals of all its ``m`` microbatches (use
  ``ModelConfig.remat`` to keep only block inputs).
* **1F1B** (PipeDream-Flush; Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
  Clusters", Sec. 2.2, Fig. 4): stage ``s`` runs ``p - s - 1`` warm-up forwards, then alternates one
  forward and one backward, then drains. The backward is written out: a stage keeps only the *inputs* of
  its in-flight microbatches (at most ``p - s``), recomputes the stage forward under ``jax.vjp`` when the
  cotangent arrives, accumulates parameter gradients and sends the input cotangent back with
  ``ppermute``. It is wrapped in a ``jax.custom_vjp`` whose forward already computes the gradients, so a
  caller differentiates the loss as usual.

Both have the bubble ``(p - 1) / (m + p - 1)`` of the ideal schedule (:func:`bubble_fraction` counts it
from the tick table the code runs); 1F1B's gain is memory (``O(p)`` instead of ``O(m)`` microbatches
alive), which lets ``m`` grow to shrink the bubble.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mani_jax import core
from mani_jax.models.config import ModelConfig
from mani_jax.models.remat import remat_call
from mani_jax.parallel.multiprocess import is_abstract, place
from mani_jax.parallel.rules import LOGICAL_RULES, Rules, batch_sharding, check_model_config, path_names, \
    tree_shardings
from mani_jax.train.optim import OptimConfig, decay_mask, make_tx

__all__ = ["Schedule", "schedule_table", "bubble_fraction", "peak_in_flight", "split_stages", "merge_stages",
           "pipeline_loss",
           "make_pipeline_train_step"]

Schedule = Literal["gpipe", "1f1b"]
AXIS = "pipeline"
IDLE, FWD, BWD = 0, 1, 2


# ------------------------------------------------------------------------------------------- schedules
@dataclasses.dataclass(frozen=True)
class _Table:
    """A lock-step schedule: ``op[t, s]`` in {IDLE, FWD, BWD} on microbatch ``mb[t, s]``."""

    op: np.ndarray
    mb: np.ndarray


def schedule_table(schedule: Schedule, n_stages: int, n_micro: int) -> _Table:
    """The tick-by-stage table of a schedule (one op per stage per tick, ops of equal length).

    GPipe: forwards at ticks ``s .. s+m-1`` on stage ``s``, then the mirrored backwards (``2 (m + p - 1)``
    ticks). 1F1B: simulated PipeDream-Flush order (``min(p-s-1, m)`` warm-up forwards, then F/B
    alternating, then the remaining backwards), each op at the first tick its input is ready (a forward
    needs the previous stage's forward of that microbatch from an earlier tick; a backward needs its own
    forward and the next stage's backward).

    Returns:
      ``_Table`` with int32 arrays ``op [ticks, p]`` and ``mb [ticks, p]`` (``mb`` is 0 when idle).

    Raises:
      ValueError: unknown ``schedule`` or non-positive sizes.
    """
    p, m = n_stages, n_micro
    if p < 1 or m < 1:
        raise ValueError(f"n_stages, n_micro: expected positive ints, got {p}, {m}")
    if schedule == "gpipe":
        t_f = m + p - 1
        op = np.zeros((2 * t_f, p), np.int32)
        mb = np.zeros((2 * t_f, p), np.int32)
        for s in range(p):
            for i in range(m):
                op[i + s, s], mb[i + s, s] = FWD, i
                tb = t_f + (p - 1 - s) + (m - 1 - i)  # mirror image: last microbatch's backward first
                op[tb, s], mb[tb, s] = BWD, i
        return _Table(op, mb)
    if schedule != "1f1b":
        raise ValueError(f"schedule: expected 'gpipe' or '1f1b', got {schedule!r}")
    seqs = []
    for s in range(p):
        warm = min(p - 1 - s, m)
        seq = [(FWD, i) for i in range(warm)]
        for i in range(m - warm):
            seq += [(FWD, warm + i), (BWD, i)]
        seq += [(BWD, i) for i in range(m - warm, m)]
        seqs.append(seq)
    done_f = np.full((p, m), -1)
    done_b = np.full((p, m), -1)
    pos = [0] * p
    rows_op, rows_mb = [], []
    t = 0
    while any(pos[s] < len(seqs[s]) for s in range(p)):
        row_op, row_mb = [IDLE] * p, [0] * p
        for s in range(p):
            if pos[s] >= len(seqs[s]):
                continue
            kind, i = seqs[s][pos[s]]
            if kind == FWD:
                ready = s == 0 or 0 <= done_f[s - 1, i] < t
            else:
                ready = 0 <= done_f[s, i] < t and (s == p - 1 or 0 <= done_b[s + 1, i] < t)
            if ready:
                row_op[s], row_mb[s] = kind, i
        for s in range(p):
            if row_op[s] != IDLE:
                (done_f if row_op[s] == FWD else done_b)[s, row_mb[s]] = t
                pos[s] += 1
        rows_op.append(row_op)
        rows_mb.append(row_mb)
        t += 1
        if t > 4 * (m + p) + 8:
            raise AssertionError("1F1B simulation did not terminate")  # a bug, not bad input
    return _Table(np.asarray(rows_op, np.int32), np.asarray(rows_mb, np.int32))


def bubble_fraction(table: _Table) -> float:
    """Idle stage-ticks over all stage-ticks of a schedule table (ops of equal length).

    Both schedules give ``(p - 1) / (m + p - 1)``, the GPipe bubble (Huang et al. 2019, Sec. 2.2)."""
    return float(np.mean(table.op == IDLE))


def peak_in_flight(table: _Table) -> list[int]:
    """Per stage, the most microbatches whose forward ran and whose backward has not: the activations a
    stage must keep (GPipe: ``m``; 1F1B: ``p - s``)."""
    ticks, p = table.op.shape
    out = []
    for s in range(p):
        live, peak = 0, 0
        for t in range(ticks):
            live += int(table.op[t, s] == FWD) - int(table.op[t, s] == BWD)
            peak = max(peak, live)
        out.append(peak)
    return out


# ------------------------------------------------------------------------------------ stage parameters
def _check_stages(cfg: ModelConfig, n_stages: int) -> int:
    if n_stages < 1 or cfg.n_layers % n_stages:
        raise ValueError(f"n_stages: {n_stages} does not divide ModelConfig.n_layers={cfg.n_layers}")
    k = cfg.n_layers // n_stages
    pats = {(tuple(cfg.layer_types[s * k:(s + 1) * k]), tuple(cfg.remat_policies[s * k:(s + 1) * k]))
            for s in range(n_stages)}
    if len(pats) > 1:
        raise ValueError(f"ModelConfig.layer_types: every pipeline stage must have the same block pattern (and "
                         f"remat), but {n_stages} stages of {k} layers give {sorted(pats)}; choose n_stages "
                         "so the attention period divides the layers per stage")
    if cfg.n_experts:
        raise ValueError("ModelConfig.n_experts: the pipeline does not support MoE blocks (their router losses "
                         "are taken over the whole batch, which microbatching changes); use expert or tensor "
                         "parallelism for MoE models")
    return k


def split_stages(model: nnx.Module, n_stages: int) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """Cut a :class:`~mani_jax.models.HybridLM` into ``n_stages`` equal stages.

    Returns:
      ``(stage_graphdef, params)``: the graph of one stage's blocks (an ``nnx.List`` of ``L / p``
      :class:`~mani_jax.models.hybrid.Block`), and ``params = {"stages": ..., "rest": ...}``:
      ``stages`` is the stage's pure parameter dict with every leaf stacked to ``[p, *shape]``; ``rest``
      holds ``embed``, ``final_norm`` and ``lm_head`` (if untied).

    Raises:
      ValueError: ``n_stages`` does not divide ``n_layers``, stages differ in layer pattern, or MoE.
    """
    cfg = model.config
    k = _check_stages(cfg, n_stages)
    stage_graphdef, _ = nnx.split(nnx.List(list(model.layers)[:k]), nnx.Param)
    per_stage = [nnx.to_pure_dict(nnx.state(nnx.List(list(model.layers)[s * k:(s + 1) * k]), nnx.Param))
                 for s in range(n_stages)]
    if is_abstract(per_stage):  # nnx.eval_shape model: shapes only (compile without allocating)
        stages = jax.tree.map(lambda *xs: jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype), *per_stage)
    else:
        stages = jax.tree.map(lambda *xs: jnp.stack(xs), *per_stage)
    full = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    rest = {name: full[name] for name in ("embed", "final_norm", "lm_head") if name in full}
    return stage_graphdef, {"stages": stages, "rest": rest}


def merge_stages(model: nnx.Module, params: dict[str, Any]) -> None:
    """Write :func:`split_stages`-layout ``params`` back into ``model`` (in place)."""
    stages = params["stages"]
    n_stages = jax.tree.leaves(stages)[0].shape[0]
    k = model.config.n_layers // n_stages
    full = {**{n: v for n, v in params["rest"].items()}, "layers": {}}
    for s in range(n_stages):
        one = jax.tree.map(lambda x: x[s], stages)
        for j in range(k):
            full["layers"][s * k + j] = one[j]
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.device_get(full))
    nnx.update(model, state)


# ------------------------------------------------------------------------------------------ the model
def _embed(rest, tokens, cfg: ModelConfig):
    table = rest["embed"]["embedding"]
    return jnp.take(table, tokens, axis=0) * jnp.asarray(cfg.embedding_multiplier, table.dtype)


def _head_loss(rest, h, targets, mask, n_total, cfg: ModelConfig):
    """Summed cross entropy of one microbatch divided by the whole batch's token count (so the microbatch
    losses add up to the trainer's token-weighted mean)."""
    x = core.rms_norm(h, rest["final_norm"]["weight"], cfg.norm_eps)
    w = rest["embed"]["embedding"].T if "lm_head" not in rest else rest["lm_head"]["kernel"]
    logits = (x @ w.astype(x.dtype)).astype(jnp.float32) / cfg.logits_scaling
    # The target's log-probability by a one-hot contraction, not a gather: XLA's SPMD partitioner
    # (jax 0.11.2, CPU) aborts on a take_along_axis over the vocab-sharded axis inside a partially
    # manual shard_map. Same value as mani_jax.train.losses.lm_loss (one nonzero term per row).
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.sum(logp * jax.nn.one_hot(targets, logits.shape[-1], dtype=logp.dtype), axis=-1)
    return jnp.sum(nll * mask.astype(jnp.float32)) / n_total


def _stage_fn(graphdef: nnx.GraphDef, cfg: ModelConfig, k: int):
    policies = cfg.remat_policies[:k]

    def run(stage_params, x, pos, seg):
        blocks = nnx.merge(graphdef, nnx.State(stage_params) if not isinstance(stage_params, nnx.State)
                           else stage_params)
        for block, policy in zip(blocks, policies):
            x, _, _ = remat_call(block, policy, x, positions=pos, segment_ids=seg)
        return x

    return run


def _microbatch(x, m: int):
    """``[B, ...] -> [m, B/m, ...]`` with microbatch ``i`` = rows ``i, i+m, i+2m, ...`` (so a batch dimension
    split over data replicas splits every microbatch the same way)."""
    b = x.shape[0]
    return x.reshape(b // m, m, *x.shape[1:]).swapaxes(0, 1)


def _gpipe(graphdef, cfg, k, p, m, daxes):
    """shard_map body: the forward loop; jax.grad differentiates it (GPipe). ``daxes``: the manual batch
    axes (the microbatch rows are split over them)."""
    stage = _stage_fn(graphdef, cfg, k)
    perm = [(s, s + 1) for s in range(p - 1)]
    every = (AXIS,) + daxes

    def body(stages, rest, x_m, pos_m, seg_m, tgt_m, mask_m, n_total):
        # Replicated inputs are marked varying once here, so the backward's psum of their cotangents (over
        # stages for the head, over batch shards for every parameter) happens once, not in every tick.
        params = _vary(jax.tree.map(lambda a: a[0], stages), daxes)
        rest, x_m = _vary(rest, every), _vary(x_m, (AXIS,))
        s = jax.lax.axis_index(AXIS)
        act = jnp.zeros_like(x_m[0])
        loss = jnp.zeros((), jnp.float32)

        def tick(carry, t):
            act, loss = carry
            i = jnp.clip(t - s, 0, m - 1)
            valid = (t - s >= 0) & (t - s < m)
            inp = jnp.where(s == 0, x_m[i], act)
            out = stage(params, inp, pos_m[i], seg_m[i])
            out = jnp.where(valid, out, 0)
            li = _head_loss(rest, out, tgt_m[i], mask_m[i], n_total, cfg)
            loss = loss + jnp.where(valid & (s == p - 1), li, 0.0)
            act = jax.lax.ppermute(out, AXIS, perm)
            return (act, loss), None

        (_, loss), _ = jax.lax.scan(tick, _vary((act, loss), every), jnp.arange(m + p - 1))
        return jax.lax.psum(loss, every)

    return body


def _vary(tree, axes=(AXIS,)):
    """Mark every array of ``tree`` as varying over the manual ``axes`` (no-op where it already is). Done
    once at the top of a stage program for the replicated inputs, so that the transposes' ``psum`` happens
    once there, not inside every tick or inside a branch that only some stages take."""
    def one(x):
        todo = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
        return jax.lax.pcast(x, todo, to="varying") if todo else x

    return jax.tree.map(one, tree)


def _slots(table: _Table, recv: np.ndarray, use: np.ndarray, m: int) -> int:
    """Smallest ring-buffer size K such that microbatch ``i`` in slot ``i % K`` is never overwritten
    between its arrival tick ``recv[s, i]`` and its last use ``use[s, i]`` on any stage."""
    p = recv.shape[0]
    for k in range(1, m + 1):
        ok = True
        for s in range(p):
            for i in range(m):
                for j in range(i + 1, m):
                    if i % k == j % k and recv[s, j] >= 0 and recv[s, i] >= 0 and recv[s, j] <= use[s, i]:
                        ok = False
                        break
                if not ok:
                    break
            if not ok:
                break
        if ok:
            return k
    return m


def _one_f_one_b(graphdef, cfg, k, p, m, branching: bool, daxes):
    """shard_map body: the 1F1B schedule with the backward written out. Returns (loss, stage grads,
    rest grads, cotangent of the embedded inputs).

    ``branching``: each stage runs only its scheduled op (``lax.switch``). Without it every stage computes
    the forward and the backward each tick and keeps the scheduled one: needed when GSPMD puts collectives
    inside a stage (tensor / FSDP axes > 1), since stages taking different branches would then
    meet different collectives (the CPU runtime waits for all local devices and aborts)."""
    table = schedule_table("1f1b", p, m)
    ticks = table.op.shape[0]
    t_f = np.full((p, m), -1)
    t_b = np.full((p, m), -1)
    for t in range(ticks):
        for s in range(p):
            if table.op[t, s] == FWD:
                t_f[s, table.mb[t, s]] = t
            elif table.op[t, s] == BWD:
                t_b[s, table.mb[t, s]] = t
    # Arrivals: stage s receives microbatch i's activation at the end of tick t_f[s-1, i] and its
    # cotangent at the end of tick t_b[s+1, i]; both are used last by the backward at t_b[s, i].
    act_recv = np.full((p, m), -1)
    grad_recv = np.full((p, m), -1)
    act_recv[1:] = t_f[:-1]
    grad_recv[:-1] = t_b[1:]
    k_act = _slots(table, act_recv, t_b, m)
    k_grad = _slots(table, grad_recv, t_b, m)
    act_in = np.full((ticks, p), -1, np.int32)
    grad_in = np.full((ticks, p), -1, np.int32)
    for s in range(p):
        for i in range(m):
            if act_recv[s, i] >= 0:
                act_in[act_recv[s, i], s] = i
            if grad_recv[s, i] >= 0:
                grad_in[grad_recv[s, i], s] = i
    stage = _stage_fn(graphdef, cfg, k)
    fwd_perm = [(s, s + 1) for s in range(p - 1)]
    bwd_perm = [(s + 1, s) for s in range(p - 1)]
    op_tab, mb_tab = jnp.asarray(table.op), jnp.asarray(table.mb)
    act_tab, grad_tab = jnp.asarray(act_in), jnp.asarray(grad_in)

    every = (AXIS,) + daxes

    def body(stages, rest, x_m, pos_m, seg_m, tgt_m, mask_m, n_total):
        params = _vary(jax.tree.map(lambda a: a[0], stages), daxes)
        rest, x_m = _vary(rest, every), _vary(x_m, (AXIS,))
        s = jax.lax.axis_index(AXIS)
        zeros_x = jnp.zeros_like(x_m[0])
        carry = {
            "saved": jnp.zeros((k_act,) + x_m.shape[1:], x_m.dtype),
            "recv_g": jnp.zeros((k_grad,) + x_m.shape[1:], x_m.dtype),
            "g_stage": jax.tree.map(jnp.zeros_like, params),
            "g_rest": jax.tree.map(jnp.zeros_like, rest),
            "dx": jnp.zeros_like(x_m),
            "loss": jnp.zeros((), jnp.float32),
        }

        def stage_input(c, i):
            return jnp.where(s == 0, x_m[i], c["saved"][i % k_act])

        def idle(c, i):
            zero_rest = jax.tree.map(jnp.zeros_like, rest)
            return _vary((zeros_x, zeros_x, jax.tree.map(jnp.zeros_like, params), zero_rest,
                          jnp.zeros((), jnp.float32)), every)

        def fwd(c, i):
            y = stage(params, stage_input(c, i), pos_m[i], seg_m[i])
            zero_rest = jax.tree.map(jnp.zeros_like, rest)
            return _vary((y, zeros_x, jax.tree.map(jnp.zeros_like, params), zero_rest, jnp.zeros((), jnp.float32)),
                         every)

        def bwd(c, i):
            # One vjp for every stage: the last stage differentiates its loss, the others the dot product of
            # their output with the cotangent received from the next stage (d/dθ <y(θ), g> = J^T g).
            x_in = stage_input(c, i)
            is_last = s == p - 1
            g_in = c["recv_g"][i % k_grad]

            def f(pr, rs, x):
                y = stage(pr, x, pos_m[i], seg_m[i])
                li = _head_loss(rs, y, tgt_m[i], mask_m[i], n_total, cfg)
                return jnp.where(is_last, li, jnp.sum(y.astype(jnp.float32) * g_in.astype(jnp.float32))), li

            obj, vjp, li = jax.vjp(f, params, rest, x_in, has_aux=True)
            gp, gr, gx = vjp(jnp.ones_like(obj))
            return _vary((zeros_x, gx.astype(zeros_x.dtype), gp, gr, jnp.where(is_last, li, 0.0)), every)

        def tick(c, t):
            op, i = op_tab[t, s], mb_tab[t, s]
            if branching:
                send_act, send_grad, gp, gr, li = jax.lax.switch(op, [idle, fwd, bwd], c, i)
            else:  # every stage runs both ops and keeps the scheduled one: no collective inside a branch
                outs = (idle(c, i), fwd(c, i), bwd(c, i))
                send_act, send_grad, gp, gr, li = jax.tree.map(
                    lambda z, a, b: jnp.where(op == FWD, a, jnp.where(op == BWD, b, z)), *outs)
            c = dict(c)
            c["g_stage"] = jax.tree.map(jnp.add, c["g_stage"], gp)
            c["g_rest"] = jax.tree.map(jnp.add, c["g_rest"], gr)
            c["loss"] = c["loss"] + li
            c["dx"] = jnp.where((s == 0) & (op == BWD), c["dx"].at[i].set(send_grad), c["dx"])
            got_act = jax.lax.ppermute(send_act, AXIS, fwd_perm)
            got_grad = jax.lax.ppermute(send_grad, AXIS, bwd_perm)
            ja, jg = act_tab[t, s], grad_tab[t, s]
            c["saved"] = jnp.where(ja >= 0, c["saved"].at[ja % k_act].set(got_act), c["saved"])
            c["recv_g"] = jnp.where(jg >= 0, c["recv_g"].at[jg % k_grad].set(got_grad), c["recv_g"])
            return c, None

        c, _ = jax.lax.scan(tick, _vary(carry, every), jnp.arange(ticks))
        # One reduction each at the end: gradients over the batch shards (and the head's over stages).
        g_stage = jax.tree.map(lambda a: a[None], jax.lax.psum(c["g_stage"], daxes) if daxes else c["g_stage"])
        return (jax.lax.psum(c["loss"], every), g_stage, jax.lax.psum(c["g_rest"], every),
                jax.lax.psum(c["dx"], AXIS))

    return body


def pipeline_loss(graphdef: nnx.GraphDef, cfg: ModelConfig, mesh: Mesh, *, n_microbatches: int,
                  schedule: Schedule = "gpipe") -> Callable:
    """``loss_fn(params, batch) -> (loss, info)`` of the pipelined model; differentiable with ``jax.grad``.

    Args:
      graphdef: the stage graph from :func:`split_stages`.
      cfg: the model config.
      mesh: a mesh whose ``pipeline`` axis has the stage count ``p``.
      n_microbatches: ``m``; the batch size must be divisible by ``m`` (and each microbatch by the batch
        axes' size).
      schedule: ``"gpipe"`` or ``"1f1b"``.

    Returns:
      the function; ``params`` as :func:`split_stages` returns them, ``batch`` the trainer's batch dict
      (``[batch, seq]`` arrays). ``loss`` is the token-weighted mean cross entropy over the whole batch
      (float32 scalar); ``info = {"loss", "n_tokens"}``.

    Raises:
      ValueError: bad ``schedule`` / ``n_microbatches``, or the config cannot be staged (see
        :func:`split_stages`).
    """
    p = mesh.shape[AXIS]
    k = _check_stages(cfg, p)
    if schedule not in ("gpipe", "1f1b"):
        raise ValueError(f"schedule: expected 'gpipe' or '1f1b', got {schedule!r}")
    if not isinstance(n_microbatches, int) or n_microbatches < 1:
        raise ValueError(f"n_microbatches: expected a positive int, got {n_microbatches!r}")
    m = n_microbatches
    # The batch axes that split no parameter are manual too (each shard sums its own gradients over the
    # ticks and reduces once at the end); fsdp stays auto, so GSPMD gathers its weight shards in the stage.
    daxes = tuple(a for a in ("data", "expert") if mesh.shape.get(a, 1) > 1)
    rows = P(None, daxes if daxes else None)  # [m, microbatch rows, ...]
    specs = (P(AXIS), P(), rows, rows, rows, rows, rows, P())
    manual = {AXIS, *daxes}
    if schedule == "gpipe":
        piped = jax.shard_map(_gpipe(graphdef, cfg, k, p, m, daxes), mesh=mesh, in_specs=specs, out_specs=P(),
                              axis_names=manual)

        def run(stages, rest, x_m, *rest_args):
            return piped(stages, rest, x_m, *rest_args)
    else:
        branching = all(mesh.shape[a] == 1 for a in ("fsdp", "tensor"))
        raw = jax.shard_map(_one_f_one_b(graphdef, cfg, k, p, m, branching, daxes), mesh=mesh, in_specs=specs,
                            out_specs=(P(), P(AXIS), P(), rows), axis_names=manual)

        @jax.custom_vjp
        def run(stages, rest, x_m, *rest_args):
            return raw(stages, rest, x_m, *rest_args)[0]

        def run_fwd(stages, rest, x_m, *rest_args):
            loss, g_stage, g_rest, g_x = raw(stages, rest, x_m, *rest_args)
            return loss, (g_stage, g_rest, g_x, rest_args)

        def run_bwd(res, g):
            g_stage, g_rest, g_x, rest_args = res
            scale = lambda t: jax.tree.map(lambda a: (a * g).astype(a.dtype), t)  # noqa: E731
            zeros = tuple(None if not jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros_like(a)
                          for a in rest_args)
            return (scale(g_stage), scale(g_rest), scale(g_x)) + zeros

        run.defvjp(run_fwd, run_bwd)

    def loss_fn(params, batch):
        b = batch["tokens"].shape[0]
        n_shards = int(np.prod([mesh.shape[a] for a in ("data", "fsdp", "expert")]))
        if b % m or (b // m) % n_shards:
            raise ValueError(f"n_microbatches: {m} microbatches of a batch of {b} rows must each split over the "
                             f"{n_shards} batch shards (data x fsdp x expert)")
        mic = {key: _microbatch(batch[key], m) for key in ("tokens", "targets", "segment_ids", "positions",
                                                             "loss_mask")}
        mask_m = mic["loss_mask"].astype(jnp.float32)
        n_total = jnp.sum(mask_m)
        n_safe = jnp.where(n_total > 0, n_total, 1.0)
        x_m = _embed(params["rest"], mic["tokens"], cfg)
        loss = run(params["stages"], params["rest"], x_m, mic["positions"], mic["segment_ids"],
                   mic["targets"], mask_m, n_safe)
        return loss, {"loss": loss, "n_tokens": n_total}

    return loss_fn


def _stacked_decay_mask(params: dict[str, Any]) -> Any:
    """:func:`mani_jax.train.optim.decay_mask` evaluated on the unstacked shapes (the leading ``[p]``
    stage axis would otherwise turn every vector into a decayed matrix)."""
    shapes = {"stages": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), params["stages"]),
              "rest": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params["rest"])}
    return decay_mask(shapes)


def make_pipeline_train_step(model: nnx.Module, mesh: Mesh, optim_config: OptimConfig, *, n_microbatches: int,
                             schedule: Schedule = "gpipe", rules: Rules = LOGICAL_RULES):
    """A jitted pipeline-parallel train step for ``model`` on ``mesh`` (``pipeline`` axis = stages; other
    axes split inside each stage by ``rules``).

    Same update as the trainer (:func:`~mani_jax.train.optim.make_tx`, weight-decay mask of the unstacked
    parameters).

    Returns:
      ``(step, state, graphdef)``: ``step(state, batch) -> (state, metrics)`` with ``state = (params,
      opt_state)`` donated and ``metrics`` ``loss``, ``n_tokens``, ``grad_norm``; write the result back with
      ``merge_stages(model, state[0])``. For a model from ``nnx.eval_shape`` the state holds
      ``ShapeDtypeStruct`` s with shardings: ``step.lower(state, batch_shapes).compile()`` without
      allocating.

    Raises:
      ValueError: as :func:`split_stages`, :func:`pipeline_loss`, or a parameter that does not divide.
    """
    cfg = model.config
    check_model_config(cfg, mesh)
    graphdef, params = split_stages(model, mesh.shape[AXIS])
    p_sh = {"stages": tree_shardings(params["stages"], mesh, rules, lead_axes=("stage",)),
            "rest": tree_shardings(params["rest"], mesh, rules)}
    params = place(params, p_sh)
    tx = make_tx(optim_config, mask=_stacked_decay_mask(params))
    opt_shapes = jax.eval_shape(tx.init, params)
    o_sh = _opt_shardings(opt_shapes, p_sh, mesh)
    opt_state = place(opt_shapes, o_sh) if is_abstract(params) else jax.jit(tx.init, out_shardings=o_sh)(params)
    loss_fn = pipeline_loss(graphdef, cfg, mesh, n_microbatches=n_microbatches, schedule=schedule)

    def step(state, batch):
        params, opt_state = state
        (_, info), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), {**info, "grad_norm": optax.tree.norm(grads)}

    rep = NamedSharding(mesh, P())
    jitted = jax.jit(step, in_shardings=((p_sh, o_sh), batch_sharding(mesh)), out_shardings=((p_sh, o_sh), rep),
                     donate_argnums=0)
    return jitted, (params, opt_state), graphdef


def _opt_shardings(opt_shapes, p_sh, mesh):
    """Adam moments take their parameter's sharding (matched by the ``stages`` / ``rest`` subtree and the
    path below it); counters are replicated."""
    flat = {path_names(pth): sh for pth, sh in jax.tree_util.tree_leaves_with_path(p_sh)}

    def one(path, x):
        names = path_names(path)
        for start in range(len(names)):
            if names[start:] in flat:
                return flat[names[start:]]
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, opt_shapes)
