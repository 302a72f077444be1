"""Generate Hugging Face golden files for the torch-free model tests.

Run (needs torch + transformers, NOT needed by the tests themselves):

    python3.11 -m venv /work/venv-golden
    /work/venv-golden/bin/pip install torch==2.13.0 transformers safetensors numpy
    /work/venv-golden/bin/python tests/golden/make_hf_goldens.py

For every tiny config below this writes tests/golden/<name>/ with
  config.json         -- from ``save_pretrained``
  model.safetensors   -- from ``save_pretrained(safe_serialization=True)``, float32
  golden.npz          -- input_ids  int32   [2, T]        (T = 37, not a multiple of the chunk size)
                         logits     float32 [2, T, V]     (HF forward, eval mode, float32, no attention_mask)
                         embeds     float32 [2, T, H]     (input to layer 0, i.e. after embedding_multiplier)
                         layer_outputs float32 [L, 2, T, H]  (output of each decoder layer, before final norm)
                         final_hidden  float32 [2, T, H]  (after the final RMSNorm, before lm_head)

``whisper_tiny/`` (``make_whisper``) is an encoder-decoder: its golden.npz holds audio, feature-extractor
features, encoder output, logits and greedy tokens instead (see README.md).

All parameters are randomized from a fixed torch seed so the logits are non-trivial.
The script re-loads every saved model with ``from_pretrained`` and checks it reproduces the logits.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import torch
import transformers
from transformers import (
    GraniteMoeHybridConfig,
    GraniteMoeHybridForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

HERE = os.path.dirname(os.path.abspath(__file__))
SEQ_LEN = 37
BATCH = 2


def granite_rope_config() -> GraniteMoeHybridConfig:
    return GraniteMoeHybridConfig(
        vocab_size=112,
        hidden_size=48,
        intermediate_size=64,  # only used by MoE experts (absent here)
        shared_intermediate_size=80,  # dense FFN width
        num_hidden_layers=4,
        layer_types=["mamba", "attention", "mamba", "mamba"],
        num_attention_heads=6,  # head_dim = 48 / 6 = 8
        num_key_value_heads=2,  # GQA, 3 query heads per kv head
        hidden_act="silu",
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        position_embedding_type="rope",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_bias=False,
        embedding_multiplier=3.0,
        attention_multiplier=0.2,
        residual_multiplier=0.4,
        logits_scaling=2.5,
        num_local_experts=0,
        num_experts_per_tok=0,
        mamba_n_heads=8,
        mamba_n_groups=1,
        mamba_d_state=16,
        mamba_d_head=12,  # 8 * 12 = 96 = 2 * 48
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_chunk_size=8,
        mamba_conv_bias=True,
        mamba_proj_bias=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def granite_nope_config() -> GraniteMoeHybridConfig:
    return GraniteMoeHybridConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        shared_intermediate_size=56,
        num_hidden_layers=4,
        layer_types=["attention", "mamba", "mamba", "attention"],
        num_attention_heads=4,  # head_dim = 8
        num_key_value_heads=1,  # MQA
        hidden_act="silu",
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        position_embedding_type="nope",
        attention_bias=False,
        embedding_multiplier=2.0,
        attention_multiplier=0.25,
        residual_multiplier=0.5,
        logits_scaling=1.0,
        num_local_experts=0,
        num_experts_per_tok=0,
        mamba_n_heads=4,
        mamba_n_groups=1,
        mamba_d_state=8,
        mamba_d_head=16,  # 4 * 16 = 64 = 2 * 32
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_chunk_size=16,
        mamba_conv_bias=True,
        mamba_proj_bias=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def qwen2_config() -> Qwen2Config:
    return Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=8,  # head_dim = 8
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        use_sliding_window=False,
    )


def qwen2_tied_config() -> Qwen2Config:
    return Qwen2Config(
        vocab_size=100,
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim = 12
        num_key_value_heads=1,
        hidden_act="silu",
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False,
    )


def mixtral_config() -> MixtralConfig:
    return MixtralConfig(
        vocab_size=120,
        hidden_size=48,
        intermediate_size=32,  # width of each expert's FFN
        num_hidden_layers=3,
        num_attention_heads=6,  # head_dim = 8
        num_key_value_heads=2,  # GQA, 3 query heads per kv head
        hidden_act="silu",
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        sliding_window=None,
        num_local_experts=8,
        num_experts_per_tok=2,
        router_jitter_noise=0.0,
        output_router_logits=False,
        router_aux_loss_coef=0.02,  # training only; never enters the logits
    )


def mixtral_sliding_config() -> MixtralConfig:
    # Mistral-style sliding-window attention: a query sees the 8 most recent keys (itself included).
    cfg = mixtral_config()
    cfg.sliding_window = 8
    return cfg


def granite_moe_config() -> GraniteMoeHybridConfig:
    # Shaped like Granite-4.0-H-Tiny (MoE FFN in every layer + always-on shared MLP, NoPE, tied),
    # shrunk: 8 experts top-2 instead of 64 top-6.
    return GraniteMoeHybridConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=24,  # width of each routed expert
        shared_intermediate_size=40,  # width of the always-on shared MLP
        num_hidden_layers=4,
        layer_types=["mamba", "attention", "mamba", "attention"],
        num_attention_heads=4,  # head_dim = 8
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        position_embedding_type="nope",
        attention_bias=False,
        embedding_multiplier=2.5,
        attention_multiplier=0.125,
        residual_multiplier=0.3,
        logits_scaling=2.0,
        num_local_experts=8,
        num_experts_per_tok=2,
        output_router_logits=False,
        router_aux_loss_coef=0.01,  # training only; never enters the logits
        mamba_n_heads=4,
        mamba_n_groups=1,
        mamba_d_state=16,
        mamba_d_head=16,  # 4 * 16 = 64 = 2 * 32
        mamba_d_conv=4,
        mamba_expand=2,
        mamba_chunk_size=16,
        mamba_conv_bias=True,
        mamba_proj_bias=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


# The seed of each model is 1234 + its index here: append new models at the end.
MODELS = {
    "granite_hybrid_rope": (GraniteMoeHybridForCausalLM, granite_rope_config),
    "granite_hybrid_nope": (GraniteMoeHybridForCausalLM, granite_nope_config),
    "qwen2": (Qwen2ForCausalLM, qwen2_config),
    "qwen2_tied": (Qwen2ForCausalLM, qwen2_tied_config),
    "mixtral": (MixtralForCausalLM, mixtral_config),
    "granite_hybrid_moe": (GraniteMoeHybridForCausalLM, granite_moe_config),
    "mixtral_sliding": (MixtralForCausalLM, mixtral_sliding_config),
}


@torch.no_grad()
def randomize_(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Overwrite every parameter with seeded random values (tied params are visited once)."""

    def randn(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    def rand(shape):
        return torch.rand(shape, generator=gen, dtype=torch.float32)

    for name, p in model.named_parameters():  # deduplicates tied parameters
        leaf = name.split(".")[-1]
        shape = p.shape
        if name.endswith("A_log"):
            # A = -exp(A_log) in [-4, -0.5]
            val = torch.log(0.5 + 3.5 * rand(shape))
        elif name.endswith("dt_bias"):
            # softplus(dt_bias) in [0.01, 0.3]; dt_bias = inverse softplus
            dt = 0.01 + 0.29 * rand(shape)
            val = torch.log(torch.expm1(dt))
        elif leaf == "D":
            val = 0.5 + rand(shape)
        elif "norm" in name and leaf == "weight":
            # RMSNorm (and the Mamba gated RMSNorm) weights
            val = 1.0 + 0.15 * randn(shape)
        elif "conv1d" in name and leaf == "weight":
            val = 0.35 * randn(shape)
        elif "conv1d" in name and leaf == "bias":
            val = 0.1 * randn(shape)
        elif "embed_tokens" in name:
            val = 0.5 * randn(shape)
        elif leaf == "bias":
            val = 0.15 * randn(shape)
        elif leaf == "weight" and p.ndim == 2:
            fan_in = shape[1]
            std = 1.0 / math.sqrt(fan_in)  # ~0.12-0.18 for these sizes
            if name.startswith("lm_head"):
                std *= 2.0
            val = std * randn(shape)
        elif leaf in ("gate_up_proj", "down_proj") and p.ndim == 3:
            # MoE experts stacked in memory as [E, out, in] (transformers 5 layout)
            val = randn(shape) / math.sqrt(shape[2])
        else:
            raise ValueError(f"unhandled parameter {name} {tuple(shape)}")
        p.copy_(val.to(p.dtype))


def capture_forward(model, input_ids):
    """Run the HF forward and capture the per-layer activations with hooks."""
    base = model.model
    rec = {"layers": []}

    def pre_hook(_mod, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        rec["embeds"] = hs.detach().clone()

    def layer_hook(_mod, _args, out):
        hs = out[0] if isinstance(out, tuple) else out
        rec["layers"].append(hs.detach().clone())

    def norm_hook(_mod, _args, out):
        rec["final"] = out.detach().clone()

    def router_hook(_mod, _args, out):  # MoE routers return (router_logits, top_k_weights, top_k_index)
        rec.setdefault("router", []).append(tuple(t.detach().clone() for t in out))

    handles = [base.layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
    handles += [layer.register_forward_hook(layer_hook) for layer in base.layers]
    handles.append(base.norm.register_forward_hook(norm_hook))
    handles += [m.register_forward_hook(router_hook) for m in base.modules() if type(m).__name__.endswith("TopKRouter")]
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out.logits, rec


def routing_stats(router_outs, n_experts: int, top_k: int) -> list[dict]:
    """Per MoE layer: how many of the B*T tokens picked each expert, and how decisive the routing was."""
    stats = []
    for logits, weights, index in router_outs:
        top = logits.float().sort(dim=-1, descending=True).values
        stats.append(
            {
                "load": torch.bincount(index.reshape(-1), minlength=n_experts).tolist(),
                "distinct_topk_sets": len({tuple(sorted(r)) for r in index.tolist()}),
                # gap between the k-th and (k+1)-th router logit: how far routing is from a tie
                "min_margin": float((top[:, top_k - 1] - top[:, top_k]).min()),
                "top1_weight_range": [float(weights[:, 0].min()), float(weights[:, 0].max())],
            }
        )
    return stats


def make_one(name: str, seed: int) -> dict:
    cls, cfg_fn = MODELS[name]
    torch.manual_seed(seed)
    config = cfg_fn()
    model = cls(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    randomize_(model, gen)

    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "weights not tied"
    else:
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()

    input_ids = torch.randint(0, config.vocab_size, (BATCH, SEQ_LEN), generator=gen, dtype=torch.int64)
    logits, rec = capture_forward(model, input_ids)
    assert logits.dtype == torch.float32 and logits.shape == (BATCH, SEQ_LEN, config.vocab_size)
    assert torch.isfinite(logits).all()

    out_dir = os.path.join(HERE, name)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    # keep the directory minimal: config.json + model.safetensors (+ golden.npz)
    for extra in ("generation_config.json",):
        path = os.path.join(out_dir, extra)
        if os.path.exists(path):
            os.remove(path)

    for f in os.listdir(out_dir):  # safetensors writes 0600; make the files world-readable
        os.chmod(os.path.join(out_dir, f), 0o644)

    np.savez(
        os.path.join(out_dir, "golden.npz"),
        input_ids=input_ids.numpy().astype(np.int32),
        logits=logits.numpy().astype(np.float32),
        embeds=rec["embeds"].numpy().astype(np.float32),
        layer_outputs=torch.stack(rec["layers"]).numpy().astype(np.float32),
        final_hidden=rec["final"].numpy().astype(np.float32),
    )

    # Round trip: the saved files alone must reproduce the logits.
    reloaded = cls.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits2 = reloaded(input_ids=input_ids, use_cache=False).logits
    err = (logits2 - logits).abs().max().item()
    assert err == 0.0, f"{name}: reloaded model differs by {err}"

    # eager vs sdpa attention agree (sanity; golden uses the default implementation)
    eager = cls.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits3 = eager(input_ids=input_ids, use_cache=False).logits
    err_eager = (logits3 - logits).abs().max().item()
    assert err_eager < 1e-4, f"{name}: eager vs default attention differ by {err_eager}"

    info = {}
    if getattr(config, "num_local_experts", 0):
        # the default experts implementation ("grouped_mm") against the per-expert loop ("eager")
        eager_moe = cls.from_pretrained(out_dir, dtype=torch.float32, experts_implementation="eager").eval()
        with torch.no_grad():
            logits4 = eager_moe(input_ids=input_ids, use_cache=False).logits
        info["experts_impl"] = model.config._experts_implementation
        info["eager_experts_vs_default_maxdiff"] = (logits4 - logits).abs().max().item()
        assert info["eager_experts_vs_default_maxdiff"] < 1e-4, f"{name}: experts implementations differ"
        info["routing"] = routing_stats(rec["router"], config.num_local_experts, config.num_experts_per_tok)

    return {
        "name": name,
        "attn_impl": model.config._attn_implementation,
        **info,
        "logits_std": float(logits.std()),
        "logits_absmax": float(logits.abs().max()),
        "eager_vs_default_maxdiff": err_eager,
        "files": {f: os.path.getsize(os.path.join(out_dir, f)) for f in sorted(os.listdir(out_dir))},
    }


# --- Whisper (encoder-decoder ASR): its own maker, seeded after the causal LMs above -------------------------

WHISPER_SEED = 1234 + 100
# Special tokens of the tiny vocabulary (real Whisper: eot 50257, sot 50258, <|hi|> 50276, transcribe 50359,
# translate 50358, notimestamps 50363).
W_EOT, W_SOT, W_HI, W_TRANSCRIBE, W_NOTIMESTAMPS, W_TRANSLATE = 100, 101, 102, 103, 104, 105
W_PREFIX = [W_SOT, W_HI, W_TRANSCRIBE, W_NOTIMESTAMPS]
W_MAX_NEW = 16
W_SUPPRESS = [18, 42]  # suppressed at every step (Whisper's suppress_tokens); 18 is greedy's choice in row 0
W_BEGIN_SUPPRESS = [W_EOT, 8]  # suppressed at the first generated step (begin_suppress_tokens); 8 is greedy's


def whisper_config() -> WhisperConfig:
    return WhisperConfig(
        vocab_size=108,
        num_mel_bins=80,
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=4,  # head_dim 8
        decoder_layers=2,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=48,
        max_source_positions=50,  # 100 mel frames = a 1 s window (chunk_length=1)
        max_target_positions=32,
        activation_function="gelu",
        scale_embedding=False,
        pad_token_id=W_EOT,
        bos_token_id=W_EOT,
        eos_token_id=W_EOT,
        decoder_start_token_id=W_SOT,
        begin_suppress_tokens=None,
        suppress_tokens=None,
        tie_word_embeddings=True,
    )


def whisper_audio(gen: torch.Generator) -> list[np.ndarray]:
    """Two clips at 16 kHz: 1.0 s of noise with a chirp (fills the 1 s window), and 0.6 s of quieter noise with a
    tone (padded by the feature extractor)."""
    t = np.arange(16000) / 16000.0
    a = 0.3 * torch.randn(16000, generator=gen).numpy() + 0.5 * np.sin(2 * np.pi * (200 + 1500 * t) * t)
    t2 = np.arange(9600) / 16000.0
    b = 0.05 * torch.randn(9600, generator=gen).numpy() + 0.2 * np.sin(2 * np.pi * 440 * t2)
    return [a.astype(np.float32), b.astype(np.float32)]


def make_whisper(name: str = "whisper_tiny", seed: int = WHISPER_SEED) -> dict:
    """tests/golden/whisper_tiny/: a tiny random WhisperForConditionalGeneration, its feature extractor's
    features of two clips, encoder output, logits for the forced prefix plus random tokens, and greedy tokens."""
    torch.manual_seed(seed)
    config = whisper_config()
    model = WhisperForConditionalGeneration(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():  # deduplicates the tied proj_out
            leaf = pname.split(".")[-1]
            if pname == "model.encoder.embed_positions.weight":
                continue  # the fixed sinusoids (WhisperPreTrainedModel._init_weights); never trained
            # Scales chosen so greedy decoding is not one repeated token: token embeddings of equal norm (no
            # token favoured by the tied output head), large learned positions, small biases.
            if "layer_norm" in pname:
                val = (1.0 + 0.15 * torch.randn(p.shape, generator=gen)) if leaf == "weight" else \
                    0.05 * torch.randn(p.shape, generator=gen)
            elif leaf == "bias":
                val = 0.05 * torch.randn(p.shape, generator=gen)
            elif "conv" in pname:  # [out, in, 3]
                val = torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1] * p.shape[2])
            elif "embed_tokens" in pname:  # rows of norm 0.5 * sqrt(d_model)
                val = torch.randn(p.shape, generator=gen)
                val = 0.5 * math.sqrt(p.shape[1]) * val / val.norm(dim=1, keepdim=True)
            elif "embed_positions" in pname:  # decoder's learned positions
                val = 2.0 * torch.randn(p.shape, generator=gen)
            elif p.ndim == 2:
                val = torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1])
            else:
                raise ValueError(f"unhandled parameter {pname} {tuple(p.shape)}")
            p.copy_(val)
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr(), "not tied"
    assert model.model.encoder.layers[0].self_attn.k_proj.bias is None

    audio = whisper_audio(gen)
    fe1 = WhisperFeatureExtractor(feature_size=80, chunk_length=1)  # the model's 1 s window
    feats = fe1(audio, sampling_rate=16000, return_tensors="np").input_features.astype(np.float32)
    feats_np = np.stack([fe1._np_extract_fbank_features(np.pad(x, (0, 16000 - len(x)))[None], "cpu")[0]
                         for x in audio]).astype(np.float32)
    # The default 30 s window (80 bins; first 110 frames, past the end of the 1 s clip) and a 5 s window with
    # 128 bins (large-v3's; first 60 frames).
    mel80_30s = WhisperFeatureExtractor()(audio, sampling_rate=16000, return_tensors="np").input_features
    mel128_5s = WhisperFeatureExtractor(feature_size=128, chunk_length=5)(
        audio, sampling_rate=16000, return_tensors="np").input_features
    assert feats.shape == (2, 80, 100) and mel80_30s.shape == (2, 80, 3000) and mel128_5s.shape == (2, 128, 500)

    x = torch.from_numpy(feats)
    dec_ids = torch.cat([torch.tensor([W_PREFIX] * 2),
                         torch.randint(0, W_EOT, (2, 9), generator=gen)], dim=1)  # [2, 13]
    with torch.no_grad():
        out = model(input_features=x, decoder_input_ids=dec_ids, use_cache=False)
        enc = model.model.encoder(x).last_hidden_state
    logits = out.logits
    assert torch.isfinite(logits).all() and logits.shape == (2, 13, config.vocab_size)

    # Greedy: plain GenerationMixin.generate with the forced prefix as decoder_input_ids (no logit processors).
    from transformers import GenerationConfig, GenerationMixin
    gc = GenerationConfig(max_new_tokens=W_MAX_NEW, do_sample=False, num_beams=1, eos_token_id=W_EOT,
                          pad_token_id=W_EOT, decoder_start_token_id=W_SOT)
    prefix = torch.tensor([W_PREFIX] * 2)
    with torch.no_grad():
        greedy = GenerationMixin.generate(model, input_features=x, decoder_input_ids=prefix, generation_config=gc)
    # Whisper's own generate: language="hi", task="transcribe", no timestamps, with suppress lists.
    wgc = GenerationConfig(max_new_tokens=W_MAX_NEW, do_sample=False, num_beams=1, eos_token_id=W_EOT,
                           pad_token_id=W_EOT, decoder_start_token_id=W_SOT, bos_token_id=W_EOT,
                           suppress_tokens=W_SUPPRESS, begin_suppress_tokens=W_BEGIN_SUPPRESS)
    wgc.lang_to_id = {"<|hi|>": W_HI}
    wgc.task_to_id = {"transcribe": W_TRANSCRIBE, "translate": W_TRANSLATE}
    wgc.no_timestamps_token_id = W_NOTIMESTAMPS
    wgc.is_multilingual = True
    model.generation_config = wgc
    with torch.no_grad():
        wout = model.generate(x, language="hi", task="transcribe", return_timestamps=False,
                              max_new_tokens=W_MAX_NEW)
    wseq = wout.sequences if hasattr(wout, "sequences") else wout

    out_dir = os.path.join(HERE, name)
    os.makedirs(out_dir, exist_ok=True)
    model.generation_config = GenerationConfig(decoder_start_token_id=W_SOT, eos_token_id=W_EOT)
    model.save_pretrained(out_dir, safe_serialization=True)
    for extra in ("generation_config.json",):
        path = os.path.join(out_dir, extra)
        if os.path.exists(path):
            os.remove(path)
    for f in os.listdir(out_dir):
        os.chmod(os.path.join(out_dir, f), 0o644)
    np.savez(
        os.path.join(out_dir, "golden.npz"),
        audio0=audio[0], audio1=audio[1],
        input_features=feats,
        mel80_30s_head=mel80_30s[:, :, :110].astype(np.float32),
        mel128_5s_head=mel128_5s[:, :, :60].astype(np.float32),
        decoder_input_ids=dec_ids.numpy().astype(np.int32),
        logits=logits.numpy().astype(np.float32),
        encoder_output=enc.numpy().astype(np.float32),
        prefix=np.asarray(W_PREFIX, np.int32),
        greedy_tokens=greedy.numpy().astype(np.int32),
        whisper_generate_tokens=wseq.numpy().astype(np.int32),
        suppress_tokens=np.asarray(W_SUPPRESS, np.int32),
        begin_suppress_tokens=np.asarray(W_BEGIN_SUPPRESS, np.int32),
    )
    reloaded = WhisperForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        err = (reloaded(input_features=x, decoder_input_ids=dec_ids, use_cache=False).logits - logits).abs().max()
    assert err.item() == 0.0, f"{name}: reloaded model differs by {err.item()}"
    eager = WhisperForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    with torch.no_grad():
        err_eager = (eager(input_features=x, decoder_input_ids=dec_ids, use_cache=False).logits - logits).abs().max()
    assert err_eager.item() < 1e-4
    return {
        "name": name, "attn_impl": model.config._attn_implementation,
        "logits_std": float(logits.std()), "logits_absmax": float(logits.abs().max()),
        "encoder_absmax": float(enc.abs().max()), "eager_vs_default_maxdiff": err_eager.item(),
        "features_torch_vs_numpy_maxdiff": float(np.abs(feats - feats_np).max()),
        "greedy": greedy.tolist(), "whisper_generate": wseq.tolist(),
        "files": {f: os.path.getsize(os.path.join(out_dir, f)) for f in sorted(os.listdir(out_dir))},
    }


def main(argv: list[str]) -> None:
    names = argv or list(MODELS) + ["whisper_tiny"]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")
    torch.use_deterministic_algorithms(True)
    for i, name in enumerate(MODELS):
        if name not in names:
            continue
        info = make_one(name, seed=1234 + i)
        print(json.dumps(info))
    if "whisper_tiny" in names:
        print(json.dumps(make_whisper()))


if __name__ == "__main__":
    main(sys.argv[1:])
