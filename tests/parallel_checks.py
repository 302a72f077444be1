"""Multi-device checks for tests/test_parallel.py, run in a child process with 8 forced CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/parallel_checks.py GROUP

prints one JSON line (``RESULT {...}``) with the numbers the tests assert on: max |loss - single-device
loss| and max |param - single-device param| after a few optimizer steps for each layout, the shardings
the arrays really have, and collective counts from the compiled HLO. The device count must be set before
jax is imported, which is why this is a separate process (pytest's process keeps its single CPU device).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mani_jax.models import HybridLM, get_config
from mani_jax.parallel import (collective_stats, expert_parallel_moe, from_tp_layout, make_mesh,
                               make_pipeline_train_step, make_sharded_train_step, make_tp_train_step,
                               merge_stages, shard_batch, tp_logits, to_tp_layout)
from mani_jax.parallel.rules import path_names
from mani_jax.train import OptimConfig, make_optimizer, make_schedule, make_train_step

STEPS = 2
OPTIM = OptimConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10, weight_decay=0.1)
# Every dimension divides 2; GQA (4 query / 2 KV heads), 2 Mamba-2 groups, untied head, biases.
BASE = dict(vocab_size=128, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, mamba_n_heads=4,
            mamba_head_dim=16, d_state=8, n_groups=2, chunk_size=8, tie_embeddings=False, attention_bias=True,
            max_seq_len=64)


def config(layer_types: str, **kw):
    return get_config("smoke", dict(BASE, n_layers=len(layer_types.split(",")), layer_types=layer_types, **kw))


def batches(cfg, n=STEPS, b=8, t=16, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tok = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
        seg = np.ones((b, t), np.int32)
        seg[::2, t // 2:] = 2  # packed rows: segment ids reach attention masks and the SSD scan
        pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)]).astype(np.int32)
        pos = np.where(seg == 2, pos[None], np.arange(t, dtype=np.int32)[None]).astype(np.int32)
        mask = np.ones((b, t), np.float32)
        mask[:, -1] = 0.0
        out.append({"tokens": tok, "targets": np.roll(tok, -1, 1), "segment_ids": seg, "positions": pos,
                    "loss_mask": mask})
    return out


def params_of(model) -> dict:
    return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def reference(cfg, data):
    """Losses and final parameters of the plain trainer step on one device."""
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    opt = make_optimizer(OPTIM, model)
    graphdef, state = nnx.split((model, opt))
    step = make_train_step(graphdef, make_schedule(OPTIM))
    losses = []
    for b in data:
        state, m = step(state, b)
        losses.append(float(m["loss"]))
    nnx.update((model, opt), state)
    return losses, params_of(model)


def specs(tree) -> dict:
    return {"/".join(path_names(path)): str(x.sharding.spec)
            for path, x in jax.tree_util.tree_leaves_with_path(tree) if hasattr(x, "sharding")}


def shard_shapes(x) -> list:
    return sorted({tuple(s.data.shape) for s in x.addressable_shards})


def run_annotation(cfg, data, mesh_kw, zero1=False):
    mesh = make_mesh(**mesh_kw)
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    opt = make_optimizer(OPTIM, model)
    step, state, _ = make_sharded_train_step(model, opt, mesh, make_schedule(OPTIM), zero1=zero1)
    compiled = step.lower(state, shard_batch(data[0], mesh)).compile()
    losses = []
    for b in data:
        state, m = compiled(state, shard_batch(b, mesh))
        losses.append(float(m["loss"]))
    model_state, opt_state = state[0], state[1]
    stats = collective_stats(compiled.as_text())
    out = {"losses": losses, "collectives": stats["ops"], "bytes": stats["bytes"],
           "wire_bytes": stats["total_wire_bytes"],
           "param_specs": specs(model_state), "opt_specs": specs(opt_state)}
    nnx.update((model, opt), state)
    out["params"] = params_of(model)
    # Shard shapes of a few arrays, as the devices hold them.
    out["shards"] = {
        "embed": shard_shapes(model_state["embed"]["embedding"][...]),
        "mu_embed": shard_shapes(opt_state["opt_state"][1][0]["mu"]["embed"]["embedding"][...]),
        "in_proj": shard_shapes(model_state["layers"][0]["mixer"]["in_proj"]["kernel"][...]),
    }
    return out


def group_annotation() -> dict:
    cfg = config("mamba,attention")
    data = batches(cfg)
    ref_losses, ref_params = reference(cfg, data)
    res = {"ref_losses": ref_losses}
    for name, kw, z in [("dp", dict(data=8), False), ("fsdp", dict(data=1, fsdp=8), False),
                        ("zero1", dict(data=8), True), ("tp", dict(data=4, tensor=2), False)]:
        out = run_annotation(cfg, data, kw, z)
        res[name] = {"losses": out["losses"], "loss_diff": max(abs(a - b) for a, b in zip(out["losses"], ref_losses)),
                     "param_diff": max_diff(out["params"], ref_params), "collectives": out["collectives"],
                     "param_specs": out["param_specs"], "opt_specs": out["opt_specs"], "shards": out["shards"],
                     "wire_bytes": out["wire_bytes"]}
    # Tensor parallel with the collectives written out (shard_map), same mesh as "tp".
    mesh = make_mesh(data=4, tensor=2)
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    b0 = data[0]
    ref_logits = model(jnp.asarray(b0["tokens"]), segment_ids=jnp.asarray(b0["segment_ids"]),
                       positions=jnp.asarray(b0["positions"]))
    lg = tp_logits(to_tp_layout(params_of(model), cfg, 2), jnp.asarray(b0["tokens"]), cfg, mesh,
                   segment_ids=jnp.asarray(b0["segment_ids"]), positions=jnp.asarray(b0["positions"]))
    step, state = make_tp_train_step(model, mesh, OPTIM)
    compiled = step.lower(state, data[0]).compile()
    losses = []
    for b in data:
        state, m = compiled(state, b)
        losses.append(float(m["loss"]))
    p = jax.device_get(from_tp_layout(state[0], cfg, 2))
    res["tp_shard_map"] = {"logits_diff": float(jnp.max(jnp.abs(lg - ref_logits))),
                           "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
                           "param_diff": max_diff(p, ref_params),
                           "collectives": collective_stats(compiled.as_text())["ops"],
                           "in_proj_spec": str(state[0]["layers"][0]["mixer"]["in_proj"]["kernel"].sharding.spec),
                           "losses": losses}
    res["tp_vs_shard_map"] = max(abs(a - b) for a, b in zip(losses, res["tp"]["losses"]))
    return res


def group_loop() -> dict:
    """mani_jax.train.train (logging, orbax checkpoint of sharded arrays) with the sharded step on DP2 x FSDP4."""
    import tempfile

    from mani_jax.parallel import sharded_step_factory
    from mani_jax.train import TrainConfig, train

    cfg = config("mamba,attention")
    data = batches(cfg)
    ref_losses, ref_params = reference(cfg, data)
    res = {}
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    tc = TrainConfig(steps=STEPS, batch_size=8, seq_len=16, learning_rate=1e-2, warmup_steps=1, lr_decay_steps=10,
                     log_every=1, checkpoint_every=STEPS, progress=False)
    with tempfile.TemporaryDirectory() as d:
        summary = train(model, tc, iter(data), out_dir=d, step_factory=sharded_step_factory(make_mesh(data=2, fsdp=4)))
        saved = sorted(p.name for p in (Path(d) / "checkpoints").iterdir())
    res["train_loop_fsdp"] = {"loss_diff": max(abs(l - r) for (_, l), r in zip(summary["losses"], ref_losses)),
                              "param_diff": max_diff(params_of(model), ref_params),
                              "embed_spec": str(model.embed.embedding[...].sharding.spec), "checkpoints": saved}
    return res


def group_pipeline(combo: bool = False) -> dict:
    cfg = config("mamba,attention,mamba,attention")
    data = batches(cfg)
    ref_losses, ref_params = reference(cfg, data)
    res = {"ref_losses": ref_losses}
    layouts = [("gpipe", dict(pipeline=2, data=4)), ("1f1b", dict(pipeline=2, data=4))]
    if combo:
        layouts = [("gpipe", dict(pipeline=2, data=2, tensor=2)), ("1f1b", dict(pipeline=2, data=2, tensor=2))]
    for sched, kw in layouts:
        mesh = make_mesh(**kw)
        model = HybridLM(cfg, rngs=nnx.Rngs(0))
        n_micro = 8 // (2 * mesh.shape["data"])  # each microbatch: 2 rows per data shard
        step, state, _ = make_pipeline_train_step(model, mesh, OPTIM, n_microbatches=n_micro, schedule=sched)
        compiled = step.lower(state, data[0]).compile()
        losses = []
        for b in data:
            state, m = compiled(state, b)
            losses.append(float(m["loss"]))
        merge_stages(model, state[0])
        key = sched + ("_dp_tp_pp" if combo else "")
        res[key] = {"loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
                    "param_diff": max_diff(params_of(model), ref_params),
                    "collectives": collective_stats(compiled.as_text())["ops"], "microbatches": n_micro,
                    "wire_bytes": collective_stats(compiled.as_text())["total_wire_bytes"],
                    "stage_spec": str(state[0]["stages"][0]["mixer"]["in_proj"]["kernel"].sharding.spec),
                    "stage_shards": shard_shapes(state[0]["stages"][0]["mixer"]["in_proj"]["kernel"])}
    return res


def group_expert() -> dict:
    from mani_jax import core

    rng = np.random.default_rng(0)
    e, d, f, k = 8, 16, 32, 2
    x = jnp.asarray(rng.normal(size=(8, 6, d)), jnp.float32)
    wr = jnp.asarray(rng.normal(size=(d, e)), jnp.float32)
    wg, wu = (jnp.asarray(rng.normal(size=(e, d, f)) * 0.2, jnp.float32) for _ in range(2))
    wd = jnp.asarray(rng.normal(size=(e, f, d)) * 0.2, jnp.float32)
    mesh = make_mesh(data=2, expert=4)

    def objective(y, aux):
        return jnp.sum(y * jnp.cos(y)) + aux["load_balancing_loss"] + aux["router_z_loss"]

    def ep(x, wr, wg, wu, wd):
        y, aux = expert_parallel_moe(x, wr, wg, wu, wd, mesh=mesh, top_k=k, capacity_factor=e / k)
        return objective(y, aux), (y, aux)

    def ref(x, wr, wg, wu, wd):
        y, aux = core.moe_ffn(x, wr, wg, wu, wd, top_k=k, capacity_factor=None, dropless_impl="blocked")
        return objective(y, aux), (y, aux)

    args = (x, wr, wg, wu, wd)
    (_, (y1, a1)), g1 = jax.jit(jax.value_and_grad(ep, argnums=(0, 1, 2, 3, 4), has_aux=True))(*args)
    (_, (y2, a2)), g2 = jax.value_and_grad(ref, argnums=(0, 1, 2, 3, 4), has_aux=True)(*args)
    res = {"y_diff": float(jnp.max(jnp.abs(y1 - y2))),
           "lb_diff": float(jnp.abs(a1["load_balancing_loss"] - a2["load_balancing_loss"])),
           "z_diff": float(jnp.abs(a1["router_z_loss"] - a2["router_z_loss"])),
           "dropped": float(a1["dropped_fraction"]), "grad_diff": max_diff(g1, g2)}
    # Tight capacity: drops happen, per rank, exactly as the unsharded capacity layer on each rank's tokens.
    fn = jax.jit(lambda *a: expert_parallel_moe(*a, mesh=mesh, top_k=k, capacity_factor=1.0))
    y3, a3 = fn(*args)
    per_group = [core.moe_capacity(g, *core.router(g, wr, top_k=k)[:2], wg, wu, wd, capacity_factor=1.0,
                                   dispatch="gather")[0] for g in x.reshape(8, 1, 6, d)]
    res["tight_diff"] = float(jnp.max(jnp.abs(y3 - jnp.concatenate(per_group))))
    res["tight_dropped"] = float(a3["dropped_fraction"])
    res["collectives"] = collective_stats(fn.lower(*args).compile().as_text())["ops"]
    # The MoE model trained with the expert axis by annotation (experts split over 'expert').
    cfg = config("mamba,attention", n_experts=4, top_k=2, d_ff_expert=32, capacity_factor=None,
                 dropless_impl="blocked")
    data = batches(cfg)
    ref_losses, ref_params = reference(cfg, data)
    out = run_annotation(cfg, data, dict(data=2, expert=4))
    res["model"] = {"loss_diff": max(abs(a - b) for a, b in zip(out["losses"], ref_losses)),
                    "param_diff": max_diff(out["params"], ref_params),
                    "w_gate_spec": out["param_specs"]["layers/0/moe/w_gate"]}
    # The same model trained through the all-to-all layer (moe_dispatch="all_to_all"; capacity_factor =
    # n_experts / top_k: nothing dropped, so the one-device dropless run above is the same function).
    # Gradients against the one-device run of this config (the layer's no-mesh path).
    cfg = dataclasses.replace(cfg, capacity_factor=2.0, moe_dispatch="all_to_all")
    out = run_annotation(cfg, data, dict(data=2, expert=4))
    res["model_a2a"] = {"loss_diff": max(abs(a - b) for a, b in zip(out["losses"], ref_losses)),
                        "param_diff": max_diff(out["params"], ref_params),
                        "grad_diff": grad_diff(cfg, data[0], dict(data=2, expert=4)),
                        "collectives": out["collectives"], "all_to_all_bytes": out["bytes"].get("all-to-all", 0),
                        "w_gate_spec": out["param_specs"]["layers/0/moe/w_gate"]}
    return res


def grad_diff(cfg, batch, mesh_kw) -> float:
    """max |gradient on the mesh - gradient on one device| of the training loss, same parameters and batch."""
    from mani_jax.models.sharding import activation_sharding
    from mani_jax.parallel import shard_model, spec_for
    from mani_jax.train.trainer import _forward_loss

    graphdef, state = nnx.split(HybridLM(cfg, rngs=nnx.Rngs(0)))

    def grads(st, b):
        return jax.grad(lambda st: _forward_loss(nnx.merge(graphdef, st), b, jnp.float32)[0])(st)

    ref = jax.jit(grads)(state, batch)
    mesh = make_mesh(**mesh_kw)
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    shard_model(model, mesh)

    def traced(st, b):
        with activation_sharding(mesh, lambda names, shape: spec_for(names, shape, mesh, where="activation")):
            return grads(st, b)

    got = jax.jit(traced)(nnx.state(model), shard_batch(batch, mesh))
    return max_diff(jax.device_get(nnx.to_pure_dict(got)), jax.device_get(nnx.to_pure_dict(ref)))


GROUPS = {"annotation": group_annotation, "loop": group_loop, "pipeline": group_pipeline,
          "pipeline_combo": lambda: group_pipeline(combo=True), "expert": group_expert}

if __name__ == "__main__":
    assert jax.device_count() == 8, f"expected 8 forced CPU devices, got {jax.device_count()}"
    result = GROUPS[sys.argv[1]]()
    print("RESULT " + json.dumps(result, default=float))
