"""MoE in the model and the trainer: routing aux out of the forward pass, router losses in the objective,
expert load in the metrics, active-FLOP counting, and the moe_scaling experiment end to end."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mani_jax import core
from mani_jax.models import HybridLM, get_config
from mani_jax.models.flops import forward_flops_per_token
from mani_jax.models.hf import config_from_hf
from mani_jax.train import TrainConfig, train
from mani_jax.train.metrics import read_metrics
from mani_jax.train.trainer import _forward_loss


def _moe_cfg(**kw):
    base = dict(n_experts=4, top_k=2, d_ff_expert=32, dropless_impl="blocked", n_layers=2)
    base.update(kw)
    return get_config("smoke", base)


def _batch(cfg, b=2, t=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
    return {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "segment_ids": np.ones((b, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "loss_mask": np.ones((b, t), np.float32)}


def test_forward_aux_matches_core_per_layer():
    cfg = _moe_cfg(layer_types=("mamba", "attention"))
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    batch = _batch(cfg)
    logits, aux = model(batch["tokens"], return_aux=True)
    np.testing.assert_array_equal(logits, model(batch["tokens"]))  # aux does not change the logits
    layers = aux["layers"]
    assert layers["load"].shape == (2, 4) and layers["load_balancing_loss"].shape == (2,)
    np.testing.assert_allclose(layers["load"].sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(aux["load_balancing_loss"], layers["load_balancing_loss"].mean(), rtol=1e-6)
    # Recompute layer 0's router losses from its input with the core functions.
    x = model._embed(jnp.asarray(batch["tokens"]))
    layer = model.layers[0]
    h = layer.mixer_norm(x)
    h, _ = layer.mixer(h)
    x = x + cfg.residual_multiplier * h
    h = layer.ffn_norm(x)
    _, experts, rlogits = core.router(h, layer.moe.router.kernel[...], top_k=2)
    np.testing.assert_allclose(layers["load_balancing_loss"][0],
                               core.load_balancing_loss(rlogits, experts, n_experts=4), rtol=1e-5)
    np.testing.assert_allclose(layers["router_z_loss"][0], core.router_z_loss(rlogits), rtol=1e-5)
    # A dense model returns zeros and no per-layer stats.
    dense = HybridLM(get_config("smoke"), rngs=nnx.Rngs(0))
    _, aux_d = dense(batch["tokens"], return_aux=True)
    assert float(aux_d["load_balancing_loss"]) == 0.0 and aux_d["layers"] == {}


def test_objective_gradient_is_lm_plus_weighted_router_losses():
    """grad(objective with coefs a, c) - grad(objective with coefs 0) == a grad(LB) + c grad(Z), leaf by leaf."""
    a, c = 0.3, 0.05
    cfg = _moe_cfg(router_aux_loss_coef=a, router_z_loss_coef=c)
    cfg0 = dataclasses.replace(cfg, router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
    batch = {k: jnp.asarray(v) for k, v in _batch(cfg).items()}

    def grads(model_cfg, fn):
        model = HybridLM(model_cfg, rngs=nnx.Rngs(1))
        return nnx.state(nnx.grad(fn)(model), nnx.Param)

    g_obj = grads(cfg, lambda m: _forward_loss(m, batch, jnp.float32)[0])
    g_lm = grads(cfg0, lambda m: _forward_loss(m, batch, jnp.float32)[0])
    g_lb = grads(cfg, lambda m: m(batch["tokens"], return_aux=True)[1]["load_balancing_loss"])
    g_z = grads(cfg, lambda m: m(batch["tokens"], return_aux=True)[1]["router_z_loss"])
    expected = jax.tree.map(lambda l, b, z: l + a * b + c * z, g_lm, g_lb, g_z)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-7), g_obj, expected)
    # The router losses reach the router: its gradient changes with the coefficients.
    r_obj = g_obj["layers"][0]["moe"]["router"]["kernel"][...]
    r_lm = g_lm["layers"][0]["moe"]["router"]["kernel"][...]
    assert float(jnp.max(jnp.abs(r_obj - r_lm))) > 1e-6
    # The reported loss is the LM loss alone.
    model = HybridLM(cfg, rngs=nnx.Rngs(1))
    obj, info = _forward_loss(model, batch, jnp.float32)
    np.testing.assert_allclose(obj, info["loss"] + a * info["load_balancing_loss"] + c * info["router_z_loss"],
                               rtol=1e-6)


def test_train_logs_expert_load_per_layer(tmp_path):
    cfg = _moe_cfg()
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    batches = iter([_batch(cfg, b=2, t=32, seed=s) for s in range(6)])
    tcfg = TrainConfig(steps=6, batch_size=2, seq_len=32, warmup_steps=1, log_every=2, progress=False,
                       learning_rate=1e-2)
    res = train(model, tcfg, batches, out_dir=tmp_path)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [2, 4, 6]
    for r in recs:
        load = np.asarray(r["expert_load"])
        assert load.shape == (2, 4)
        np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-5)
        assert r["load_balancing_loss"] >= 1.0 - 1e-5  # minimum 1.0 at uniform routing (our convention)
        assert r["router_z_loss"] > 0 and r["dropped_fraction"] == 0.0 and r["train_seconds"] > 0
    assert res["final_step"] == 6 and np.isfinite(res["final_loss"])


def test_active_flops_match_dense_at_equal_active_width():
    dense = get_config("smoke", {"n_layers": 2})
    moe = dataclasses.replace(dense, n_experts=8, top_k=2, d_ff_expert=dense.d_ff // 2)
    fd, fm = forward_flops_per_token(dense, 128), forward_flops_per_token(moe, 128)
    # Same active FFN width: the MoE costs exactly the router's 2 d N per layer more.
    assert fm["total"] - fd["total"] == 2 * dense.d_model * 8 * dense.n_layers
    shared = dataclasses.replace(moe, shared_mlp=True)
    assert forward_flops_per_token(shared, 128)["total"] - fm["total"] == 2 * 3 * dense.d_model * dense.d_ff * 2


def test_hf_router_aux_coef_converted_to_our_convention():
    hf = {"model_type": "mixtral", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
          "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 16, "num_local_experts": 4,
          "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02, "rms_norm_eps": 1e-5,
          "max_position_embeddings": 64, "rope_theta": 1e4, "tie_word_embeddings": False}
    assert config_from_hf(hf).router_aux_loss_coef == pytest.approx(0.04)


def test_config_rejects_bad_moe_fields():
    for field, value in (("moe_dispatch", "scatter"), ("dropless_impl", "dense"), ("router_z_loss_coef", -1.0)):
        with pytest.raises(ValueError, match=field):
            _moe_cfg(**{field: value})


def test_zero_router_init_routes_every_token_to_the_first_experts():
    from experiments.moe_scaling import zero_router
    cfg = _moe_cfg()
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    zero_router(model)
    _, aux = model(_batch(cfg)["tokens"], return_aux=True)
    np.testing.assert_allclose(aux["layers"]["load"], [[0.5, 0.5, 0, 0]] * 2)
    assert int(aux["layers"]["dead_experts"].sum()) == 4


def test_reach_interpolates():
    from experiments.moe_scaling import reach
    assert reach([1, 2, 3], [5.0, 4.0, 3.0], 3.5) == pytest.approx(2.5)
    assert reach([1, 2], [5.0, 4.0], 3.0) is None
    assert reach([1, 2], [3.0, 2.0], 4.0) == 1


@pytest.mark.slow
def test_moe_scaling_smoke_end_to_end(tmp_path):
    from experiments import moe_scaling
    s = moe_scaling.main(["--preset", "smoke", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert set(on_disk["runs"]) == {"dense", "moe", "moe_no_balance", "moe_bad_init"}
    dense, moe = s["runs"]["dense"], s["runs"]["moe"]
    # Matched active FLOPs (router aside), same tokens, same data order.
    assert abs(moe["train_flops_per_token"] / dense["train_flops_per_token"] - 1) < 0.02
    assert moe["active_params"] < moe["params"]
    assert dense["train_tokens"] == moe["train_tokens"]
    for r in s["runs"].values():
        assert r["val_loss"] < s["unigram_val_loss"] + 0.5 and len(r["curve"]["eval_loss"]) == 3
    assert dense["routing"] is None and len(moe["routing"]["steps"]) == 6
    assert np.asarray(moe["routing"]["expert_load"]).shape == (6, 2, 4)
    assert set(s["throughput"]) == set(moe_scaling.DISPATCH_PATHS)
    assert all(t["tokens_per_second"] > 0 for t in s["throughput"].values())
    assert set(s["comparison"]["variants"]) == {"moe", "moe_no_balance", "moe_bad_init"}
    for name in s["plots"]:
        assert (tmp_path / name).stat().st_size > 0
    assert "expert_load_moe_bad_init.png" in s["plots"] and "loss_vs_wallclock.png" in s["plots"]
