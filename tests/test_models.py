"""HybridLM: cache consistency, packed-segment isolation, configs and presets, bad inputs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mani_jax.models import (PRESETS, HybridLM, ModelConfig, count_params, get_config, hybrid_layer_types,
                             positions_from_segments)


def small_cfg(**kw):
    base = dict(vocab_size=97, d_model=32, n_layers=4, layer_types=("mamba", "attention", "mamba", "mamba"),
                n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48, mamba_n_heads=4, mamba_head_dim=16, d_state=8,
                chunk_size=8, max_seq_len=64, initializer_range=0.2)
    base.update(kw)
    return ModelConfig(**base)


CONFIGS = {
    "hybrid": small_cfg(),
    "hybrid_nope_groups2_tied": small_cfg(rope=False, n_groups=2, tie_embeddings=True, attention_bias=True,
                                          layer_types=("attention", "mamba", "mamba", "attention")),
    "dense": small_cfg(layer_types=("attention",) * 4, attention_bias=True, tie_embeddings=False),
    # Dropless routing is per token, so the cache and packed-segment properties hold exactly. (Capacity-based
    # routing couples tokens through the shared capacity, by design.)
    "hybrid_moe_shared_mlp": small_cfg(n_experts=4, top_k=2, d_ff_expert=24, shared_mlp=True),
    "mamba_only_multipliers": small_cfg(layer_types=("mamba",) * 4, embedding_multiplier=2.0,
                                        residual_multiplier=0.5, logits_scaling=3.0, attention_multiplier=0.3),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("split", [1, 13])
def test_prefill_then_decode_equals_full_forward(name, split):
    cfg = CONFIGS[name]
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 29)), jnp.int32)
    full = model(tokens)
    cache = model.init_cache(2, 40)
    logits, cache = model.prefill(tokens[:, :split], cache)
    outs = [logits]
    decode = nnx.jit(lambda m, tok, c: m.decode_step(tok, c))  # one compile instead of ~28 eager steps
    for t in range(split, 29):
        step, cache = decode(model, tokens[:, t], cache)
        outs.append(step[:, None])
    inc = jnp.concatenate(outs, axis=1)
    scale = float(jnp.max(jnp.abs(full)))
    assert float(jnp.max(jnp.abs(inc - full))) <= 1e-4 * scale
    assert int(cache["pos"]) == 29
    # Chunked prefill (two prefills back to back) agrees too.
    cache2 = model.init_cache(2, 40)
    l1, cache2 = model.prefill(tokens[:, :10], cache2)
    l2, cache2 = model.prefill(tokens[:, 10:], cache2)
    assert float(jnp.max(jnp.abs(jnp.concatenate([l1, l2], 1) - full))) <= 1e-4 * scale


def test_decode_under_jit():
    cfg = CONFIGS["hybrid"]
    model = HybridLM(cfg, rngs=nnx.Rngs(1))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 12)), jnp.int32)
    full = model(tokens)
    step = nnx.jit(lambda m, tok, c: m.decode_step(tok, c))
    cache = model.init_cache(1, 16)
    _, cache = model.prefill(tokens[:, :4], cache)
    for t in range(4, 12):
        lg, cache = step(model, tokens[:, t], cache)
        np.testing.assert_allclose(np.asarray(lg), np.asarray(full[:, t]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_packed_segments_never_leak(name):
    """d(loss on segment 2) / d(inputs of segments 1 and 3) == 0 exactly; and packing == separate runs."""
    cfg = CONFIGS[name]
    model = HybridLM(cfg, rngs=nnx.Rngs(2))
    rng = np.random.default_rng(2)
    lens = (7, 12, 10)
    seg = jnp.asarray(np.concatenate([np.full(n, i + 1) for i, n in enumerate(lens)])[None], jnp.int32)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, sum(lens))), jnp.int32)
    x = model._embed(tokens)
    in_seg2 = (seg == 2)[..., None]

    def loss(x):
        logits = model.forward_embeddings(x, segment_ids=seg)
        return jnp.sum(jnp.where(in_seg2, jax.nn.log_softmax(logits), 0.0))

    g = np.asarray(jax.grad(loss)(x))
    other = ~np.asarray(in_seg2)[..., 0]
    assert np.all(g[other] == 0.0), "gradient leaked across packed segments"
    assert np.abs(g[~other]).max() > 0
    packed = model(tokens, segment_ids=seg)
    start = 0
    for n in lens:
        alone = model(tokens[:, start:start + n])
        np.testing.assert_allclose(np.asarray(packed[:, start:start + n]), np.asarray(alone), rtol=1e-4, atol=1e-4)
        start += n


def test_positions_from_segments():
    seg = jnp.array([[1, 1, 1, 2, 2, 3], [5, 5, 5, 5, 0, 0]])
    np.testing.assert_array_equal(np.asarray(positions_from_segments(seg)), [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])


def test_preset_parameter_counts_by_eval_shape():
    assert 0.8e6 <= count_params(PRESETS["smoke"]) <= 1.5e6
    assert 5e6 <= count_params(PRESETS["tiny"]) <= 20e6
    n = count_params(PRESETS["chimera-700m"])
    assert abs(n - 700e6) <= 0.05 * 700e6, n
    assert count_params(PRESETS["chimera-700m"], active=True) == n  # no experts: all parameters are active
    moe = PRESETS["moe-125m-active"]
    active, total = count_params(moe, active=True), count_params(moe)
    assert abs(active - 125e6) <= 0.05 * 125e6, active
    d, f, e, k, layers = moe.d_model, moe.d_ff_expert, moe.n_experts, moe.top_k, moe.n_layers
    assert total - active == layers * 3 * d * f * (e - k)  # the inactive experts, counted independently
    # eval_shape counts equal a real allocation's on a small config.
    cfg = CONFIGS["hybrid_nope_groups2_tied"]
    real = sum(x.size for x in jax.tree.leaves(nnx.state(HybridLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)))
    assert real == count_params(cfg)


def test_config_overrides_and_errors():
    cfg = get_config("smoke", ["d_state=16", "rope=false", "n_layers=8"])
    assert cfg.d_state == 16 and cfg.rope is False and cfg.n_layers == 8
    assert cfg.layer_types == hybrid_layer_types(8, 3)
    assert get_config("smoke", ["layer_types=mamba,attention,mamba,mamba"]).layer_types[1] == "attention"
    with pytest.raises(ValueError, match="unknown model preset"):
        get_config("huge")
    with pytest.raises(ValueError, match="no such field"):
        get_config("smoke", ["d_modle=3"])
    with pytest.raises(ValueError, match="integer"):
        get_config("smoke", ["d_model=abc"])
    with pytest.raises(ValueError, match="layer_types"):
        dataclasses.replace(PRESETS["smoke"], layer_types=("mamba",))
    with pytest.raises(ValueError, match="layer_types"):
        dataclasses.replace(PRESETS["smoke"], layer_types=("mamba", "rnn", "mamba", "mamba"))
    with pytest.raises(ValueError, match="mamba_head_dim"):
        dataclasses.replace(PRESETS["smoke"], mamba_head_dim=7)
    with pytest.raises(ValueError, match="n_kv_heads"):
        dataclasses.replace(PRESETS["smoke"], n_kv_heads=3)


def test_bad_model_inputs():
    model = HybridLM(CONFIGS["hybrid"], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tokens"):
        model(jnp.zeros((2, 5), jnp.float32))
    with pytest.raises(ValueError, match="tokens"):
        model(jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids"):
        model(jnp.zeros((2, 5), jnp.int32), segment_ids=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="token"):
        model.decode_step(jnp.zeros((2, 1), jnp.int32), model.init_cache(2, 8))
    with pytest.raises(ValueError, match="overflow"):
        model.prefill(jnp.zeros((2, 9), jnp.int32), model.init_cache(2, 8))


def test_bfloat16_params_run():
    cfg = dataclasses.replace(CONFIGS["hybrid"], param_dtype="bfloat16")
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    logits = model(jnp.zeros((1, 9), jnp.int32))
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(logits)))
