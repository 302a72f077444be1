"""GGUF export (mani_jax.export): llama.cpp parity, quant types, tokenizer parity, read-back, malformed files, CLI.

The llama.cpp checks need llama-cpp-python==0.3.36 (installed by .ci/run); without it they are skipped and the
writer/reader tests still run. Models are small random ones (d_model 64, initializer_range 0.15) so logits are
far from uniform; the tokenizer is trained on a few KB of English and Hindi.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from flax import nnx  # noqa: E402

from mani_jax.export import gguf as xg  # noqa: E402
from mani_jax.export import parity  # noqa: E402
from mani_jax.export.__main__ import main as cli_main  # noqa: E402
from mani_jax.models import HybridLM, ModelConfig, load_hf  # noqa: E402
from mani_jax.tokenizer import train_tokenizer  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"
QT = gguf.GGMLQuantizationType

_EN = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox runs away.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness. We had everything before us, we had nothing before us.",
    "In the morning the farmer walks to the market with three baskets of apples and two of pears. "
    "He sells them for 12 shillings and 6 pence, then walks home again before the evening rain.",
    "A language model predicts the next token from the tokens before it. Training minimises the "
    "cross entropy between the predicted distribution and the observed next token.",
]
_HI = [
    "नमस्ते, आप कैसे हैं? मैं ठीक हूँ, धन्यवाद।",
    "आज मौसम बहुत अच्छा है और हम बाज़ार जा रहे हैं।",
    "भारत एक विशाल देश है जिसमें कई भाषाएँ बोली जाती हैं।",
]
CORPUS = "\n".join(f"{p} ({i})" if i % 3 else p for i in range(10) for p in _EN + _HI)

TOKENIZER_CASES = [
    "The quick brown fox jumps over the lazy dog.",
    "नमस्ते दुनिया, आप कैसे हैं? १२३",
    "emoji 😀👩‍💻🇮🇳 and ❤️‍🔥",
    "digits 12345 67890 3.14159 and 2024-10-01",
    " leading space",
    "   three leading spaces",
    "multiple     inner      spaces",
    "trailing spaces   ",
    "line one\nline two\n\n\nafter blank lines\n",
    "\ttabs\tand\t\ttabs",
    "\r\nwindows\r\n",
    "héllo wörld — “quotes”",
    "<s> and </s> and <pad> are literal text here",
    " ",
    "\n",
]


# ------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer([CORPUS], 420, tmp_path_factory.mktemp("tok") / "spm")


def make_cfg(layers: str, **kw) -> ModelConfig:
    base = dict(vocab_size=448, d_model=64, n_layers=len(layers),
                layer_types=tuple("attention" if c == "A" else "mamba" for c in layers), n_heads=4, n_kv_heads=2,
                head_dim=16, d_ff=128, mamba_n_heads=8, mamba_head_dim=16, d_state=16, chunk_size=16,
                max_seq_len=128, initializer_range=0.15)
    base.update(kw)
    return ModelConfig(**base)


def make_model(layers: str, seed: int = 0, **kw) -> HybridLM:
    return HybridLM(make_cfg(layers, **kw), rngs=nnx.Rngs(seed))


def prompt_ids(tok, text: str = "The quick brown fox jumps over the lazy dog. नमस्ते, आप कैसे हैं?") -> list[int]:
    return [tok.bos_id] + tok.encode(text)


def jax_logits(model, ids) -> np.ndarray:
    return np.asarray(model(jnp.asarray([ids], jnp.int32))[0])


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(a)).max())


def export(model, tok, path, quant="f32", **kw) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return xg.export_gguf(model, tok, path, quant=quant, **kw)


def _llama_cpp():
    return pytest.importorskip("llama_cpp")


# ------------------------------------------------------------------------------------------------- pure format

def test_qk_permute_turns_rotate_half_into_adjacent_pairs():
    """NEOX rope on q equals NORM rope on the permuted q (what llama.cpp computes), per head."""
    rng = np.random.default_rng(0)
    n_heads, hd, pos, theta = 3, 8, 5, 10000.0
    w = rng.normal(size=(n_heads * hd, 7))
    x = rng.normal(size=7)
    inv = theta ** (-np.arange(0, hd, 2) / hd)
    ang = pos * inv
    q = (w @ x).reshape(n_heads, hd)
    q1, q2 = q[:, : hd // 2], q[:, hd // 2:]
    neox = np.concatenate([q1 * np.cos(ang) - q2 * np.sin(ang), q2 * np.cos(ang) + q1 * np.sin(ang)], 1)
    qp = (xg.permute_qk(w, n_heads) @ x).reshape(n_heads, hd)
    a, b = qp[:, 0::2], qp[:, 1::2]
    norm = np.empty_like(qp)
    norm[:, 0::2], norm[:, 1::2] = a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)
    # The NORM output is the NEOX output with the same row permutation: dot products (q.k) are unchanged.
    np.testing.assert_allclose(norm.reshape(-1), xg.permute_qk(neox.reshape(-1), n_heads), atol=1e-12)
    np.testing.assert_array_equal(xg.unpermute_qk(xg.permute_qk(w, n_heads), n_heads), w)


def test_select_arch_and_unexportable_configs(tok, tmp_path):
    assert xg.select_arch(make_cfg("MAMM")) == "granitehybrid"
    assert xg.select_arch(make_cfg("AAAA")) == "llama"
    assert xg.select_arch(make_cfg("AAAA", attention_multiplier=0.25)) == "llama"  # = 1/sqrt(16): default
    assert xg.select_arch(make_cfg("AAAA", rope=False)) == "granite"
    assert xg.select_arch(make_cfg("AAAA", embedding_multiplier=2.0)) == "granite"
    with pytest.raises(ValueError, match="sliding_window"):
        xg.export_gguf(make_model("AA", sliding_window=8), tok, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="mamba_proj_bias"):
        xg.export_gguf(make_model("MA", mamba_proj_bias=True), tok, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="NoPE"):
        xg.export_gguf(make_model("AA", rope=False), tok, tmp_path / "x.gguf", arch="llama")
    with pytest.raises(ValueError, match="Mamba-2"):
        xg.export_gguf(make_model("MA"), tok, tmp_path / "x.gguf", arch="granite")
    with pytest.raises(ValueError, match="no attention layer"):  # llama.cpp would abort on the first decode
        xg.export_gguf(make_model("MMM"), tok, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="no Mamba-2 layer"):
        xg.export_gguf(make_model("AA"), tok, tmp_path / "x.gguf", arch="granitehybrid")
    with pytest.raises(ValueError, match="n_experts"):  # granitemoe is for experts (MoE: tests/test_gguf_moe.py)
        xg.export_gguf(make_model("AA"), tok, tmp_path / "x.gguf", arch="granitemoe")
    with pytest.raises(ValueError, match="quant"):
        xg.export_gguf(make_model("AA"), tok, tmp_path / "x.gguf", quant="q3_k")
    with pytest.raises(ValueError, match="vocab_size"):
        xg.export_gguf(make_model("AA", vocab_size=300), tok, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="directory"):
        xg.export_gguf(make_model("AA"), tok, tmp_path / "missing" / "x.gguf")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_metadata_tensor_types_and_f16_fallback(tok, tmp_path):
    model = make_model("MAMA", n_groups=2, d_ff=80, tie_embeddings=False, embedding_multiplier=2.0,
                       residual_multiplier=0.5, logits_scaling=1.5, attention_multiplier=0.3, rope=False)
    with pytest.warns(UserWarning, match=r"written F16: .*ffn_down"):
        path = xg.export_gguf(model, tok, tmp_path / "m.gguf", quant="q8_0", name="tiny", chat_template="{{ x }}")
    info = xg.inspect(path)
    md = info["metadata"]
    a = "granitehybrid."
    assert md["general.architecture"] == "granitehybrid" and md["general.name"] == "tiny"
    assert md["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert md[a + "attention.head_count_kv"] == [0, 2, 0, 2]
    assert (md[a + "block_count"], md[a + "embedding_length"], md[a + "feed_forward_length"]) == (4, 64, 80)
    assert (md[a + "ssm.inner_size"], md[a + "ssm.time_step_rank"], md[a + "ssm.group_count"]) == (128, 8, 2)
    assert (md[a + "ssm.state_size"], md[a + "ssm.conv_kernel"], md[a + "context_length"]) == (16, 4, 128)
    assert md[a + "rope.scaling.finetuned"] is False
    assert md[a + "embedding_scale"] == 2.0 and md[a + "residual_scale"] == 0.5 and md[a + "logit_scale"] == 1.5
    assert math.isclose(md[a + "attention.scale"], 0.3, rel_tol=1e-6)
    assert md["tokenizer.ggml.model"] == "llama" and md["tokenizer.ggml.add_space_prefix"] is False
    assert md["tokenizer.ggml.remove_extra_whitespaces"] is False and md["tokenizer.ggml.add_bos_token"] is True
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert md["tokenizer.chat_template"] == "{{ x }}"
    types = {t["name"]: t["type"] for t in info["tensors"]}
    shapes = {t["name"]: t["shape"] for t in info["tensors"]}
    for name in ("blk.0.ssm_a", "blk.0.ssm_d", "blk.0.ssm_conv1d.weight", "blk.0.ssm_conv1d.bias",
                 "blk.0.ssm_dt.bias", "blk.0.ssm_norm.weight", "blk.0.attn_norm.weight", "output_norm.weight"):
        assert types[name] == "F32", name
    for name in ("token_embd.weight", "output.weight", "blk.0.ssm_in.weight", "blk.0.ssm_out.weight",
                 "blk.1.attn_q.weight", "blk.1.attn_output.weight", "blk.1.ffn_gate.weight"):
        assert types[name] == "Q8_0", name
    assert types["blk.1.ffn_down.weight"] == "F16"  # input dim 80 is not a multiple of 32
    assert shapes["blk.0.ssm_in.weight"] == (2 * 128 + 2 * 2 * 16 + 8, 64)
    assert shapes["blk.0.ssm_a"] == (8, 1) and shapes["blk.0.ssm_norm.weight"] == (2, 64)
    assert xg.inspect(path)["metadata"]["tokenizer.ggml.tokens"] == "<array of 448>"  # padded to vocab_size


@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0", "q5_0", "q4_1", "q4_0"])
def test_read_back_is_the_dequantized_model(tok, tmp_path, quant):
    model = make_model("MAMA", n_groups=2, tie_embeddings=False, attention_bias=True)
    path = export(model, tok, tmp_path / f"m-{quant}.gguf", quant)
    loaded, tok2 = xg.load(path)
    assert loaded.config == model.config
    qtype = xg.QUANT_TYPES[quant][0]
    src = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    got = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
    assert set(src) == set(got)
    for key, var in src.items():
        a = np.asarray(var.get_value())
        b = np.asarray(got[key].get_value())
        if a.ndim == 2 and key[-1] in ("kernel", "embedding"):  # quantized along the input dimension
            t = a.T if key[-1] == "kernel" else a
            dq = gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(t), qtype), qtype)
            expect = dq.T if key[-1] == "kernel" else dq
        elif key[-1] == "A_log":
            expect = np.log(np.exp(a.astype(np.float64))).astype(np.float32)
        else:
            expect = a
        np.testing.assert_allclose(b, expect, rtol=1e-6, atol=0, err_msg=str(key))
    ids = prompt_ids(tok)
    bound = {"f32": 1e-6, "f16": 1e-2, "bf16": 5e-2, "q8_0": 0.15}.get(quant, 1.5)
    assert rel(jax_logits(model, ids), jax_logits(loaded, ids)) <= bound
    s = TOKENIZER_CASES[1] + TOKENIZER_CASES[2]
    assert tok2.encode(s) == tok.encode(s)


def test_read_back_tokenizer_matches_for_every_case(tok, tmp_path):
    path = export(make_model("AA"), tok, tmp_path / "m.gguf")
    _, tok2 = xg.load(path)
    assert tok2.vocab_size == 448 and tok2.bos_id == 1 and tok2.eos_id == 2 and tok2.pad_id == 3
    for text in TOKENIZER_CASES:
        assert tok2.encode(text) == tok.encode(text), text
        assert tok2.decode(tok2.encode(text)) == text
    m16, _ = xg.load(path, param_dtype="bfloat16")
    assert m16.embed.embedding.dtype == jnp.bfloat16 and m16.config.param_dtype == "bfloat16"
    with pytest.raises(ValueError, match="param_dtype"):
        xg.load(path, param_dtype="float16")


# ------------------------------------------------------------------------------------------------- malformed files

def _rewrite(src: Path, dst: Path, *, arch: str | None = None, drop_key: str | None = None,
             drop_tensor: str | None = None, reshape_tensor: str | None = None) -> Path:
    """Copy a GGUF file field by field and tensor by tensor, with one thing changed."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch or r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key == drop_key:
            continue
        if arch and key.startswith(r.fields["general.architecture"].contents() + "."):
            key = arch + key[key.index("."):]
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    for t in r.tensors:
        if t.name == drop_tensor:
            continue
        if t.name == reshape_tensor:
            data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)
            w.add_tensor(t.name, np.ascontiguousarray(data[: data.size // 2].reshape(2, -1)).astype(np.float32))
        elif t.tensor_type in (QT.F32, QT.F16):
            w.add_tensor(t.name, np.array(t.data))
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_malformed_files_raise_clear_errors(tok, tmp_path):
    good = export(make_model("MAMA"), tok, tmp_path / "good.gguf", "q8_0")
    xg.load(_rewrite(good, tmp_path / "copy.gguf"))  # the copier itself is faithful
    with pytest.raises(ValueError, match="unsupported architecture 'mamba2'"):
        xg.load(_rewrite(good, tmp_path / "arch.gguf", arch="mamba2"))
    with pytest.raises(ValueError, match="missing tensor 'blk.1.attn_k.weight'"):
        xg.load(_rewrite(good, tmp_path / "t.gguf", drop_tensor="blk.1.attn_k.weight"))
    with pytest.raises(ValueError, match=r"tensor 'blk.0.ssm_out.weight' has shape \(2, 2048\); expected \(64, 128\)"):
        xg.load(_rewrite(good, tmp_path / "s.gguf", reshape_tensor="blk.0.ssm_out.weight"))
    with pytest.raises(ValueError, match="missing metadata key 'granitehybrid.ssm.state_size'"):
        xg.load(_rewrite(good, tmp_path / "k.gguf", drop_key="granitehybrid.ssm.state_size"))
    data = good.read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) - 5000])
    with pytest.raises(ValueError, match=r"tensor 'blk\.3\.ffn_down\.weight'.*truncated file"):
        xg.load(tmp_path / "trunc.gguf")
    for i, cut in enumerate((0, 3, 40, 2000)):
        (tmp_path / f"head{i}.gguf").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a readable GGUF file"):
            xg.load(tmp_path / f"head{i}.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="GGUF magic"):
        xg.load(tmp_path / "junk.gguf")
    with pytest.raises(FileNotFoundError):
        xg.load(tmp_path / "nope.gguf")


# ------------------------------------------------------------------------------------------------- CLI

def _run_dir(tmp_path, tok, model) -> Path:
    from mani_jax.train import Checkpointer

    run = tmp_path / "run"
    run.mkdir()
    (run / "model_config.json").write_text(json.dumps(dataclasses.asdict(model.config)))
    (run / "tokenizer.model").write_bytes(Path(tok.model_path).read_bytes())
    ck = Checkpointer(run / "checkpoints")
    ck.save(7, model)
    ck.close()
    return run


def test_cli_checkpoint_and_hf(tok, tmp_path, capsys):
    model = make_model("MAMA", seed=3)
    run = _run_dir(tmp_path, tok, model)
    out = cli_main(["--checkpoint", str(run), "--out", str(tmp_path / "c.gguf"), "--quant", "q8_0"])
    assert "arch=granitehybrid" in capsys.readouterr().out
    loaded, tok2 = xg.load(out)
    assert loaded.config == model.config and tok2.encode("the fox") == tok.encode("the fox")
    ids = prompt_ids(tok)
    assert rel(jax_logits(model, ids), jax_logits(loaded, ids)) < 0.15
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.gguf", "run"]  # no temp files left
    # A Hugging Face directory (transformers golden), no SentencePiece model -> placeholder vocabulary.
    hf = GOLDEN / "granite_hybrid_rope"
    out = cli_main(["--hf", str(hf), "--no-tokenizer", "--out", str(tmp_path / "h.gguf"), "--quant", "f32"])
    loaded, tok3 = xg.load(out)
    assert tok3 is None
    g = np.load(hf / "golden.npz")
    np.testing.assert_allclose(np.asarray(loaded(jnp.asarray(g["input_ids"]))), g["logits"], rtol=0,
                               atol=1e-4 * np.abs(g["logits"]).max())
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        cli_main(["--hf", str(hf), "--out", str(tmp_path / "x.gguf")])
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        cli_main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "x.gguf")])
    with pytest.raises(SystemExit):
        cli_main(["--checkpoint", str(run), "--out", str(tmp_path / "x.gguf"), "--quant", "q2"])


# ------------------------------------------------------------------------------------------------- llama.cpp

PARITY_CASES = {
    # layers, config overrides, forced arch
    "MAMM-rope-untied": ("MAMM", dict(tie_embeddings=False), None),
    "AMMA-nope-tied-groups2-scalars": ("AMMA", dict(rope=False, n_groups=2, mamba_conv_bias=False,
                                                    embedding_multiplier=2.0, residual_multiplier=0.7,
                                                    logits_scaling=1.3, attention_multiplier=0.3), None),
    "MMAM-rope-tied-groups2": ("MMAM", dict(n_groups=2, n_kv_heads=4, attention_bias=True), None),
    "dense-llama-bias-untied": ("AAAA", dict(attention_bias=True, attention_out_bias=True, mlp_bias=True,
                                             tie_embeddings=False, rope_theta=500.0), None),
    "dense-llama-tied": ("AAA", dict(n_kv_heads=1, head_dim=32), None),
    "dense-granite-nope-scalars": ("AAA", dict(rope=False, embedding_multiplier=1.5, logits_scaling=0.8), None),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_f32_parity_with_llama_cpp(tok, tmp_path, case):
    _llama_cpp()
    layers, kw, arch = PARITY_CASES[case]
    model = make_model(layers, seed=len(case), **kw)
    path = export(model, tok, tmp_path / "m.gguf", "f32", arch=arch)
    assert xg.inspect(path)["metadata"]["general.architecture"] == (arch or xg.select_arch(model.config))
    ids = prompt_ids(tok)
    r = parity.compare_with_llama_cpp(model, path, ids, n_greedy=32)
    assert r["max_rel_logit_diff"] <= 1e-3, r
    assert r["top1_agreement"] == 1.0 and r["mean_kl"] < 1e-5
    assert r["greedy_match_tokens"] == 32, (r["jax_greedy_tokens"], r["llama_greedy_tokens"])
    assert r["prompt_tokens_per_second"] > 0 and r["decode_tokens_per_second"] > 0 and r["time_to_first_token_s"] > 0


@pytest.mark.parametrize("name", ["granite_hybrid_rope", "granite_hybrid_nope", "qwen2", "qwen2_tied"])
def test_transformers_goldens_run_in_llama_cpp(tmp_path, name):
    """Three implementations agree: transformers (golden logits) = JAX (tests/test_hf_parity.py) = llama.cpp."""
    _llama_cpp()
    model = load_hf(GOLDEN / name)
    path = export(model, None, tmp_path / "m.gguf", "f32")
    g = np.load(GOLDEN / name / "golden.npz")
    with parity.open_llama(path) as llm:
        for row, ref in zip(g["input_ids"], g["logits"]):
            got = parity.llama_cpp_logits(llm, row.tolist())
            assert rel(ref, got) <= 1e-3


def test_tokenizer_parity_with_llama_cpp(tok, tmp_path):
    _llama_cpp()
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    path = export(make_model("AA"), tok, tmp_path / "m.gguf", chat_template=template)
    with parity.open_llama(path) as llm:
        assert llm.metadata["tokenizer.chat_template"].startswith("{% for m")
        assert (llm.token_bos(), llm.token_eos(), llm.n_vocab()) == (1, 2, 448)
        for text in TOKENIZER_CASES:
            ids = tok.encode(text)
            assert llm.tokenize(text.encode(), add_bos=False) == ids, text
            assert llm.tokenize(text.encode(), add_bos=True) == [tok.bos_id] + ids, text
            assert llm.detokenize(ids).decode("utf-8") == text, text
        assert any(8 <= i < 264 for i in tok.encode("😀"))  # the emoji really goes through byte fallback
        # Chat markup: llama.cpp's vocab loader forces a token spelled "<|end|>" to CONTROL + end-of-generation
        # (text-based auto-detection), so it is parsed only with special=True, as chat completion does.
        chat = "<|system|>Be brief.<|end|><|user|>Hello<|end|><|assistant|>Hi!<|end|>"
        ids = tok.encode(chat)
        assert ids.count(7) == 3 and ids[0] == 4
        assert llm.tokenize(chat.encode(), add_bos=False, special=True) == ids
        assert llm.detokenize(ids, special=True).decode("utf-8") == chat


def _train(model, tok, steps: int = 60):
    """A few Adam steps on the corpus so the model's predictions have real margins (random models have none)."""
    import jax
    import optax

    ids = np.asarray(tok.encode(CORPUS), np.int32)
    n = 64
    batch = np.stack([ids[i: i + n + 1] for i in range(0, 16 * n, n)])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    def loss_fn(p, x, y):
        logits = nnx.merge(graphdef, p, rest)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, o, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    x, y = jnp.asarray(batch[:, :-1]), jnp.asarray(batch[:, 1:])
    for _ in range(steps):
        params, opt, loss = step(params, opt, x, y)
    return nnx.merge(graphdef, params, rest), float(loss)


@pytest.fixture(scope="module")
def trained(tok):
    model = make_model("MAMA", seed=11, d_model=64, initializer_range=0.05, tie_embeddings=False)
    model, loss = _train(model, tok)
    assert loss < 3.0
    return model


@pytest.mark.slow
def test_quantized_parity_with_llama_cpp(tok, tmp_path, trained):
    _llama_cpp()
    ids = [tok.bos_id] + tok.encode(_EN[1] + " " + _HI[0] + " " + _EN[3])[:100]
    results = {}
    for quant in ("f16", "q8_0", "q4_0"):
        path = export(trained, tok, tmp_path / f"m-{quant}.gguf", quant)
        results[quant] = parity.compare_with_llama_cpp(trained, path, ids, n_greedy=16)
    print({q: {k: v for k, v in r.items() if not k.endswith("_tokens")} for q, r in results.items()})
    assert results["f16"]["max_rel_logit_diff"] <= 1e-2 and results["f16"]["greedy_match_tokens"] == 16
    assert results["q8_0"]["top1_agreement"] >= 0.98, results["q8_0"]
    assert results["q8_0"]["mean_kl"] < 1e-2
    assert results["q4_0"]["top1_agreement"] >= 0.7 and results["q4_0"]["mean_kl"] < 0.3


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["q4_k_m", "q6_k"])
def test_k_quant_export_loads_and_runs(tok, tmp_path, quant):
    _llama_cpp()
    # d_model 256: K-quant super-blocks are 256 wide, so llama.cpp really writes Q4_K / Q6_K rows.
    model = make_model("MA", d_model=256, head_dim=64, mamba_head_dim=64, d_ff=256, initializer_range=0.05,
                       tie_embeddings=False)
    path = export(model, tok, tmp_path / f"m-{quant}.gguf", quant)
    types = {t["type"] for t in xg.inspect(path)["tensors"]}
    assert ("Q4_K" if quant == "q4_k_m" else "Q6_K") in types
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"m-{quant}.gguf"]  # the F16 intermediate is gone
    ids = prompt_ids(tok)
    got = parity.llama_cpp_logits(path, ids)
    ref = jax_logits(model, ids)
    assert np.isfinite(got).all() and parity.logit_metrics(ref, got)["mean_kl"] < 0.05
    loaded, _ = xg.load(path)  # K-quants dequantize on the way back
    assert parity.logit_metrics(ref, jax_logits(loaded, ids))["mean_kl"] < 0.05
