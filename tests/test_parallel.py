"""mani_jax.parallel: rules, errors, schedules and HLO accounting in this process (one CPU device); every
layout's losses, parameters and shardings against the single-device trainer on 8 forced CPU devices in a
child process (tests/parallel_checks.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from mani_jax.models import HybridLM, get_config
from mani_jax.models.hybrid import abstract_params
from mani_jax.parallel import (AXES, LOGICAL_RULES, MeshConfig, bubble_fraction, check_model_config,
                               collective_stats, logical_axes, peak_in_flight, schedule_table, spec_for,
                               tree_shardings)
from mani_jax.parallel.tensor import from_tp_layout, to_tp_layout, tp_layout_permutations
from mani_jax.train.trainer import _forward_loss

ROOT = Path(__file__).resolve().parents[1]
TOL = 2e-5  # float32: 2 optimizer steps, sums reassociated across shards


def mesh(**sizes) -> AbstractMesh:
    """An abstract mesh of the five axes (shape only: enough for the rules and their errors)."""
    s = MeshConfig(**{"data": 1, **sizes}).sizes(int(np.prod(list(sizes.values()) or [1])))
    return AbstractMesh(tuple(s[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def run_group(group: str, timeout: int = 900) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "parallel_checks.py"), group], capture_output=True,
                       text=True, env=env, timeout=timeout, cwd=ROOT)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"group {group} failed:\n{p.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


# ------------------------------------------------------------------------------------- rules and errors
@pytest.mark.parametrize("preset,over", [("smoke", {}), ("tiny", {}), ("dense-tiny", {}),
                                         ("smoke", {"n_experts": 4, "d_ff_expert": 64, "shared_mlp": True,
                                                    "tie_embeddings": False, "mamba_proj_bias": True})])
def test_every_parameter_has_logical_axes(preset, over):
    cfg = get_config(preset, over)
    for path, var in abstract_params(cfg)[1].items():
        axes = logical_axes(path, len(var.shape))
        assert axes is not None, f"no rule for {path}"
        assert all(a in dict(LOGICAL_RULES) for a in axes), (path, axes)


def test_rules_table_shards_as_megatron_and_fsdp():
    cfg = get_config("smoke", {"tie_embeddings": False})
    _, flat = abstract_params(cfg)
    shapes = {"/".join(map(str, k)): v for k, v in flat.items()}
    m = mesh(data=2, fsdp=2, tensor=2)
    spec = lambda name: spec_for(logical_axes(name.split("/"), len(shapes[name].shape)), shapes[name].shape, m)  # noqa
    # Column-parallel in, row-parallel out, vocab-parallel embedding / head, FSDP on the d_model side.
    assert tuple(spec("layers/2/mixer/q_proj/kernel")) == ("fsdp", "tensor")
    assert tuple(spec("layers/2/mixer/o_proj/kernel")) == ("tensor", "fsdp")
    assert tuple(spec("layers/0/ffn/gate_proj/kernel")) == ("fsdp", "tensor")
    assert tuple(spec("layers/0/ffn/down_proj/kernel")) == ("tensor", "fsdp")
    assert tuple(spec("layers/0/mixer/in_proj/kernel")) == ("fsdp", "tensor")
    assert tuple(spec("layers/0/mixer/out_proj/kernel")) == ("tensor", "fsdp")
    assert tuple(spec("layers/0/mixer/conv_weight")) == ("tensor",)
    assert tuple(spec("embed/embedding")) == ("tensor", "fsdp")
    assert tuple(spec("lm_head/kernel")) == ("fsdp", "tensor")
    assert tuple(spec("final_norm/weight")) == ()
    # A size-1 axis splits nothing and does not appear.
    assert tuple(spec_for(("embed", "mlp"), (128, 384), mesh(data=8))) == ()


def test_optimizer_state_follows_its_parameter_and_zero1_adds_data():
    cfg = get_config("smoke", {"n_layers": 1, "layer_types": "attention"})
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    from mani_jax.train import OptimConfig, make_optimizer

    _, state = nnx.split((model, make_optimizer(OptimConfig(), model)))
    shapes = jax.eval_shape(lambda s: s, state)
    m = mesh(data=4, tensor=2)
    from mani_jax.parallel.rules import ZERO1_OPT_RULES, path_names

    sh = tree_shardings(shapes, m, LOGICAL_RULES, opt_rules=ZERO1_OPT_RULES)
    got = {"/".join(path_names(p)): tuple(s.spec) for p, s in jax.tree_util.tree_leaves_with_path(sh)}
    assert got["0/layers/0/mixer/q_proj/kernel"] == (None, "tensor")            # parameter: replicated over data
    assert got["1/opt_state/1/0/mu/layers/0/mixer/q_proj/kernel"] == ("data", "tensor")  # moment: + data
    assert got["1/opt_state/1/0/count"] == ()


@pytest.mark.parametrize("over,sizes,field", [
    ({"n_groups": 1}, {"tensor": 2}, "n_groups"),
    ({"layer_types": "mamba,mamba,mamba,mamba", "mamba_n_heads": 6, "mamba_head_dim": 32, "d_model": 96},
     {"tensor": 4}, "mamba_n_heads"),
    ({"n_kv_heads": 2}, {"tensor": 4}, "n_kv_heads"),
    ({"d_model": 100, "mamba_head_dim": 25}, {"fsdp": 8}, "d_model"),
    ({"n_experts": 6, "d_ff_expert": 32}, {"expert": 4}, "n_experts"),
])
def test_indivisible_config_names_the_field(over, sizes, field):
    cfg = get_config("smoke", over)
    with pytest.raises(ValueError, match=f"ModelConfig.{field}="):
        check_model_config(cfg, mesh(**sizes))


def test_indivisible_dimension_names_the_array():
    with pytest.raises(ValueError, match=r"layers/0/mixer/in_proj/kernel: dimension 1 \('ssm_in'\) has size 58"):
        spec_for(("embed", "ssm_in"), (128, 58), mesh(tensor=4), where="layers/0/mixer/in_proj/kernel")


def test_activation_hint_is_a_no_op_outside_a_parallel_step():
    from mani_jax.models.sharding import constrain

    x = jnp.ones((2, 3, 4))
    assert constrain(x, ("batch", "act_seq", "act_embed")) is x
    jaxpr = jax.make_jaxpr(lambda t: HybridLM(get_config("smoke", {"n_layers": 1, "layer_types": "attention"}),
                                              rngs=nnx.Rngs(0))(t))(jnp.zeros((1, 4), jnp.int32))
    assert "sharding_constraint" not in str(jaxpr)


def test_mesh_config_validates_and_fills():
    assert MeshConfig(tensor=2, pipeline=2).sizes(8)["data"] == 2
    assert MeshConfig(fsdp=-1).sizes(8) == {"pipeline": 1, "data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="MeshConfig.tensor"):
        MeshConfig(tensor=0)
    with pytest.raises(ValueError, match="multiply to 4, but 8 devices"):
        MeshConfig(data=2, tensor=2).sizes(8)


# --------------------------------------------------------------------------------- tensor-parallel layout
def test_mamba_tp_layout_is_head_aligned_permutation():
    cfg = get_config("smoke", {"n_groups": 2})
    perms = tp_layout_permutations(cfg, 2)
    d_in = 2 * cfg.d_inner + 2 * cfg.n_groups * cfg.d_state + cfg.mamba_n_heads
    assert sorted(perms["in_proj"].tolist()) == list(range(d_in))
    assert sorted(perms["conv"].tolist()) == list(range(cfg.conv_dim))
    half = perms["in_proj"][: d_in // 2]  # rank 0: first half of z, of x, group 0 of B and C, first heads' dt
    gn = cfg.n_groups * cfg.d_state
    z, x = half[: cfg.d_inner // 2], half[cfg.d_inner // 2: cfg.d_inner]
    assert z.tolist() == list(range(cfg.d_inner // 2))
    assert x.tolist() == list(range(cfg.d_inner, cfg.d_inner + cfg.d_inner // 2))
    b = half[cfg.d_inner: cfg.d_inner + gn // 2]
    assert b.tolist() == list(range(2 * cfg.d_inner, 2 * cfg.d_inner + cfg.d_state))
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    back = from_tp_layout(to_tp_layout(params, cfg, 2), cfg, 2)
    for a, c in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, c)
    with pytest.raises(ValueError, match="ModelConfig.n_groups=2 is not divisible by tensor=4"):
        tp_layout_permutations(get_config("smoke", {"n_groups": 2}), 4)


# -------------------------------------------------------------------------------------------- pipeline
@pytest.mark.parametrize("p,m", [(2, 1), (2, 4), (3, 5), (4, 4), (4, 8)])
def test_schedules_have_the_gpipe_bubble_and_1f1b_keeps_p_microbatches(p, m):
    for kind in ("gpipe", "1f1b"):
        t = schedule_table(kind, p, m)
        assert bubble_fraction(t) == pytest.approx((p - 1) / (m + p - 1))
        assert t.op.shape[0] == 2 * (m + p - 1)
        # Dependencies: F(s, i) after F(s-1, i); B(s, i) after F(s, i) and B(s+1, i); each op exactly once.
        when = {}
        for tick in range(t.op.shape[0]):
            for s in range(p):
                if t.op[tick, s]:
                    key = (int(t.op[tick, s]), s, int(t.mb[tick, s]))
                    assert key not in when
                    when[key] = tick
        assert len(when) == 2 * p * m
        for s in range(p):
            for i in range(m):
                assert when[(2, s, i)] > when[(1, s, i)]
                if s:
                    assert when[(1, s, i)] > when[(1, s - 1, i)]
                if s < p - 1:
                    assert when[(2, s, i)] > when[(2, s + 1, i)]
    assert peak_in_flight(schedule_table("gpipe", p, m)) == [m] * p
    assert peak_in_flight(schedule_table("1f1b", p, m)) == [min(p - s, m) for s in range(p)]


def test_pipeline_rejects_unstageable_configs():
    from mani_jax.parallel.pipeline import split_stages

    model = HybridLM(get_config("smoke"), rngs=nnx.Rngs(0))  # layers mamba, mamba, attention, mamba
    with pytest.raises(ValueError, match="every pipeline stage must have the same block pattern"):
        split_stages(model, 2)
    with pytest.raises(ValueError, match="n_stages: 3 does not divide"):
        split_stages(model, 3)
    with pytest.raises(ValueError, match="schedule"):
        schedule_table("interleaved", 2, 2)


# ------------------------------------------------------------------------------------- HLO accounting
HLO = """HloModule m
%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %ar = f32[4,8]{1,0} all-reduce(%x), channel_id=1, replica_groups={{0,1},{2,3}}, to_apply=%add
  %cp = f32[4,8]{1,0} collective-permute(%ar), channel_id=2, source_target_pairs={{0,1},{1,0}}
}
%cond (p: (s32[], f32[4,8])) -> pred[] {
}
ENTRY %main (a: f32[4,8]) -> f32[16,8] {
  %w = (s32[], f32[4,8]{1,0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %ag = f32[16,8]{1,0} all-gather(%g), channel_id=3, replica_groups=[2,4]<=[8], dimensions={0}
}
"""


def test_collective_stats_counts_loop_trips_and_bytes():
    s = collective_stats(HLO)
    assert s["ops"] == {"all-reduce": 3, "collective-permute": 3, "all-gather": 1}
    assert s["bytes"] == {"all-reduce": 3 * 128, "collective-permute": 3 * 128, "all-gather": 512}
    assert s["wire_bytes"]["all-reduce"] == 3 * 128  # ring: 2 (n-1)/n with n = 2
    assert s["wire_bytes"]["all-gather"] == 384       # (n-1)/n with n = 4


# ------------------------------------------------------------------------------------------------ remat
def _grads(cfg, batch):
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def loss(st):
        return _forward_loss(nnx.merge(graphdef, st), batch, jnp.float32)[0]

    compiled = jax.jit(jax.grad(loss)).lower(state).compile()
    return compiled(state), compiled.memory_analysis().temp_size_in_bytes


def test_remat_policies_keep_gradients_and_save_memory():
    base = dict(n_layers=2, layer_types="mamba,attention", vocab_size=256, d_model=64, d_ff=192,
                mamba_n_heads=4, mamba_head_dim=32, d_state=16, chunk_size=16, head_dim=16)
    rng = np.random.default_rng(0)
    tok = rng.integers(0, 256, (4, 64)).astype(np.int32)
    batch = {"tokens": tok, "targets": np.roll(tok, -1, 1), "segment_ids": np.ones_like(tok),
             "positions": np.broadcast_to(np.arange(64, dtype=np.int32), tok.shape).copy(),
             "loss_mask": np.ones(tok.shape, np.float32)}
    ref, temp_none = _grads(get_config("smoke", {**base, "remat": "none"}), batch)
    g, temp = _grads(get_config("smoke", {**base, "remat": "full,save_dots"}), batch)  # one policy per block
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert temp < temp_none, (temp, temp_none)
    with pytest.raises(ValueError, match="ModelConfig.remat"):
        get_config("smoke", {"remat": "sometimes"})
    with pytest.raises(ValueError, match="ModelConfig.remat"):
        get_config("smoke", {"remat": "full,none"})  # 2 entries for 4 layers


@pytest.mark.slow
def test_remat_offload_policy_keeps_gradients():
    base = dict(n_layers=2, layer_types="mamba,attention", vocab_size=128, d_model=32, mamba_head_dim=8,
                head_dim=8, d_ff=64, d_state=8, chunk_size=8)
    tok = np.arange(32, dtype=np.int32).reshape(2, 16) % 128
    batch = {"tokens": tok, "targets": np.roll(tok, -1, 1), "segment_ids": np.ones_like(tok),
             "positions": np.broadcast_to(np.arange(16, dtype=np.int32), tok.shape).copy(),
             "loss_mask": np.ones(tok.shape, np.float32)}
    ref, _ = _grads(get_config("smoke", {**base, "remat": "none"}), batch)
    g, _ = _grads(get_config("smoke", {**base, "remat": "offload"}), batch)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------- 8 forced devices (child process)
def test_dp_fsdp_zero1_tp_equal_single_device_and_shard_as_claimed():
    r = run_group("annotation")
    for name in ("dp", "fsdp", "zero1", "tp"):
        assert r[name]["loss_diff"] < TOL and r[name]["param_diff"] < TOL, (name, r[name]["loss_diff"],
                                                                            r[name]["param_diff"])
    # DP: everything whole on every device; one (combined) gradient all-reduce.
    assert r["dp"]["shards"] == {"embed": [[128, 32]], "mu_embed": [[128, 32]], "in_proj": [[32, 164]]}
    assert set(r["dp"]["collectives"]) == {"all-reduce"}
    # FSDP: parameters and moments split 8-way along d_model; weights all-gathered in the step.
    assert r["fsdp"]["param_specs"]["layers/0/mixer/in_proj/kernel"] == "P('fsdp',)"
    assert r["fsdp"]["shards"] == {"embed": [[128, 4]], "mu_embed": [[128, 4]], "in_proj": [[4, 164]]}
    assert r["fsdp"]["collectives"].get("all-gather", 0) > 0
    # With the residual stream constrained to batch-split (models/sharding.py), FSDP moves weights, not
    # activations: about 1.5x DP's bytes in theory (without the constraint GSPMD's choice was ~10x).
    assert r["fsdp"]["wire_bytes"] < 3 * r["dp"]["wire_bytes"], (r["fsdp"]["wire_bytes"], r["dp"]["wire_bytes"])
    # ZeRO-1: parameters whole, Adam moments split over data.
    assert r["zero1"]["shards"] == {"embed": [[128, 32]], "mu_embed": [[128, 4]], "in_proj": [[32, 164]]}
    assert r["zero1"]["opt_specs"]["opt_state/1/0/mu/layers/1/mixer/q_proj/kernel"] == "P('data',)"
    assert r["zero1"]["param_specs"]["layers/1/mixer/q_proj/kernel"] == "P()"
    # TP by annotation: column / row / vocab splits.
    ps = r["tp"]["param_specs"]
    assert ps["layers/1/mixer/q_proj/kernel"] == "P(None, 'tensor')" and ps["layers/1/mixer/o_proj/kernel"] == \
        "P('tensor',)"
    assert ps["layers/0/mixer/in_proj/kernel"] == "P(None, 'tensor')" and ps["embed/embedding"] == "P('tensor',)"
    assert r["tp"]["shards"]["embed"] == [[64, 32]] and r["tp"]["shards"]["in_proj"] == [[32, 82]]
    # TP with the collectives written out (shard_map): logits, losses and parameters.
    sm = r["tp_shard_map"]
    assert sm["logits_diff"] < 1e-5 and sm["loss_diff"] < TOL and sm["param_diff"] < TOL, sm
    assert r["tp_vs_shard_map"] < TOL
    assert sm["in_proj_spec"] == "P(None, 'tensor')" and sm["collectives"].get("all-reduce", 0) > 0


@pytest.mark.slow
def test_trainer_loop_on_a_mesh_equals_single_device():
    """mani_jax.train.train with sharded_step_factory: same losses and parameters, checkpoint written, the model
    left holding sharded arrays."""
    loop = run_group("loop")["train_loop_fsdp"]
    assert loop["loss_diff"] < TOL and loop["param_diff"] < TOL and loop["embed_spec"] == "P(None, 'fsdp')", loop
    assert loop["checkpoints"] == ["2"]


def test_pipeline_gpipe_and_1f1b_equal_single_device():
    r = run_group("pipeline")
    for sched in ("gpipe", "1f1b"):
        assert r[sched]["loss_diff"] < TOL and r[sched]["param_diff"] < TOL, (sched, r[sched])
        assert r[sched]["stage_spec"] == "P('pipeline',)" and r[sched]["stage_shards"] == [[1, 32, 164]]
        assert r[sched]["collectives"].get("collective-permute", 0) > 0


@pytest.mark.slow
def test_pipeline_dp_tp_pp_equal_single_device():
    r = run_group("pipeline_combo")
    for sched in ("gpipe_dp_tp_pp", "1f1b_dp_tp_pp"):
        assert r[sched]["loss_diff"] < TOL and r[sched]["param_diff"] < TOL, (sched, r[sched])
        assert r[sched]["stage_spec"] == "P('pipeline', None, 'tensor')"
        assert r[sched]["stage_shards"] == [[1, 32, 82]]


def test_expert_parallel_all_to_all_equals_unsharded_moe():
    r = run_group("expert")
    assert r["y_diff"] < 1e-5 and r["grad_diff"] < 1e-5 and r["dropped"] == 0.0, r
    assert r["lb_diff"] < 1e-6 and r["z_diff"] < 1e-6
    assert r["tight_diff"] < 1e-5 and r["tight_dropped"] > 0  # drops per rank = GShard local groups
    assert r["collectives"]["all-to-all"] == 2
    assert r["model"]["loss_diff"] < TOL and r["model"]["param_diff"] < TOL
    assert r["model"]["w_gate_spec"] == "P('expert',)"
    # The MoE model trained through the all-to-all layer (moe_dispatch="all_to_all") on DP2 x EP4.
    a2a = r["model_a2a"]
    assert a2a["loss_diff"] < TOL and a2a["param_diff"] < TOL and a2a["grad_diff"] < 1e-5, a2a
    assert a2a["w_gate_spec"] == "P('expert',)"
    assert a2a["collectives"]["all-to-all"] == 2 * 2 * 2, a2a  # 2 MoE layers x (dispatch, return) x (fwd, bwd)
    assert a2a["all_to_all_bytes"] > 0


def test_all_to_all_moe_without_expert_axis_is_the_gather_capacity_layer():
    """moe_dispatch="all_to_all" off a mesh (one device, or an expert axis of 1) runs the same per-rank code
    on the whole batch: equal to the unsharded capacity layer, drops included."""
    from mani_jax.models.hybrid import MoEFFN
    from mani_jax.models.sharding import activation_sharding

    base = dict(n_experts=4, top_k=2, d_ff_expert=16, capacity_factor=0.5)
    a2a = MoEFFN(get_config("smoke", {**base, "moe_dispatch": "all_to_all"}), rngs=nnx.Rngs(0))
    ref = MoEFFN(get_config("smoke", {**base, "moe_dispatch": "gather"}), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 8, a2a.cfg.d_model))
    (y1, s1), (y2, s2) = jax.jit(lambda x: (a2a(x), ref(x)))(x)
    assert float(s1["dropped_fraction"]) > 0
    np.testing.assert_allclose(y1, y2, rtol=1e-6, atol=1e-6)
    assert set(s1) == set(s2)
    for k in s1:
        np.testing.assert_allclose(s1[k], s2[k], rtol=1e-6, atol=1e-6, err_msg=k)
    with activation_sharding(mesh(data=8), lambda names, shape: jax.sharding.PartitionSpec()):
        y3 = jax.jit(lambda x: a2a(x)[0])(x)  # an expert axis of 1: no shard_map
    np.testing.assert_allclose(y3, y2, rtol=1e-6, atol=1e-6)


def test_all_to_all_moe_errors():
    from mani_jax.models.hybrid import MoEFFN
    from mani_jax.models.sharding import activation_sharding

    with pytest.raises(ValueError, match="ModelConfig.capacity_factor: .*moe_dispatch='all_to_all'"):
        get_config("smoke", {"n_experts": 4, "d_ff_expert": 16, "moe_dispatch": "all_to_all"})
    cfg = get_config("smoke", {"n_experts": 6, "d_ff_expert": 16, "capacity_factor": 3.0, "moe_dispatch": "all_to_all"})
    layer = MoEFFN(cfg, rngs=nnx.Rngs(0))
    with activation_sharding(mesh(data=2, expert=4), lambda names, shape: jax.sharding.PartitionSpec()):
        with pytest.raises(ValueError, match="n_experts=6 is not divisible by the 'expert' mesh axis of size 4"):
            layer(jnp.zeros((8, 4, cfg.d_model)))
    with pytest.raises(ValueError, match="ModelConfig.n_experts=6"):  # the sharded step says so up front
        check_model_config(cfg, mesh(data=2, expert=4))


# ------------------------------------------------------------------------------ experiment and processes
def _experiment(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # the experiment asks for its own device count
    p = subprocess.run([sys.executable, "-m", "experiments.parallelism", *args], capture_output=True, text=True,
                       env=env, timeout=timeout, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


@pytest.mark.slow
def test_experiment_smoke_writes_table_and_figure(tmp_path):
    _experiment(["--preset", "smoke", "--set", "layouts=single,fsdp,dp4_pp2_1f1b", "--set", "steps=1",
                 "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {r["layout"]: r for r in summary["rows"]}
    assert set(rows) == {"single", "fsdp", "dp4_pp2_1f1b"} and summary["devices"] == 8
    assert rows["fsdp"]["max_loss_diff_vs_single"] < TOL and rows["dp4_pp2_1f1b"]["max_loss_diff_vs_single"] < TOL
    # FSDP holds ~1/8 of the parameters and Adam state per device (norm scales stay whole); it all-gathers weights.
    assert rows["fsdp"]["param_bytes"] < rows["single"]["param_bytes"] / 6
    assert rows["fsdp"]["opt_bytes"] < rows["single"]["opt_bytes"] / 6
    assert rows["fsdp"]["collectives"]["ops"].get("all-gather", 0) > 0
    assert rows["dp4_pp2_1f1b"]["collectives"]["ops"].get("collective-permute", 0) > 0
    assert rows["single"]["collectives"]["total_bytes"] == 0
    assert all(r["memory"]["temp"] > 0 for r in rows.values())
    assert (tmp_path / "parallelism_smoke.png").stat().st_size > 0
    assert summary["conclusions"]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    """2 processes x 4 CPU devices (jax.distributed, coordinator on 127.0.0.1) = 1 process x 8 devices."""
    _experiment(["--preset", "smoke", "--processes", "2", "--layout", "fsdp", "--set", "steps=1",
                 "--out", str(tmp_path)])
    r = json.loads((tmp_path / "multiprocess.json").read_text())
    two = r["runs"]["2"]
    assert two["process_count"] == 2 and two["local_devices"] == 4 and two["global_devices"] == 8
    assert r["runs"]["1"]["process_count"] == 1 and r["runs"]["1"]["local_devices"] == 8
    assert len(r["losses_2proc"]) == 2 and r["max_abs_diff"] < 1e-5, r
