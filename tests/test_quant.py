"""Weight-only quantization: NF4 levels derived independently, error bounds per scheme, packing, double
quantization, the pytree under jit, and whole-model quantization in place."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.stats import norm

from mani_jax.core import quant
from mani_jax.models import HybridLM, get_config
from mani_jax.models.quantize import QuantizedLinear, quantize_model


def _w(shape, seed=0, scale=0.02):
    return jnp.asarray(np.random.default_rng(seed).normal(0, scale, shape), jnp.float32)


def _rel(a, b):
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


def test_nf4_code_matches_qlora_construction():
    # QLoRA eq. 4 / bitsandbytes create_normal_map(offset=0.9677083, use_extra_value=True), from scipy.
    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    v = v / np.max(np.abs(v))
    # bitsandbytes builds the table in float32 (torch); the float64 construction differs by <= 2 ulp.
    np.testing.assert_allclose(quant.NF4_CODE, v, rtol=0, atol=2.5e-7)
    assert quant.NF4_CODE[0] == -1.0 and quant.NF4_CODE[7] == 0.0 and quant.NF4_CODE[15] == 1.0
    assert np.all(np.diff(quant.NF4_CODE) > 0)


def test_int8_per_channel_error_bound():
    w = _w((256, 96))
    qa = quant.quantize(w, "int8")
    wd = qa.dequantize()
    assert qa.codes.dtype == jnp.int8 and qa.scale.shape == (1, 96)
    assert _rel(wd, w) < 1e-2
    assert bool(jnp.all(jnp.abs(wd - w) <= qa.scale / 2 + 1e-7))
    assert abs(qa.bits_per_weight - (8 + 32 / 256)) < 1e-9


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_groupwise_error_bound(group_size):
    w = _w((256, 64), seed=group_size)
    qa = quant.quantize(w, "int4", group_size=group_size)
    wd = qa.dequantize()
    g = w.reshape(256 // group_size, group_size, 64)
    step = (g.max(axis=1, keepdims=True) - g.min(axis=1, keepdims=True)) / 15
    err = jnp.abs(wd - w).reshape(g.shape)
    assert bool(jnp.all(err <= step / 2 + 1e-7))  # round-to-nearest on a uniform 16-level grid
    assert _rel(wd, w) < 0.13  # Gaussian weights: ~0.08 (g32) to ~0.10 (g128), see docs
    assert qa.codes.dtype == jnp.uint8 and qa.codes.shape == (256 // group_size, group_size // 2, 64)
    assert abs(qa.bits_per_weight - (4 + 64 / group_size)) < 1e-9


def test_int4_smaller_groups_are_more_accurate():
    w = _w((512, 64), seed=3)
    errs = [_rel(quant.quantize(w, "int4", group_size=g).dequantize(), w) for g in (32, 64, 128)]
    assert errs[0] < errs[1] < errs[2]


def test_nf4_picks_the_nearest_level_times_absmax():
    w = _w((128, 32), seed=5)
    qa = quant.quantize(w, "nf4", group_size=64)
    wd = np.asarray(qa.dequantize())
    wn = np.asarray(w).reshape(2, 64, 32)
    absmax = np.abs(wn).max(axis=1, keepdims=True)
    idx = np.argmin(np.abs((wn / absmax)[..., None] - quant.NF4_CODE), axis=-1)
    np.testing.assert_allclose(wd, (quant.NF4_CODE[idx] * absmax).reshape(128, 32), rtol=1e-6, atol=0)
    assert _rel(qa.dequantize(), w) < 0.12
    assert abs(qa.bits_per_weight - 4.5) < 1e-9


def test_nf4_double_quant_saves_bits_and_stays_close():
    w = _w((1024, 256), seed=7)
    plain = quant.quantize(w, "nf4", group_size=64)
    dq = quant.quantize(w, "nf4", group_size=64, double_quant=True)
    # QLoRA: 0.5 -> 0.127 bits/param of scale overhead (plus our one float32 mean).
    assert abs(dq.bits_per_weight - (4 + 8 / 64 + 32 / (64 * 256) + 32 / w.size)) < 1e-9
    assert dq.scale.dtype == jnp.int8
    assert _rel(dq.dequantize(), plain.dequantize()) < 5e-3
    assert _rel(dq.dequantize(), w) < 0.12


def test_nibble_packing_round_trip():
    codes = jnp.asarray(np.random.default_rng(0).integers(0, 16, (3, 8, 5)), jnp.uint8)
    np.testing.assert_array_equal(quant._unpack_nibbles(quant._pack_nibbles(codes)), codes)


def test_leading_axes_jit_and_matmul():
    w = _w((4, 64, 48), seed=1)  # e.g. 4 experts
    for scheme in quant.SCHEMES:
        qa = jax.jit(lambda a, s=scheme: quant.quantize(a, s, group_size=32))(w)
        wd = jax.jit(lambda q: q.dequantize())(qa)
        assert wd.shape == w.shape
        np.testing.assert_allclose(wd, quant.dequantize(quant.quantize(w, scheme, group_size=32)), rtol=1e-5,
                                   atol=1e-7)
        leaves, tree = jax.tree.flatten(qa)
        assert jax.tree.unflatten(tree, leaves).scheme == scheme
    x = _w((5, 64), seed=2, scale=1.0)
    qa = quant.quantize(w[0], "int8")
    np.testing.assert_allclose(quant.quantized_matmul(x, qa), x @ qa.dequantize(), rtol=1e-5, atol=1e-6)


def test_bad_input_is_rejected():
    w = _w((96, 16))
    with pytest.raises(ValueError, match="scheme"):
        quant.quantize(w, "int3")
    with pytest.raises(ValueError, match="group"):
        quant.quantize(w, "int4", group_size=64)  # 96 % 64 != 0
    with pytest.raises(ValueError, match="double_quant"):
        quant.quantize(w, "int8", double_quant=True)
    with pytest.raises(ValueError, match="w:"):
        quant.quantize(w[0], "int8")
    with pytest.raises(ValueError, match="floating"):
        quant.quantize(jnp.zeros((4, 4), jnp.int32), "int8")


def test_int8_matmul_relative_error_below_one_percent():
    w = _w((512, 256), seed=11)
    x = _w((64, 512), seed=12, scale=1.0)
    y = x @ w
    assert _rel(quant.quantized_matmul(x, quant.quantize(w, "int8")), y) < 1e-2
    # int4 / NF4 (group 64) on Gaussian weights: ~1e-1, the documented 4-bit cost.
    for scheme in ("int4", "nf4"):
        assert _rel(quant.quantized_matmul(x, quant.quantize(w, scheme, group_size=64)), y) < 0.12


# Max |dlogit| / max |logit| of a whole random-init model (the worst case: no structure to preserve); the
# per-matmul bounds above are the precise ones.
@pytest.mark.parametrize("scheme,bound", [("int8", 0.05), ("int4", 0.4), ("nf4", 0.4)])
def test_quantize_model_in_place(scheme, bound):
    cfg = dataclasses.replace(get_config("smoke"), tie_embeddings=False)
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24)), jnp.int32)
    ref = model(tokens)
    info = quantize_model(model, scheme, group_size=32)
    assert isinstance(model.lm_head, QuantizedLinear) and isinstance(model.layers[0].mixer.in_proj, QuantizedLinear)
    n_linear = sum(4 if t == "attention" else 2 for t in cfg.layer_types) + 3 * cfg.n_layers + 1
    assert info["n_quantized"] == n_linear
    assert info["quantized_bytes"] < info["float_bytes"] / (3.5 if scheme == "int8" else 5)
    out = model(tokens)
    assert float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref))) < bound
    # Cached decoding runs through the quantized weights too.
    cache = model.init_cache(2, 32)
    logits, cache = model.prefill(tokens, cache)
    np.testing.assert_allclose(logits, out, rtol=2e-4, atol=2e-4)


def test_quantize_moe_experts_and_keep_router_float():
    cfg = get_config("smoke", {"n_experts": 4, "top_k": 2, "d_ff_expert": 64, "dropless_impl": "blocked"})
    model = HybridLM(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 16)), jnp.int32)
    ref = model(tokens)
    quantize_model(model, "int8")
    moe = model.layers[0].moe
    assert isinstance(moe.router, nnx.Linear) and isinstance(moe.w_gate.get_value(), quant.QuantizedArray)
    out = model(tokens)
    assert float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref))) < 0.05


def test_quantize_model_bad_group_size_leaves_model_untouched():
    model = HybridLM(get_config("smoke"), rngs=nnx.Rngs(0))  # d_model 128, d_ff 384
    with pytest.raises(ValueError, match="group"):
        quantize_model(model, "int4", group_size=256)
    assert isinstance(model.layers[0].mixer.in_proj, nnx.Linear)
