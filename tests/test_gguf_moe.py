"""GGUF export of mixture-of-experts models (mani_jax.export.gguf): llama.cpp parity, read-back, quantization.

Arches (module docstring of mani_jax.export.gguf): all-attention experts -> ``llama`` (Mixtral) or, with a shared
MLP / NoPE / Granite scalars, ``granite`` (``granitemoe`` on request, RoPE only); Mamba-2 + attention with experts
-> ``granitehybrid`` (shared MLP as ``ffn_*_shexp``). The Hugging Face goldens
(tests/golden/{mixtral,granite_hybrid_moe}, float64 transformers references) give three-way agreement transformers =
JAX = llama.cpp; random configs derived from the ``smoke`` preset cover the other combinations. llama.cpp checks
need llama-cpp-python==0.3.36 and are skipped without it.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from flax import nnx  # noqa: E402

from mani_jax.export import gguf as xg  # noqa: E402
from mani_jax.export import parity  # noqa: E402
from mani_jax.models import HybridLM, get_config, load_hf  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"
QT = gguf.GGMLQuantizationType
MOE = dict(n_experts=4, top_k=2, d_ff_expert=64)


def moe_cfg(**kw):
    """The ``smoke`` preset (d_model 128, layers M M A M) with 4 experts, top-2, expert width 64."""
    base = dict(MOE, initializer_range=0.08)
    base.update(kw)
    return dataclasses.replace(get_config("smoke"), **base)


def moe_model(seed=0, **kw) -> HybridLM:
    return HybridLM(moe_cfg(**kw), rngs=nnx.Rngs(seed))


ATTN4 = dict(n_layers=4, layer_types=("attention",) * 4)


def export(model, path, quant="f32", **kw) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return xg.export_gguf(model, None, path, quant=quant, **kw)


def params(model) -> dict:
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def logits(model, ids) -> np.ndarray:
    return np.asarray(model(jnp.asarray([ids], jnp.int32))[0])


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(a)).max())


def _llama_cpp():
    return pytest.importorskip("llama_cpp")


def expected_after(key, a: np.ndarray, qtype) -> np.ndarray:
    """A parameter after export with ``qtype`` and read-back: kernels are quantized along their input dimension
    (F16 when it is not a multiple of 32); the router, norms, biases and SSM parameters stay F32."""
    def q(t):  # t: GGUF layout, rows last
        t = np.ascontiguousarray(t)
        if t.shape[-1] % 32:
            return t.astype(np.float16).astype(np.float32)
        return gguf.quants.dequantize(gguf.quants.quantize(t, qtype), qtype)

    if qtype is None or "router" in key:
        return a
    if key[-1] in ("w_gate", "w_up", "w_down"):  # [E, in, out] written (E, out, in)
        return q(a.swapaxes(1, 2)).swapaxes(1, 2)
    if key[-1] == "kernel" and a.ndim == 2:
        return q(a.T).T
    if key[-1] == "embedding":
        return q(a)
    return a


def assert_round_trip(model, loaded, qtype=None):
    """``loaded`` has ``model``'s config and parameters: bit-exact for F32 (``A_log`` up to one rounding, as it is
    stored as ``-exp(A_log)``), the dequantized values for ``qtype``."""
    assert loaded.config == model.config
    src, got = params(model), params(loaded)
    assert set(src) == set(got)
    for key, a in src.items():
        if key[-1] == "A_log":
            np.testing.assert_allclose(got[key], a, rtol=1e-6, atol=1e-7, err_msg=str(key))
        elif qtype is None:
            np.testing.assert_array_equal(got[key], a, err_msg=str(key))
        else:
            np.testing.assert_allclose(got[key], expected_after(key, a, qtype), rtol=1e-6, atol=0, err_msg=str(key))


# ------------------------------------------------------------------------------------------------- format

def test_select_arch_metadata_and_tensor_types(tmp_path):
    assert xg.select_arch(moe_cfg()) == "granitehybrid"
    assert xg.select_arch(moe_cfg(shared_mlp=True)) == "granitehybrid"
    assert xg.select_arch(moe_cfg(**ATTN4)) == "llama"
    assert xg.select_arch(moe_cfg(**ATTN4, shared_mlp=True)) == "granite"
    assert xg.select_arch(moe_cfg(**ATTN4, rope=False)) == "granite"
    assert xg.select_arch(moe_cfg(**ATTN4, logits_scaling=2.0)) == "granite"

    model = moe_model(shared_mlp=True, d_ff=80, n_experts=3, top_k=1)  # shared width 80 is not a multiple of 32
    with pytest.warns(UserWarning, match=r"written F16: .*ffn_down_shexp"):
        path = xg.export_gguf(model, None, tmp_path / "m.gguf", quant="q8_0")
    info = xg.inspect(path)
    md, a = info["metadata"], "granitehybrid."
    assert md["general.architecture"] == "granitehybrid"
    assert (md[a + "expert_count"], md[a + "expert_used_count"]) == (3, 1)
    assert md[a + "feed_forward_length"] == 64  # the per-expert width: llama.cpp sizes ffn_*_exps with n_ff
    assert md[a + "expert_shared_feed_forward_length"] == 80
    types = {t["name"]: t["type"] for t in info["tensors"]}
    shapes = {t["name"]: t["shape"] for t in info["tensors"]}
    assert shapes["blk.0.ffn_gate_inp.weight"] == (3, 128) and types["blk.0.ffn_gate_inp.weight"] == "F32"
    assert shapes["blk.0.ffn_gate_exps.weight"] == shapes["blk.0.ffn_up_exps.weight"] == (3, 64, 128)
    assert shapes["blk.0.ffn_down_exps.weight"] == (3, 128, 64)
    assert shapes["blk.2.ffn_gate_shexp.weight"] == (80, 128) and shapes["blk.2.ffn_down_shexp.weight"] == (128, 80)
    for n in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_shexp", "ffn_up_shexp"):
        assert types[f"blk.1.{n}.weight"] == "Q8_0", n
    assert types["blk.1.ffn_down_shexp.weight"] == "F16"
    assert not any(n.startswith("blk.0.ffn_gate.") or n.startswith("blk.0.ffn_down.") for n in types)
    loaded, _ = xg.load(path)
    assert_round_trip(model, loaded, QT.Q8_0)

    dense = moe_model(**ATTN4)  # Mixtral-style: no shared-expert keys or tensors
    md = xg.inspect(export(dense, tmp_path / "l.gguf"))["metadata"]
    assert md["general.architecture"] == "llama" and md["llama.expert_count"] == 4
    assert "llama.expert_shared_feed_forward_length" not in md


def test_unsupported_moe_combinations_raise(tmp_path):
    with pytest.raises(ValueError, match="shared_mlp"):  # llama.cpp's llama graph has no shared expert
        xg.export_gguf(moe_model(**ATTN4, shared_mlp=True), None, tmp_path / "x.gguf", arch="llama")
    with pytest.raises(ValueError, match="rope"):  # llama.cpp's granitemoe ignores the RoPE switch
        xg.export_gguf(moe_model(**ATTN4, rope=False), None, tmp_path / "x.gguf", arch="granitemoe")
    with pytest.raises(ValueError, match="n_experts"):
        xg.export_gguf(moe_model(**ATTN4, n_experts=0), None, tmp_path / "x.gguf", arch="granitemoe")
    with pytest.raises(ValueError, match="mlp_bias"):
        xg.export_gguf(moe_model(shared_mlp=True, mlp_bias=True), None, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="Mamba-2"):
        xg.export_gguf(moe_model(), None, tmp_path / "x.gguf", arch="granitemoe")
    assert list(tmp_path.iterdir()) == []
    with pytest.warns(UserWarning, match="capacity_factor"):  # llama.cpp is dropless: export, but say so
        xg.export_gguf(moe_model(**ATTN4, capacity_factor=1.25), None, tmp_path / "c.gguf")
    loaded, _ = xg.load(tmp_path / "c.gguf")
    assert loaded.config.capacity_factor == 1.25  # our config record keeps the field GGUF has no key for


# ------------------------------------------------------------------------------------------------- llama.cpp

def _check_parity(model, path, ids, n_greedy):
    r = parity.compare_with_llama_cpp(model, path, ids, n_greedy=n_greedy)
    print({k: v for k, v in r.items() if not k.endswith("_tokens")})
    assert r["max_rel_logit_diff"] <= 1e-3, r
    assert r["top1_agreement"] == 1.0 and r["mean_kl"] < 1e-5
    assert r["greedy_match_tokens"] == n_greedy, (r["jax_greedy_tokens"], r["llama_greedy_tokens"])
    return r


@pytest.mark.parametrize("name,arch", [("mixtral", "llama"), ("granite_hybrid_moe", "granitehybrid")])
def test_transformers_moe_goldens_in_llama_cpp(tmp_path, name, arch):
    """transformers (golden logits) = JAX = llama.cpp (F32), export -> load exact, Q8_0 close."""
    _llama_cpp()
    model = load_hf(GOLDEN / name)
    g = np.load(GOLDEN / name / "golden.npz")
    path = export(model, tmp_path / "m.gguf", "f32")
    assert xg.inspect(path)["metadata"]["general.architecture"] == arch
    ids = g["input_ids"][0].tolist()
    _check_parity(model, path, ids, n_greedy=8)
    with parity.open_llama(path) as llm:
        for row, ref in zip(g["input_ids"], g["logits"]):
            assert rel(ref, parity.llama_cpp_logits(llm, row.tolist())) <= 1e-3
    loaded, _ = xg.load(path)
    assert_round_trip(model, loaded)
    assert rel(logits(model, ids), logits(loaded, ids)) <= 1e-5  # A_log's rounding is the only difference

    q8 = export(model, tmp_path / "q8.gguf", "q8_0")
    loaded_q8, _ = xg.load(q8)
    assert_round_trip(model, loaded_q8, QT.Q8_0)
    ref, deq = logits(model, ids), logits(loaded_q8, ids)
    got = parity.llama_cpp_logits(q8, ids)
    m_deq = parity.logit_metrics(deq, got)  # llama.cpp on the Q8_0 file vs JAX on the same (dequantized) weights
    m_ref = parity.logit_metrics(ref, got)  # vs the F32 model: includes quantization (and routing flips)
    print(name, "q8_0 vs dequantized JAX", m_deq, "vs f32 JAX", m_ref)
    assert m_deq["max_rel_logit_diff"] <= 0.05 and m_deq["mean_kl"] < 1e-3
    assert m_ref["mean_kl"] < 0.05 and m_ref["top1_agreement"] >= 0.85


RANDOM_CASES = {
    "hybrid-shared": (dict(shared_mlp=True, d_ff=96), "granitehybrid"),
    # all attention + shared MLP, NoPE, Granite scalars: llama.cpp's granite graph; top-1 routing (weight 1)
    "attention-shared-nope-scalars-top1": (dict(ATTN4, shared_mlp=True, top_k=1, rope=False,
                                                embedding_multiplier=1.5, residual_multiplier=0.7,
                                                logits_scaling=1.3, tie_embeddings=False), None),
    # what llama.cpp's converter writes for GraniteMoe checkpoints (RoPE on)
    "attention-shared-granitemoe": (dict(ATTN4, shared_mlp=True, logits_scaling=1.3), "granitemoe"),
}


@pytest.mark.parametrize("case", list(RANDOM_CASES))
def test_random_moe_configs_in_llama_cpp(tmp_path, case):
    _llama_cpp()
    kw, arch = RANDOM_CASES[case]
    model = moe_model(seed=len(case), **kw)
    path = export(model, tmp_path / "m.gguf", "f32", arch=arch)
    assert xg.inspect(path)["metadata"]["general.architecture"] == (arch or xg.select_arch(model.config))
    ids = [1] + np.random.default_rng(0).integers(3, model.config.vocab_size, 23).tolist()
    ref = logits(model, ids)
    m = parity.logit_metrics(ref, parity.llama_cpp_logits(path, ids))  # greedy decoding: the golden tests
    print(case, m)
    assert m["max_rel_logit_diff"] <= 1e-3 and m["top1_agreement"] == 1.0, m
    loaded, _ = xg.load(path)
    assert_round_trip(model, loaded)
