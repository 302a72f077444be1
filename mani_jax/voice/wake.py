"""Wake word "हे वाणी" (hey VAANI): a small JAX keyword spotter trained here on espeak-ng speech, plus a streaming
detector over 10 ms frames that emits :class:`wyoming.wake.Detection`.

Everything about its accuracy is measured on **synthetic (espeak-ng) audio**: espeak-ng is the only offline Hindi
voice we have, so positives are the wake phrase spoken by espeak-ng voice variants at several speeds and pitches
with added noise, and negatives are other Hindi sentences from the same synthesiser. Numbers on real microphones
will differ; train on recordings when some exist.

Pieces (shapes are ``[batch, time, features]``, float32 throughout):

* Front end :func:`wake_features`: 16 kHz mono float32 -> ``[frames, 40]`` log-mel, 25 ms Hann window (400
  samples), 10 ms hop (160 samples), frames *not* centred (frame ``t`` covers samples ``[160 t, 160 t + 400)``),
  Slaney mel filter bank from :func:`mani_jax.models.whisper.mel_filters` (40 bands, 0-8 kHz), then
  ``(log10(mel + 1e-8) + FEAT_OFFSET) / FEAT_SCALE``. numpy, deterministic, no per-clip normalisation (so a
  stream can compute it frame by frame: :class:`WakeFeatureStream`).
* Model :class:`WakeNet` (Flax NNX, 32,833 float32 parameters, 140 kB .npz): a 1-D DS-CNN over a 170-frame
  (1.71 s) window -- a strided
  temporal conv stem then depthwise-separable conv blocks (depthwise temporal conv + pointwise conv, LayerNorm,
  ReLU), mean+max pooling over time, one logit. The depthwise-separable CNN keyword spotter is from "Hello Edge:
  Keyword Spotting on Microcontrollers" (Zhang et al., 2017, arXiv:1711.07128), here with 1-D (temporal)
  convolutions over mel bands as channels. The window covers the phrase at the slowest held-out speed (110 wpm:
  at most 1.48 s of speech for the held-out variants; training clips longer than the window are dropped).
* Data :func:`synth_wake_dataset` and training :func:`train_wake_model` (optax AdamW, class-balanced batches,
  jitted step, noise/gain/shift augmentation drawn fresh for every batch).
* Streaming :class:`WakeWordDetector`: ``process(frame_10ms)`` -> ``Detection | None``, scores the last window every
  ``score_every`` frames (50 ms) with one jitted fixed-shape call, K-of-N smoothing, refractory period.
* Evaluation :func:`evaluate_wake`: false-reject rate on held-out voices/speeds, false accepts per hour on a long
  synthetic negative stream, threshold sweep. openWakeWord's published targets are < 0.5 false accepts per hour and
  < 5% false rejects (github.com/dscripka/openWakeWord, README "Performance"); we report what we measure.

Voice variants and speeds are split into TRAIN and HELD-OUT sets (:data:`TRAIN_VARIANTS`, :data:`HELDOUT_VARIANTS`,
:data:`TRAIN_SPEEDS`, :data:`HELDOUT_SPEEDS`); the negative sentences are split too (:data:`TRAIN_SENTENCES`,
:data:`HELDOUT_SENTENCES`). Benchmarks of later stages synthesise their commands with the held-out ones.

The shipped weights ``assets/wake_hey_vaani.npz`` were produced by
``python -m mani_jax.voice.wake train --out mani_jax/voice/assets/wake_hey_vaani.npz`` (defaults: see
:func:`train_wake_model`; the sidecar ``wake_hey_vaani.json`` records the config, command, time and metrics):
622 s wall on a 2-core CPU shared with other jobs (load ~5; 62 s of it first-time espeak-ng synthesis), held-out
window AUC 0.998. Held-out result at the detector defaults (synthetic espeak-ng audio): 6.2% FRR on 160 clips,
18 false accepts/hour (3 in 10 minutes) -- well short of openWakeWord's < 0.5 FA/h target.

CLI: ``python -m mani_jax.voice.wake train --out PATH [--steps N] [--seed S]`` and
``python -m mani_jax.voice.wake eval [--model PATH] [--minutes M] [--json PATH]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import os
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from wyoming.wake import Detection

from .audio import FRAME_SAMPLES, SAMPLE_RATE, write_atomic

WAKE_PHRASE = "हे वाणी"
WAKE_NAME = "hey_vaani"
DEFAULT_MODEL_PATH = Path(__file__).parent / "assets" / "wake_hey_vaani.npz"

# ------------------------------------------------------------------------------------------- splits

#: espeak-ng variants NOT used for training (20 of the 101 in espeak-ng 1.51): male, female, whispered, klatt and
#: robotic voices. Benchmarks synthesise their test audio with these.
HELDOUT_VARIANTS: tuple[str, ...] = (
    "Alicia", "Annie", "benjamin", "croak", "Denis", "edward2", "f3", "grandma", "iven3", "klatt4",
    "linda", "m5", "m8", "Mario", "norbert", "quincy", "robosoft4", "steph2", "travis", "whisperf")
#: The other 81 variants (espeak-ng 1.51 ``--voices=variant``), used for training.
TRAIN_VARIANTS: tuple[str, ...] = (
    "adam", "Alex", "Andrea", "Andy", "antonio", "aunty", "belinda", "boris", "caleb", "david", "Demonic",
    "Diogo", "ed", "edward", "Gene", "Gene2", "gustave", "announcer", "Henrique", "Hugo", "iven", "iven2", "iven4",
    "Jacky", "john", "kaukovalta", "Lee", "marcelo", "Marco", "max", "Michael", "michel", "miguel", "Mike", "Mr",
    "Nguyen", "pablo", "paul", "pedro", "RicishayMax", "RicishayMax2", "RicishayMax3", "rob", "robert",
    "robosoft", "robosoft2", "robosoft3", "robosoft5", "robosoft6", "robosoft7", "robosoft8", "steph", "steph3",
    "Storm", "Tweaky", "UniRobot", "zac", "anika", "anikaRobot", "AnxiousAndy", "fast", "f2", "f4", "f5",
    "whisper", "klatt", "klatt2", "klatt3", "klatt5", "klatt6", "m2", "m3", "m4", "m6", "m7", "sandro", "shelby",
    "victor", "f1", "m1", "grandpa")
#: Speeds (words per minute) used for training positives and negatives.
TRAIN_SPEEDS: tuple[int, ...] = (120, 130, 150, 160, 180, 190, 200)
#: Speeds never used in training: two outside the training range (110, 210) and two between training speeds.
HELDOUT_SPEEDS: tuple[int, ...] = (110, 140, 170, 210)
#: espeak-ng pitch range (0..99 scale) drawn uniformly for training and evaluation (pitch is not held out).
PITCH_RANGE: tuple[int, int] = (20, 80)
#: Additive-noise signal-to-noise ratios (dB) for training and evaluation.
SNR_RANGE_DB: tuple[float, float] = (5.0, 20.0)
NOISE_KINDS: tuple[str, ...] = ("white", "pink", "brown", "babble")

#: Near misses: words and phrases that sound like parts of the wake phrase (negatives). Split train/held-out.
TRAIN_NEAR_MISSES: tuple[str, ...] = (
    "हे भगवान", "पानी", "वाणिज्य", "रानी", "हे", "वाणी", "हे राम", "हे रानी", "वाणी जी कहाँ हैं", "हेलो",
    "वाह भाई", "हे प्रभु", "बानी", "पानी दो", "कहानी", "वीणा", "हे मेरे दोस्त", "हाँ जी", "देवनागरी लिपि",
    "दीवानी", "हे सखी", "मेहरबानी", "हे मित्र", "हे बच्चों", "हे सुनो", "हे भाई", "मीठी वाणी", "आकाशवाणी",
    "भविष्यवाणी", "ओ रानी", "हे पापा", "वाणी कपूर", "है वो", "हे प्रिय", "जवानी", "हवा नहीं", "हेमा मालिनी")
HELDOUT_NEAR_MISSES: tuple[str, ...] = (
    "हे ईश्वर", "वाणिज्य मंत्रालय", "ठंडा पानी", "महारानी", "हे दोस्तों", "नादानी", "परेशानी", "हे माँ",
    "वाणी मधुर है", "निशानी")

#: Everyday Hindi sentences and commands (negatives), split train/held-out by position.
_SENTENCES: tuple[str, ...] = (
    "आज मौसम कैसा है", "कल सुबह सात बजे का अलार्म लगाओ", "बत्ती बंद कर दो", "पंखा चालू करो",
    "मुझे एक गाना सुनाओ", "अभी कितने बजे हैं", "दस मिनट का टाइमर लगाओ", "आज कौन सी तारीख है",
    "पच्चीस में सात जोड़ो", "सौ किलोमीटर कितने मील होते हैं", "मेरे लिए एक नोट लिखो", "दूध खरीदना याद दिलाना",
    "आवाज़ थोड़ी कम करो", "आवाज़ बढ़ाओ", "अगला गाना चलाओ", "गाना रोक दो", "दिल्ली में बारिश होगी क्या",
    "मुंबई का तापमान बताओ", "मैं बाज़ार जा रहा हूँ", "खाना तैयार है", "बच्चे स्कूल गए हैं",
    "चाय बना दो", "आज बहुत गर्मी है", "कल छुट्टी है", "मेरा फ़ोन कहाँ है", "दरवाज़ा बंद करो",
    "माँ ने खाना बनाया है", "ट्रेन कितने बजे आएगी", "बस स्टॉप कितनी दूर है", "मुझे नींद आ रही है",
    "आज का समाचार सुनाओ", "क्रिकेट मैच का स्कोर क्या है", "एक चुटकुला सुनाओ", "बारह गुणा बारह कितना होता है",
    "पाँच किलो कितने पाउंड होते हैं", "टाइमर रद्द करो", "मेरे नोट्स पढ़ो", "रसोई की बत्ती जलाओ",
    "एसी का तापमान कम करो", "खिड़की खोल दो", "मैं थोड़ी देर में आता हूँ", "आपका नाम क्या है",
    "यह किताब बहुत अच्छी है", "हम कल पहाड़ों पर जाएंगे", "उसने मुझे फ़ोन किया था", "बाहर बहुत ठंड है",
    "सब्ज़ी मंडी बंद है", "पापा दफ़्तर से लौट आए", "रात को जल्दी सोना चाहिए", "सुबह की सैर अच्छी होती है",
    "मेरी दवाई का समय हो गया", "डॉक्टर से मिलने जाना है", "गाड़ी में पेट्रोल डलवाना है", "बिजली चली गई",
    "इंटरनेट बहुत धीमा है", "कंप्यूटर बंद कर दो", "हिंदी में बात करो", "धन्यवाद बहुत अच्छा लगा",
    "कोई बात नहीं", "ठीक है चलो", "नमस्ते आप कैसे हैं", "मैं ठीक हूँ", "शुभ रात्रि", "सुप्रभात",
    "कल मिलते हैं", "जन्मदिन मुबारक हो", "दिवाली की शुभकामनाएं", "होली कब है", "रविवार को क्या करें",
    "बीस प्रतिशत छूट कितनी हुई", "आधा लीटर दूध लाओ", "चावल पकने में कितना समय लगेगा", "मुझे भूख लगी है",
    "पानी की बोतल कहाँ रखी है", "कमरे की सफ़ाई करनी है", "कपड़े धोने हैं", "बगीचे में फूल खिले हैं",
    "आसमान में बादल हैं", "तेज़ हवा चल रही है", "बारिश रुक गई", "पुस्तकालय कब खुलता है", "परीक्षा अगले हफ़्ते है",
    "गणित का सवाल हल करो", "विज्ञान बहुत रोचक है", "भारत की राजधानी दिल्ली है", "गंगा बहुत लंबी नदी है",
    "हिमालय सबसे ऊँचा पर्वत है", "मेरा पसंदीदा रंग नीला है", "बिल्ली सो रही है", "कुत्ता भौंक रहा है",
    "चिड़िया गा रही है", "आम बहुत मीठा है", "सेब लाल है", "दाल में नमक कम है", "रोटी गरम है",
    "एक कप कॉफ़ी चाहिए", "दुकान कितने बजे बंद होती है", "अस्पताल का नंबर बताओ", "मौसम साफ़ रहेगा",
    "अगले हफ़्ते का मौसम बताओ", "तीन बजे की मीटिंग याद दिलाना", "संगीत धीमा करो", "रेडियो चलाओ",
    "टीवी बंद करो", "फ़िल्म शुरू करो", "बैटरी कितनी बची है", "स्क्रीन की रोशनी कम करो",
    "दो सौ रुपये का हिसाब लगाओ", "एक घंटे बाद याद दिलाना", "कल की बैठक रद्द हो गई", "सड़क पर बहुत ट्रैफ़िक है",
    "हमें समय पर पहुँचना है", "बच्चों को पार्क ले चलो", "दादी कहानी सुना रही हैं", "खेल का मैदान बड़ा है",
    "नया साल मुबारक हो", "आज शाम को मेहमान आएंगे", "गरम पानी चाहिए", "छत पर धूप है",
    "यह रास्ता कहाँ जाता है", "स्टेशन जाने में कितना समय लगेगा", "मुझे हिंदी गाने पसंद हैं",
    "धीरे धीरे बोलो", "फिर से बोलो", "मैं समझा नहीं",
)
TRAIN_SENTENCES: tuple[str, ...] = tuple(s for i, s in enumerate(_SENTENCES) if i % 5 != 4) + TRAIN_NEAR_MISSES
HELDOUT_SENTENCES: tuple[str, ...] = tuple(s for i, s in enumerate(_SENTENCES) if i % 5 == 4) + HELDOUT_NEAR_MISSES

SYNTHETIC_LABEL = "synthetic (espeak-ng)"

# ------------------------------------------------------------------------------------------- front end

N_MELS = 40
N_FFT = 400  # 25 ms at 16 kHz
HOP = FRAME_SAMPLES  # 160 = 10 ms
FEAT_OFFSET = 5.0
FEAT_SCALE = 3.0
_LOG_EPS = 1e-8


@functools.cache
def _mel_bank() -> np.ndarray:
    from mani_jax.models.whisper import mel_filters

    return np.ascontiguousarray(mel_filters(N_MELS, sampling_rate=SAMPLE_RATE, n_fft=N_FFT).T)  # [201, 40]


@functools.cache
def _hann() -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)  # periodic Hann


def _frames_to_features(frames: np.ndarray) -> np.ndarray:
    spec = np.fft.rfft(frames * _hann(), axis=-1)
    power = (spec.real ** 2 + spec.imag ** 2).astype(np.float32)
    mel = power @ _mel_bank()
    return ((np.log10(mel + _LOG_EPS) + FEAT_OFFSET) / FEAT_SCALE).astype(np.float32)


def wake_features(audio16k: np.ndarray) -> np.ndarray:
    """16 kHz mono audio -> wake-word log-mel features ``[frames, 40]`` float32.

    ``frames = 1 + (n - 400) // 160`` for ``n >= 400`` samples (0 frames for shorter input): frame ``t`` is
    samples ``[160 t, 160 t + 400)`` (25 ms, periodic Hann window, not centred), power spectrum, 40 Slaney mel bands
    over 0-8 kHz (:func:`mani_jax.models.whisper.mel_filters` with ``n_fft=400``), then
    ``(log10(mel + 1e-8) + 5) / 3`` (digital silence -> -1, speech at normal level ~0.5..1.5). Deterministic numpy;
    no per-clip normalisation, so streaming (:class:`WakeFeatureStream`) gives the same numbers frame by frame.

    Args:
      audio16k: 1-D float array, 16 kHz, in [-1, 1].
    Raises:
      ValueError: not 1-D or not a float array.
    """
    a = np.asarray(audio16k)
    if a.ndim != 1:
        raise ValueError(f"audio16k: expected 1-D 16 kHz mono audio, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"audio16k: expected float samples in [-1, 1], got dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if len(a) < N_FFT:
        return np.zeros((0, N_MELS), np.float32)
    n = 1 + (len(a) - N_FFT) // HOP
    frames = np.lib.stride_tricks.sliding_window_view(a, N_FFT)[::HOP][:n]
    return _frames_to_features(frames)


@functools.cache
def silence_feature() -> np.ndarray:
    """The feature vector ``[40]`` of digital silence (what a stream's window holds before audio arrives)."""
    return wake_features(np.zeros(N_FFT, np.float32))[0]


class WakeFeatureStream:
    """Frame-by-frame :func:`wake_features`: ``push(frame)`` of 160 samples -> one ``[40]`` feature row.

    The analysis buffer starts as 240 zeros, so the stream's features equal ``wake_features`` of the audio
    left-padded with 240 zero samples (:func:`stream_features`).
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self._buf = np.zeros(N_FFT, np.float32)

    def push(self, frame: np.ndarray) -> np.ndarray:
        self._buf = np.concatenate([self._buf[HOP:], frame.astype(np.float32, copy=False)])
        return _frames_to_features(self._buf[None])[0]


def stream_features(audio16k: np.ndarray) -> np.ndarray:
    """Features ``[n // 160, 40]`` exactly as :class:`WakeFeatureStream` yields them for ``audio16k`` cut into
    10 ms frames (a trailing partial frame is dropped)."""
    a = np.asarray(audio16k, np.float32)
    a = a[: len(a) // HOP * HOP]
    return wake_features(np.concatenate([np.zeros(N_FFT - HOP, np.float32), a]))


# ------------------------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class WakeConfig:
    """Shape of a :class:`WakeNet` (saved as JSON with the weights).

    ``window_frames`` 10 ms feature frames per scored window (170 = 1.71 s of audio); ``channels`` width of every
    conv; ``stem_kernel``/``stem_stride`` the first temporal conv; ``block_strides`` one depthwise-separable block
    per entry (its stride); ``dw_kernel`` depthwise temporal kernel; ``phrase`` the wake phrase it was trained on.
    """

    n_mels: int = N_MELS
    window_frames: int = 170
    channels: int = 64
    stem_kernel: int = 5
    stem_stride: int = 2
    block_strides: tuple[int, ...] = (1, 2, 1, 2)
    dw_kernel: int = 9
    phrase: str = WAKE_PHRASE
    name: str = WAKE_NAME

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["block_strides"] = list(self.block_strides)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "WakeConfig":
        d = dict(d)
        d["block_strides"] = tuple(d["block_strides"])
        return cls(**d)


class _DSBlock(nnx.Module):
    def __init__(self, ch: int, kernel: int, stride: int, *, rngs: nnx.Rngs):
        self.dw = nnx.Conv(ch, ch, kernel_size=(kernel,), strides=(stride,), feature_group_count=ch, padding="SAME",
                           rngs=rngs)
        self.pw = nnx.Conv(ch, ch, kernel_size=(1,), rngs=rngs)
        self.norm = nnx.LayerNorm(ch, rngs=rngs)
        self.stride = stride

    def __call__(self, x):
        y = jax.nn.relu(self.norm(self.pw(self.dw(x))))
        return y + (x[:, ::self.stride] if self.stride > 1 else x)


class WakeNet(nnx.Module):
    """1-D DS-CNN keyword spotter (after Zhang et al. 2017, "Hello Edge", arXiv:1711.07128).

    ``__call__(x)``: ``x`` float32 ``[batch, window_frames, n_mels]`` (:func:`wake_features` rows) -> wake logits
    float32 ``[batch]`` (``sigmoid`` gives the probability that the window holds the whole wake phrase).
    Layers: Conv1d(n_mels -> C, k=5, stride 2) + LayerNorm + ReLU; per ``block_strides`` entry a residual
    depthwise-separable block (depthwise Conv1d k=9 with that stride, pointwise Conv1d, LayerNorm, ReLU); mean and
    max pooling over time, concatenated; Linear(2C -> 1). 32,833 parameters with the defaults.
    """

    def __init__(self, cfg: WakeConfig = WakeConfig(), *, rngs: nnx.Rngs):
        self.cfg = cfg
        c = cfg.channels
        self.stem = nnx.Conv(cfg.n_mels, c, kernel_size=(cfg.stem_kernel,), strides=(cfg.stem_stride,),
                             padding="SAME", rngs=rngs)
        self.stem_norm = nnx.LayerNorm(c, rngs=rngs)
        self.blocks = nnx.List([_DSBlock(c, cfg.dw_kernel, s, rngs=rngs) for s in cfg.block_strides])
        self.head = nnx.Linear(2 * c, 1, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.stem_norm(self.stem(x)))
        for b in self.blocks:
            h = b(h)
        pooled = jnp.concatenate([h.mean(axis=1), h.max(axis=1)], axis=-1)
        return self.head(pooled)[:, 0]


def param_count(model: WakeNet) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


@functools.cache
def _apply_fn(graphdef):
    @jax.jit
    def apply(params, x):
        return jax.nn.sigmoid(nnx.merge(graphdef, params)(x))
    return apply


def wake_probs(model: WakeNet, windows: np.ndarray, *, batch: int = 512) -> np.ndarray:
    """Wake probabilities float32 ``[n]`` for feature windows ``[n, window_frames, n_mels]`` (jitted, in chunks of
    ``batch``; a short chunk is zero-padded to a power of two >= 8, so only a few shapes are ever compiled)."""
    graphdef, params = nnx.split(model)
    apply = _apply_fn(graphdef)
    out = []
    for i in range(0, len(windows), batch):
        w = np.asarray(windows[i:i + batch], np.float32)
        n = len(w)
        size = batch if n == batch else max(8, 1 << (n - 1).bit_length())
        if size != n:
            w = np.concatenate([w, np.zeros((size - n,) + w.shape[1:], np.float32)])
        out.append(np.asarray(apply(params, w))[:n])
    return np.concatenate(out) if out else np.zeros(0, np.float32)


# ------------------------------------------------------------------------------------------- save / load


def save_wake_model(model: WakeNet, path: str | Path, *, meta: dict | None = None) -> Path:
    """Write ``model`` to ``path`` (.npz: float32 parameters keyed by their NNX path plus ``__config__``, the
    :class:`WakeConfig` as JSON) and a sidecar ``path.with_suffix('.json')`` (config + ``meta``). Both are written
    to a temporary file in the same directory and renamed into place, so an error never leaves a partial file."""
    path = Path(path)
    flat = {"/".join(str(k) for k in key): np.asarray(v.get_value() if hasattr(v, "get_value") else v.value)
            for key, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    cfg_json = json.dumps(model.cfg.to_json(), ensure_ascii=False)
    buf = io.BytesIO()
    np.savez(buf, __config__=np.frombuffer(cfg_json.encode(), np.uint8), **flat)
    write_atomic(path, buf.getvalue())
    side = {"config": model.cfg.to_json(), "params": param_count(model), "data": SYNTHETIC_LABEL, **(meta or {})}
    write_atomic(path.with_suffix(".json"), json.dumps(side, ensure_ascii=False, indent=1).encode())
    return path


def load_wake_model(path: str | Path | None = None) -> WakeNet:
    """Load a :class:`WakeNet` saved by :func:`save_wake_model`; ``None`` loads the shipped
    ``mani_jax/voice/assets/wake_hey_vaani.npz``. Raises ``FileNotFoundError`` / ``ValueError`` (bad file)."""
    path = Path(path) if path is not None else DEFAULT_MODEL_PATH
    with np.load(path) as z:
        if "__config__" not in z:
            raise ValueError(f"{path}: not a wake model (no __config__ entry)")
        cfg = WakeConfig.from_json(json.loads(bytes(z["__config__"]).decode()))
        arrays = {k: z[k] for k in z.files if k != "__config__"}
    model = WakeNet(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(state)
    missing = [k for k, _ in flat if "/".join(map(str, k)) not in arrays]
    if missing or len(arrays) != len(list(flat)):
        raise ValueError(f"{path}: parameters do not match WakeNet({cfg}); missing {missing[:3]}")
    for key, var in flat:
        a = arrays["/".join(map(str, key))]
        if a.shape != var.get_value().shape:
            raise ValueError(f"{path}: {key} has shape {a.shape}, expected {var.get_value().shape}")
        var.set_value(jnp.asarray(a))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


# ------------------------------------------------------------------------------------------- data


def _cache_dir() -> Path:
    d = Path(os.environ.get("MANI_JAX_CACHE", Path(tempfile.gettempdir()) / "mani_jax_cache")) / "wake_tts"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _synth(text: str, variant: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng clip with leading/trailing silence trimmed (cached on disk as .npy under the temp dir)."""
    import hashlib

    from .tts import synthesize

    key = hashlib.sha1(f"{text}|{variant}|{speed}|{pitch}".encode()).hexdigest()[:20]
    f = _cache_dir() / f"{key}.npy"
    if f.exists():
        try:
            return np.load(f)
        except Exception:  # a torn cache entry: re-synthesise
            pass
    a = synthesize(text, variant=variant, speed=speed, pitch=pitch)
    idx = np.flatnonzero(np.abs(a) > 0.01 * max(np.abs(a).max(), 1e-6))
    a = a[max(idx[0] - 160, 0): idx[-1] + 160] if len(idx) else a[:0]
    a = a.astype(np.float32)
    try:
        tmp = f.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, a)
        os.replace(tmp, f)
    except OSError:
        pass
    return a


def _render(texts: Sequence[str], variants: Sequence[str], speeds: Sequence[int], n: int,
            rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for i in range(n):
        t = texts[i % len(texts)]
        v = variants[int(rng.integers(len(variants)))]
        s = int(speeds[int(rng.integers(len(speeds)))])
        p = int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1))
        a = _synth(t, v, s, p)
        if len(a) > 800:
            out.append(a)
    return out


@dataclasses.dataclass
class WakeDataset:
    """Raw espeak-ng clips (trimmed, 16 kHz float32) from which windows are drawn with fresh augmentation.

    ``positives``: the wake phrase; ``negatives``: other sentences; ``split``: "train" or "heldout"."""

    positives: list[np.ndarray]
    negatives: list[np.ndarray]
    split: str

    def __len__(self):
        return len(self.positives) + len(self.negatives)

    @functools.cached_property
    def noise_bank(self) -> dict[str, np.ndarray]:
        """16 pre-generated 8-second unit-RMS clips ``[16, 128000]`` per noise colour (fixed seed)."""
        rng = np.random.default_rng(1234)
        return {k: np.stack([colored_noise(8 * SAMPLE_RATE, k, rng) for _ in range(16)])
                for k in ("white", "pink", "brown")}


def synth_wake_dataset(split: str = "train", *, n_pos: int = 648, n_neg: int = 2400, seed: int = 0,
                       phrase: str = WAKE_PHRASE) -> WakeDataset:
    """Synthesise the wake phrase and negative sentences with espeak-ng.

    ``split="train"``: :data:`TRAIN_VARIANTS` x :data:`TRAIN_SPEEDS` and :data:`TRAIN_SENTENCES`;
    ``split="heldout"``: :data:`HELDOUT_VARIANTS` x :data:`HELDOUT_SPEEDS` and :data:`HELDOUT_SENTENCES`.
    Positives cycle through the variants (each variant ``n_pos / len(variants)`` times) with a random speed of
    the split and pitch in :data:`PITCH_RANGE`; negatives cycle through the sentences (near misses included).
    Deterministic in ``seed``; clips are cached on disk (about 15 ms of espeak-ng per uncached clip).
    Noise, gain and time shift are added later, per batch (:func:`sample_windows`).
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split: expected 'train' or 'heldout', got {split!r}")
    variants, speeds, sents = ((TRAIN_VARIANTS, TRAIN_SPEEDS, TRAIN_SENTENCES) if split == "train"
                               else (HELDOUT_VARIANTS, HELDOUT_SPEEDS, HELDOUT_SENTENCES))
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    pos = []
    for i in range(n_pos):
        v = variants[i % len(variants)]
        s = int(speeds[int(rng.integers(len(speeds)))])
        p = int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1))
        a = _synth(phrase, v, s, p)
        if len(a) <= window_samples():
            pos.append(a)
    neg = _render(list(sents), variants, speeds, n_neg, rng)
    return WakeDataset(pos, neg, split)


def colored_noise(n: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise float32 ``[n]``: ``white`` (flat), ``pink`` (1/f power), ``brown`` (1/f^2 power), shaped in
    the frequency domain."""
    x = rng.standard_normal(n).astype(np.float32)
    if kind != "white":
        spec = np.fft.rfft(x)
        f = np.arange(len(spec), dtype=np.float64)
        f[0] = 1.0
        spec = spec / (np.sqrt(f) if kind == "pink" else f)
        x = np.fft.irfft(spec, n).astype(np.float32)
    x -= x.mean()
    return x / max(float(np.sqrt(np.mean(x ** 2))), 1e-9)


def _babble(n: int, pool: Sequence[np.ndarray], rng: np.random.Generator, k: int = 4) -> np.ndarray:
    out = np.zeros(n, np.float32)
    for _ in range(k):
        c = pool[int(rng.integers(len(pool)))]
        c = np.tile(c, n // max(len(c), 1) + 2)
        o = int(rng.integers(len(c) - n))
        out += c[o:o + n]
    return out / max(float(np.sqrt(np.mean(out ** 2))), 1e-9)


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(a.astype(np.float64) ** 2))) if len(a) else 0.0


def _noise_bed(n: int, speech_rms: float, rng: np.random.Generator, babble_pool, bank=None) -> np.ndarray:
    kind = NOISE_KINDS[int(rng.integers(len(NOISE_KINDS)))]
    if kind == "babble":
        noise = _babble(n, babble_pool, rng)
    elif bank is not None:  # a random crop of pre-generated noise (cheaper than a fresh FFT per window)
        b = bank[kind]
        o = int(rng.integers(b.shape[1] - n))
        noise = b[int(rng.integers(len(b))), o:o + n]
        noise = noise / max(_rms(noise), 1e-9)
    else:
        noise = colored_noise(n, kind, rng)
    snr = rng.uniform(*SNR_RANGE_DB)
    return noise * (speech_rms / 10 ** (snr / 20))


def window_samples(cfg: WakeConfig = WakeConfig()) -> int:
    """Audio samples behind one scored window: ``(window_frames - 1) * 160 + 400``."""
    return (cfg.window_frames - 1) * HOP + N_FFT


def sample_windows(ds: WakeDataset, n: int, label: int, rng: np.random.Generator,
                   cfg: WakeConfig = WakeConfig()) -> np.ndarray:
    """``n`` augmented feature windows ``[n, window_frames, n_mels]`` float32 of class ``label`` (1 = the whole
    wake phrase lies inside the window).

    Positives: the phrase at a random position inside the window, random gain (-20..+3 dB from an 0.3 peak),
    sometimes (30%) preceded by the tail of another sentence, over white/pink/brown/babble noise at 5-20 dB SNR
    (10% clean). Negatives: a random crop of a negative sentence, 30% of them spanning the boundary between two
    sentences (60%), the first 40% or last 50% of the wake
    phrase alone (15%), pure noise (15%) or near-silence (10%), with the same noise.
    """
    L = window_samples(cfg)
    out = np.zeros((n, L), np.float32)
    for i in range(n):
        x = np.zeros(L, np.float32)
        gain = 0.3 * 10 ** (rng.uniform(-20, 3) / 20)
        if label == 1:
            p = ds.positives[int(rng.integers(len(ds.positives)))]
            p = p[:L]
            p = p * (gain / max(np.abs(p).max(), 1e-6))
            start = int(rng.integers(0, L - len(p) + 1))
            if rng.random() < 0.3 and start > 1600:
                c = ds.negatives[int(rng.integers(len(ds.negatives)))]
                gap = int(rng.integers(800, 4000))
                tail = c[-max(start - gap, 1):] * (gain / max(np.abs(c).max(), 1e-6))
                x[max(start - gap - len(tail), 0): max(start - gap - len(tail), 0) + len(tail)] += tail[:L]
            x[start:start + len(p)] += p
            srms = _rms(p)
        else:
            r = rng.random()
            if r < 0.6:
                c = ds.negatives[int(rng.integers(len(ds.negatives)))]
                if rng.random() < 0.3:  # a sentence boundary: the end of one clip, a pause, the start of another
                    c2 = ds.negatives[int(rng.integers(len(ds.negatives)))]
                    c = np.concatenate([c / max(np.abs(c).max(), 1e-6),
                                        np.zeros(int(rng.integers(0, 4000)), np.float32),
                                        c2 / max(np.abs(c2).max(), 1e-6)])
                c = c * (gain / max(np.abs(c).max(), 1e-6))
                if len(c) > L:
                    o = int(rng.integers(len(c) - L + 1))
                    x[:] = c[o:o + L]
                else:
                    o = int(rng.integers(-len(c) // 2, L - len(c) // 2))
                    lo, hi = max(o, 0), min(o + len(c), L)
                    x[lo:hi] = c[lo - o:hi - o]
                srms = _rms(c)
            elif r < 0.75:
                p = ds.positives[int(rng.integers(len(ds.positives)))]
                p = p * (gain / max(np.abs(p).max(), 1e-6))
                part = p[: int(0.4 * len(p))] if rng.random() < 0.5 else p[int(0.5 * len(p)):]
                o = int(rng.integers(0, L - len(part) + 1))
                x[o:o + len(part)] = part[:L]
                srms = _rms(part)
            elif r < 0.9:
                srms = gain * 0.3
            else:
                srms = 1e-4 * rng.random()
        if rng.random() > 0.1 or srms < 1e-3:
            x += _noise_bed(L, max(srms, 1e-5), rng, ds.negatives, ds.noise_bank)
        out[i] = x
    frames = np.lib.stride_tricks.sliding_window_view(out, N_FFT, axis=1)[:, ::HOP][:, :cfg.window_frames]
    return _frames_to_features(frames)


# ------------------------------------------------------------------------------------------- training


def auc(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    """Area under the ROC curve (probability a positive outscores a negative; ties count half)."""
    from scipy.stats import rankdata

    s = np.concatenate([pos_scores, neg_scores])
    r = rankdata(s)
    npos, nneg = len(pos_scores), len(neg_scores)
    return float((r[:npos].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def train_wake_model(*, steps: int = 2000, batch: int = 64, lr: float = 3e-3, weight_decay: float = 1e-3,
                     seed: int = 0, cfg: WakeConfig = WakeConfig(), train_ds: WakeDataset | None = None,
                     val_ds: WakeDataset | None = None, n_val: int = 256, log_every: int = 250,
                     verbose: bool = False) -> tuple[WakeNet, dict]:
    """Train a :class:`WakeNet` from scratch on synthetic espeak-ng data.

    Each step draws a class-balanced batch (``batch / 2`` positive and negative windows, fresh augmentation,
    :func:`sample_windows`) from ``train_ds`` (default :func:`synth_wake_dataset` ``("train")``); binary
    cross-entropy on the logits; optax AdamW with linear warm-up (5%) then cosine decay from ``lr``, gradient
    clipping at 1.0; the step is one jitted function. Data for the next step is drawn on a worker thread while the
    current step runs. Validation: AUC and accuracy at 0.5 on ``n_val`` positive and ``n_val`` negative windows
    from ``val_ds`` (default held-out variants/speeds/sentences).

    Returns ``(model, metrics)`` with ``metrics`` = ``{"steps", "seconds", "final_loss", "val_auc", "val_acc",
    "params", "log": [[step, loss], ...]}``. Deterministic in ``seed`` (up to float summation order).
    """
    from concurrent.futures import ThreadPoolExecutor

    if steps < 1 or batch < 2 or batch % 2:
        raise ValueError(f"steps must be >= 1 and batch even >= 2, got steps={steps}, batch={batch}")
    t0 = time.perf_counter()
    train_ds = train_ds or synth_wake_dataset("train", seed=seed)
    val_ds = val_ds or synth_wake_dataset("heldout", n_pos=200, n_neg=200, seed=seed)
    t_data = time.perf_counter() - t0
    model = WakeNet(cfg, rngs=nnx.Rngs(seed))
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), steps, lr * 0.02)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=weight_decay))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest)(x)
            return optax.sigmoid_binary_cross_entropy(logits, y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng([seed, 7])
    half = batch // 2
    y = np.concatenate([np.ones(half), np.zeros(half)]).astype(np.float32)

    def draw():
        return np.concatenate([sample_windows(train_ds, half, 1, rng, cfg),
                               sample_windows(train_ds, half, 0, rng, cfg)])

    log, losses = [], []
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(draw)
        for i in range(steps):
            x = fut.result()
            if i + 1 < steps:
                fut = pool.submit(draw)
            params, opt_state, loss = step(params, opt_state, x, y)
            if (i + 1) % log_every == 0 or i + 1 == steps:
                losses.append(float(loss))
                log.append([i + 1, float(loss)])
                if verbose:
                    print(f"step {i + 1:5d}  loss {float(loss):.4f}  {time.perf_counter() - t0:6.1f} s", flush=True)
    nnx.update(model, params)
    vrng = np.random.default_rng([seed, 11])
    pv = wake_probs(model, sample_windows(val_ds, n_val, 1, vrng, cfg))
    nv = wake_probs(model, sample_windows(val_ds, n_val, 0, vrng, cfg))
    metrics = {"steps": steps, "batch": batch, "seconds": round(time.perf_counter() - t0, 1),
               "data_seconds": round(t_data, 1), "final_loss": losses[-1], "val_auc": auc(pv, nv),
               "val_acc": float(((pv >= 0.5).sum() + (nv < 0.5).sum()) / (2 * n_val)), "params": param_count(model),
               "seed": seed, "log": log, "data": SYNTHETIC_LABEL}
    return model, metrics


# ------------------------------------------------------------------------------------------- detector


def kth_largest_smooth(scores: np.ndarray, smoothing: int, min_hits: int) -> np.ndarray:
    """K-of-N smoothing: ``out[i]`` = the ``min_hits``-th largest of ``scores[i - smoothing + 1 : i + 1]`` (missing
    scores before the start count as 0). ``out[i] >= threshold`` exactly when at least ``min_hits`` of the last
    ``smoothing`` raw scores are ``>= threshold``."""
    s = np.asarray(scores, np.float32)
    if len(s) == 0:
        return s
    padded = np.concatenate([np.zeros(smoothing - 1, np.float32), s])
    win = np.lib.stride_tricks.sliding_window_view(padded, smoothing)
    return np.sort(win, axis=1)[:, smoothing - min_hits]


class WakeWordDetector:
    """Streaming wake-word detector over 10 ms frames of 16 kHz float32 audio.

    Keeps a ring buffer of the last ``window_frames`` feature rows (initially :func:`silence_feature`); every
    ``score_every`` frames (default 5 = 50 ms) the window is scored by one jitted fixed-shape call
    (``[1, 170, 40]`` -> probability; ~0.2 ms on a laptop CPU). Detection when at least ``min_hits`` of the last
    ``smoothing`` scores are ``>= threshold`` (K-of-N smoothing: raising ``min_hits`` or ``threshold`` makes it
    stricter, ``min_hits=1`` reacts to a single score); after a detection the score history is cleared and
    nothing fires for ``refractory_s`` seconds.

    Args:
      model: a :class:`WakeNet` (default: :func:`load_wake_model` of the shipped weights).
      threshold: in (0, 1).  smoothing: N >= 1 scores.  min_hits: K in 1..N.  refractory_s: >= 0 seconds.
      score_every: frames (10 ms) between scores, >= 1.

    Defaults (threshold 0.8, 3-of-4, 2 s refractory) were picked from the held-out sweep of the shipped model
    (``python -m mani_jax.voice.wake eval``): on synthetic (espeak-ng) held-out audio they gave 6.2% false rejects
    (160 clips) and 18 false accepts per hour (3 in a 10-minute negative stream) -- far from openWakeWord's
    < 0.5 FA/h target; see the sidecar JSON and ``evaluate_wake``.
    Raises:
      ValueError: naming the bad argument; ``process`` raises it for a frame that is not 160 samples.
    """

    def __init__(self, model: WakeNet | None = None, threshold: float = 0.8, smoothing: int = 4, min_hits: int = 3,
                 refractory_s: float = 2.0, score_every: int = 5, name: str | None = None):
        if not (isinstance(threshold, (int, float)) and 0.0 < threshold < 1.0):
            raise ValueError(f"threshold: expected a probability in (0, 1), got {threshold!r}")
        if not isinstance(smoothing, int) or smoothing < 1:
            raise ValueError(f"smoothing: expected an int >= 1 (number of recent scores), got {smoothing!r}")
        if not isinstance(min_hits, int) or not 1 <= min_hits <= smoothing:
            raise ValueError(f"min_hits: expected an int in 1..smoothing={smoothing}, got {min_hits!r}")
        if not refractory_s >= 0:
            raise ValueError(f"refractory_s: expected >= 0 seconds, got {refractory_s!r}")
        if not isinstance(score_every, int) or score_every < 1:
            raise ValueError(f"score_every: expected an int >= 1 (frames), got {score_every!r}")
        self.model = model if model is not None else load_wake_model()
        self.cfg = self.model.cfg
        self.threshold, self.smoothing, self.min_hits = float(threshold), smoothing, min_hits
        self.refractory_s, self.score_every = float(refractory_s), score_every
        self.name = name or self.cfg.name
        graphdef, self._params = nnx.split(self.model)
        self._apply = _apply_fn(graphdef)
        self.reset()

    def reset(self):
        """Forget all audio: silence window, empty score history, no refractory period."""
        self._feats = WakeFeatureStream()
        self._ring = np.tile(silence_feature(), (self.cfg.window_frames, 1)).astype(np.float32)
        self._pos = 0  # next ring row to write (oldest row)
        self._frames = 0
        self._scores: deque[float] = deque(maxlen=self.smoothing)
        self._quiet_until = -1
        self.last_score = 0.0

    def _window(self) -> np.ndarray:
        return np.concatenate([self._ring[self._pos:], self._ring[:self._pos]])[None]

    def process(self, frame_10ms: np.ndarray) -> Detection | None:
        """Feed one 10 ms frame (float ``[160]``); returns a ``Detection(name, timestamp=ms at the frame's end)``
        or None."""
        f = np.asarray(frame_10ms)
        if f.shape != (FRAME_SAMPLES,):
            raise ValueError(f"frame_10ms: expected {FRAME_SAMPLES} samples (10 ms at 16 kHz), got shape {f.shape}")
        self._ring[self._pos] = self._feats.push(f)
        self._pos = (self._pos + 1) % self.cfg.window_frames
        self._frames += 1
        if self._frames % self.score_every:
            return None
        self.last_score = float(self._apply(self._params, self._window())[0])
        if self._frames < self._quiet_until:
            return None
        self._scores.append(self.last_score)
        if sum(s >= self.threshold for s in self._scores) >= self.min_hits:
            self._scores.clear()
            self._quiet_until = self._frames + round(self.refractory_s * 100)
            return Detection(name=self.name, timestamp=self._frames * 10)
        return None

    def process_audio(self, audio: np.ndarray) -> list[Detection]:
        """Stream a whole clip through :meth:`process` (a trailing partial frame is dropped)."""
        a = np.asarray(audio, np.float32)
        out = []
        for i in range(0, len(a) // FRAME_SAMPLES * FRAME_SAMPLES, FRAME_SAMPLES):
            d = self.process(a[i:i + FRAME_SAMPLES])
            if d is not None:
                out.append(d)
        return out

    def raw_scores(self, audio: np.ndarray) -> np.ndarray:
        """The probabilities ``[n_frames // score_every]`` the stream would compute for ``audio`` from a reset
        state, in one batched pass (identical windows to :meth:`process`)."""
        feats = stream_features(audio)
        W = self.cfg.window_frames
        padded = np.concatenate([np.tile(silence_feature(), (W, 1)), feats])
        ends = np.arange(self.score_every, len(feats) + 1, self.score_every)  # frames seen when scoring
        if len(ends) == 0:
            return np.zeros(0, np.float32)
        wins = np.lib.stride_tricks.sliding_window_view(padded, (W, padded.shape[1]))[:, 0]
        step = 4096  # windows copied per chunk (4096 x 170 x 40 float32 = 111 MB)
        return np.concatenate([wake_probs(self.model, wins[ends[i:i + step]]) for i in range(0, len(ends), step)])

    def smoothed_scores(self, audio: np.ndarray) -> np.ndarray:
        """K-of-N smoothed scores (:func:`kth_largest_smooth`) over :meth:`raw_scores` (no refractory)."""
        return kth_largest_smooth(self.raw_scores(audio), self.smoothing, self.min_hits)

    def score_clip(self, audio: np.ndarray) -> float:
        """Max smoothed score over a clip (the clip fires at threshold ``t`` iff this is ``>= t``)."""
        s = self.smoothed_scores(audio)
        return float(s.max()) if len(s) else 0.0


def count_detections(smoothed: np.ndarray, threshold: float, refractory_steps: int) -> int:
    """Detections a stream makes on a smoothed-score sequence, counting a new one only ``refractory_steps``
    scores after the last (approximates :meth:`WakeWordDetector.process`, which also clears its history)."""
    idx = np.flatnonzero(np.asarray(smoothed) >= threshold)
    n, last = 0, -10**12
    for i in idx:
        if i - last >= refractory_steps:
            n += 1
            last = i
    return n


# ------------------------------------------------------------------------------------------- evaluation


def heldout_positive_clips(n: int = 80, *, seed: int = 1, phrase: str = WAKE_PHRASE) -> list[np.ndarray]:
    """``n`` test clips: 0.5-2 s of held-out speech or noise, the wake phrase (held-out variant x held-out speed,
    random pitch, random gain), then 0.5-1 s of silence, all over noise at 5-20 dB SNR. Synthetic (espeak-ng)."""
    rng = np.random.default_rng([seed, 21])
    ctx = _render(list(HELDOUT_SENTENCES), HELDOUT_VARIANTS, HELDOUT_SPEEDS, 40, rng)
    clips = []
    combos = [(v, s) for s in HELDOUT_SPEEDS for v in HELDOUT_VARIANTS]
    for i in range(n):
        v, s = combos[i % len(combos)]
        p = _synth(phrase, v, s, int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)))
        gain = 0.3 * 10 ** (rng.uniform(-15, 3) / 20)
        p = p * (gain / max(np.abs(p).max(), 1e-6))
        pre = np.zeros(int(rng.uniform(0.5, 2.0) * SAMPLE_RATE), np.float32)
        if rng.random() < 0.5:
            c = ctx[int(rng.integers(len(ctx)))]
            c = c[-len(pre) + 4000:] * (gain / max(np.abs(c).max(), 1e-6))
            pre[:len(c)] = c
        x = np.concatenate([pre, p, np.zeros(int(rng.uniform(0.5, 1.0) * SAMPLE_RATE), np.float32)])
        x += _noise_bed(len(x), _rms(p), rng, ctx)
        clips.append(x.astype(np.float32))
    return clips


def heldout_negative_stream(minutes: float = 10.0, *, seed: int = 2) -> np.ndarray:
    """A long synthetic negative stream (float32, 16 kHz): held-out sentences (near misses included) by held-out
    variants at held-out speeds, random pitch and gain, separated by 0.2-1.5 s pauses, over noise segments of a
    random kind at 5-20 dB SNR, with 10% of the time pure noise. Synthetic (espeak-ng)."""
    rng = np.random.default_rng([seed, 31])
    n_target = int(minutes * 60 * SAMPLE_RATE)
    parts, total, k = [], 0, 0
    sents = list(HELDOUT_SENTENCES)
    while total < n_target:
        if rng.random() < 0.1:
            seg = np.zeros(int(rng.uniform(2, 6) * SAMPLE_RATE), np.float32)
            level = 0.3 * 10 ** (rng.uniform(-30, -5) / 20)
            seg += colored_noise(len(seg), NOISE_KINDS[int(rng.integers(3))], rng) * level
        else:
            t = sents[k % len(sents)]
            k += 1
            c = _synth(t, HELDOUT_VARIANTS[int(rng.integers(len(HELDOUT_VARIANTS)))],
                       int(HELDOUT_SPEEDS[int(rng.integers(len(HELDOUT_SPEEDS)))]),
                       int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)))
            gain = 0.3 * 10 ** (rng.uniform(-15, 3) / 20)
            c = c * (gain / max(np.abs(c).max(), 1e-6))
            seg = np.concatenate([c, np.zeros(int(rng.uniform(0.2, 1.5) * SAMPLE_RATE), np.float32)])
            seg = seg + _noise_bed(len(seg), _rms(c), rng, [c])
        parts.append(seg.astype(np.float32))
        total += len(seg)
    return np.concatenate(parts)[:n_target]


DEFAULT_SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)


def evaluate_wake(detector: WakeWordDetector | None = None, *, n_pos: int = 160, minutes: float = 10.0,
                  thresholds: Iterable[float] = DEFAULT_SWEEP, seed: int = 1) -> dict:
    """False rejects and false accepts per hour on HELD-OUT synthetic (espeak-ng) audio, with a threshold sweep.

    FRR: fraction of ``n_pos`` :func:`heldout_positive_clips` whose :meth:`WakeWordDetector.score_clip` is below the
    threshold. FA/h: detections (with the detector's refractory period, :func:`count_detections`) in a
    ``minutes``-long :func:`heldout_negative_stream`, scaled to one hour. Uses the detector's smoothing and
    ``score_every``; every threshold in ``thresholds`` plus the detector's own is reported.

    Returns a dict: ``label``, ``threshold``, ``frr``, ``fa_per_hour``, ``false_accepts``, ``positives``,
    ``negative_hours``, ``sweep`` (list of ``{threshold, frr, fa_per_hour, false_accepts}``), settings, seconds.
    """
    det = detector or WakeWordDetector()
    t0 = time.perf_counter()
    pos = heldout_positive_clips(n_pos, seed=seed)
    pos_scores = np.array([det.score_clip(c) for c in pos])
    stream = heldout_negative_stream(minutes, seed=seed + 1)
    smoothed = det.smoothed_scores(stream)
    hours = len(stream) / SAMPLE_RATE / 3600
    refr = max(round(det.refractory_s * 100 / det.score_every), 1)
    ths = sorted(set(float(t) for t in thresholds) | {det.threshold})
    sweep = []
    for t in ths:
        fa = count_detections(smoothed, t, refr)
        sweep.append({"threshold": t, "frr": float(np.mean(pos_scores < t)), "fa_per_hour": fa / hours,
                      "false_accepts": fa})
    own = next(r for r in sweep if r["threshold"] == det.threshold)
    return {"label": SYNTHETIC_LABEL, "threshold": det.threshold, "smoothing": det.smoothing,
            "min_hits": det.min_hits, "refractory_s": det.refractory_s, "score_every": det.score_every,
            "frr": own["frr"], "fa_per_hour": own["fa_per_hour"], "false_accepts": own["false_accepts"],
            "positives": len(pos), "negative_hours": hours, "negative_minutes": hours * 60,
            "heldout_variants": list(HELDOUT_VARIANTS), "heldout_speeds": list(HELDOUT_SPEEDS),
            "sweep": sweep, "seconds": round(time.perf_counter() - t0, 1),
            "targets": "openWakeWord: < 0.5 false accepts/hour, < 5% false rejects"}


def format_eval(res: dict) -> str:
    lines = [f"wake word {WAKE_PHRASE!r} -- {res['label']} held-out audio: {res['positives']} positive clips, "
             f"{res['negative_minutes']:.1f} min negative stream (smoothing {res['min_hits']}-of-{res['smoothing']}, "
             f"refractory {res['refractory_s']} s)",
             f"{'threshold':>9} {'FRR':>7} {'FA/h':>8} {'FAs':>5}"]
    for r in res["sweep"]:
        mark = "  <- default" if r["threshold"] == res["threshold"] else ""
        lines.append(f"{r['threshold']:9.2f} {100 * r['frr']:6.1f}% {r['fa_per_hour']:8.2f} "
                     f"{r['false_accepts']:5d}{mark}")
    lines.append(f"targets ({res['targets']})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mani_jax.voice.wake", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train a wake model on synthetic espeak-ng data and save it")
    tr.add_argument("--out", required=True, type=Path)
    tr.add_argument("--steps", type=int, default=2000)
    tr.add_argument("--batch", type=int, default=64)
    tr.add_argument("--seed", type=int, default=0)
    ev = sub.add_parser("eval", help="FRR and FA/h on held-out synthetic audio, with a threshold sweep")
    ev.add_argument("--model", type=Path, default=None)
    ev.add_argument("--minutes", type=float, default=10.0)
    ev.add_argument("--positives", type=int, default=160)
    ev.add_argument("--threshold", type=float, default=0.8)
    ev.add_argument("--smoothing", type=int, default=4)
    ev.add_argument("--min-hits", type=int, default=3)
    ev.add_argument("--json", type=Path, default=Path("wake_eval.json"))
    args = ap.parse_args(argv)
    if args.cmd == "train":
        model, m = train_wake_model(steps=args.steps, batch=args.batch, seed=args.seed, verbose=True)
        cmd = "python -m mani_jax.voice.wake " + " ".join(sys.argv[1:] if argv is None else argv)
        save_wake_model(model, args.out, meta={"command": cmd, "train": m,
                                               "train_variants": list(TRAIN_VARIANTS),
                                               "train_speeds": list(TRAIN_SPEEDS)})
        print(json.dumps({k: v for k, v in m.items() if k != "log"}, ensure_ascii=False))
        print(f"saved {args.out} ({args.out.stat().st_size} bytes)")
        return 0
    det = WakeWordDetector(load_wake_model(args.model), threshold=args.threshold, smoothing=args.smoothing,
                           min_hits=args.min_hits)
    res = evaluate_wake(det, n_pos=args.positives, minutes=args.minutes)
    print(format_eval(res))
    write_atomic(args.json, json.dumps(res, ensure_ascii=False, indent=1).encode())
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
