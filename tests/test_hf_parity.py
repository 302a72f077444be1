"""Our models against Hugging Face transformers goldens (tests/golden, made by make_hf_goldens.py; no torch here)."""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from mani_jax.models import config_from_hf, load_hf

GOLDEN = Path(__file__).parent / "golden"
NAMES = ["granite_hybrid_rope", "granite_hybrid_nope", "qwen2", "qwen2_tied", "mixtral", "granite_hybrid_moe",
         "mixtral_sliding"]


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
    model = load_hf(GOLDEN / name)
    g = np.load(GOLDEN / name / "golden.npz")
    logits = np.asarray(model(jnp.asarray(g["input_ids"])))
    ref = g["logits"]
    assert logits.shape == ref.shape
    assert np.abs(logits - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("name", ["granite_hybrid_rope", "qwen2", "granite_hybrid_moe"])
def test_cached_decoding_matches_transformers(name):
    model = load_hf(GOLDEN / name)
    g = np.load(GOLDEN / name / "golden.npz")
    ids = jnp.asarray(g["input_ids"])
    cache = model.init_cache(ids.shape[0], ids.shape[1])
    logits, cache = model.prefill(ids[:, :20], cache)
    outs = [np.asarray(logits)]
    decode = nnx.jit(lambda m, tok, c: m.decode_step(tok, c))  # one compile instead of eager steps
    for t in range(20, ids.shape[1]):
        step, cache = decode(model, ids[:, t], cache)
        outs.append(np.asarray(step)[:, None])
    ref = g["logits"]
    assert np.abs(np.concatenate(outs, 1) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_config_translation():
    hf = json.loads((GOLDEN / "granite_hybrid_rope" / "config.json").read_text())
    cfg = config_from_hf(hf)
    assert cfg.layer_types == ("mamba", "attention", "mamba", "mamba")
    assert cfg.embedding_multiplier == 3.0 and cfg.logits_scaling == 2.5 and cfg.attention_multiplier == 0.2
    # Published Granite-4.0-H configs spell layer types mamba/attention and put rope_theta at top level.
    hf2 = dict(hf, layer_types=["mamba", "attention", "mamba", "mamba"], rope_theta=5e5)
    hf2.pop("rope_parameters")
    cfg2 = config_from_hf(hf2)
    assert cfg2.layer_types == cfg.layer_types and cfg2.rope_theta == 5e5
    assert config_from_hf(json.loads((GOLDEN / "granite_hybrid_nope" / "config.json").read_text())).rope is False


def _copy(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(GOLDEN / name, dst)
    return dst


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    d = _copy("qwen2", tmp_path)
    tensors = load_file(d / "model.safetensors")
    gone = tensors.pop("model.layers.1.self_attn.k_proj.bias")
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match="model.layers.1.self_attn.k_proj.bias"):
        load_hf(d)
    tensors["model.layers.1.self_attn.k_proj.bias"] = np.concatenate([gone, gone])
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match="shape"):
        load_hf(d)
    tensors["model.layers.1.self_attn.k_proj.bias"] = gone
    tensors["model.layers.9.extra.weight"] = gone
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match="no place"):
        load_hf(d)


def test_unsupported_configs(tmp_path):
    d = _copy("granite_hybrid_rope", tmp_path)
    hf = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(hf, time_step_limit=[0.0, 10.0])))
    with pytest.raises(NotImplementedError, match="time_step_limit"):
        load_hf(d)
    (d / "config.json").write_text(json.dumps(dict(hf, num_local_experts=4, num_experts_per_tok=2)))
    with pytest.raises(ValueError, match="block_sparse_moe"):  # a dense checkpoint claiming experts
        load_hf(d)
    (d / "config.json").write_text(json.dumps(dict(hf, model_type="llama4")))
    with pytest.raises(ValueError, match="model_type"):
        load_hf(d)
    with pytest.raises(FileNotFoundError):
        load_hf(tmp_path / "nowhere")


def test_moe_configs_translate():
    mix = config_from_hf(json.loads((GOLDEN / "mixtral" / "config.json").read_text()))
    assert (mix.n_experts, mix.top_k, mix.shared_mlp) == (8, 2, False)
    gr = config_from_hf(json.loads((GOLDEN / "granite_hybrid_moe" / "config.json").read_text()))
    assert (gr.n_experts, gr.top_k, gr.shared_mlp) == (8, 2, True) and gr.d_ff_expert == 24 and gr.d_ff == 40


def test_missing_expert_tensor_is_named(tmp_path):
    d = _copy("mixtral", tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors.pop("model.layers.2.block_sparse_moe.experts.5.w3.weight")
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match="experts.5.w3"):
        load_hf(d)
