"""VAANI's audio front end, TTS, Wyoming framing, the network guard, and grammar-constrained Whisper decoding.

The decoding tests use the tiny random Hugging Face Whisper golden (tests/golden/whisper_tiny) and check the
trie searches against an independent reference: the uncached full forward pass, scored token by token
(greedy) or sentence by sentence (beam search with a beam as wide as the grammar is exhaustive).
"""
import io
import socket
import urllib.request
from pathlib import Path

import jax.numpy as jnp
from flax import nnx
import numpy as np
import pytest
from wyoming.audio import AudioChunk
from wyoming.event import read_event, write_event
from wyoming.intent import Entity, Intent

from mani_jax.models import whisper as W
from mani_jax.voice import audio as A
from mani_jax.voice import tts
from mani_jax.voice.asr import TokenTrie, WhisperASR
from mani_jax.voice.offline import NetworkAccessError, no_network

GOLDEN = Path(__file__).parent / "golden" / "whisper_tiny"
needs_espeak = pytest.mark.skipif(not __import__("shutil").which("espeak-ng"), reason="espeak-ng not installed")


# ------------------------------------------------------------------------------------------ audio, VAD


def test_wav_round_trip_resample_and_atomic_write(tmp_path):
    t = np.arange(22050) / 22050
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    p = A.write_wav(tmp_path / "a.wav", x, rate=22050)
    y = A.read_wav(p)  # resampled to 16 kHz
    assert y.dtype == np.float32 and abs(len(y) - 16000) <= 1
    # the tone survives resampling: its spectrum peaks at 440 Hz
    spec = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spec) * 16000 / len(y) - 440) < 2
    assert not list(tmp_path.glob(".*tmp"))
    with pytest.raises(ValueError, match="not a PCM WAV"):
        A.decode_wav(b"RIFF0000WAVEjunk")
    with pytest.raises(FileNotFoundError, match="no such file"):
        A.read_wav(tmp_path / "missing.wav")
    with pytest.raises(ValueError, match="1-D"):
        A.resample(np.zeros((2, 10)), 8000)


def test_chunks_follow_wyoming_and_survive_its_framing():
    x = np.linspace(-0.5, 0.5, 16000 * 3 // 100 + 7).astype(np.float32)
    chunks = list(A.chunk_events(x))
    assert [c.timestamp for c in chunks] == [0, 10, 20, 30]
    assert all(c.rate == 16000 and c.width == 2 and c.channels == 1 and len(c.audio) == 320 for c in chunks)
    buf = io.BytesIO()
    for c in chunks:
        write_event(c.event(), buf)
    write_event(Intent(name="HassStartTimer", entities=[Entity(name="minutes", value="5")], text="t").event(), buf)
    buf.seek(0)
    back = [read_event(buf) for _ in range(5)]
    got = np.concatenate([A.chunk_audio(AudioChunk.from_event(e)) for e in back[:4]])[: len(x)]
    np.testing.assert_allclose(got, x, atol=1 / 32767)
    assert Intent.from_event(back[4]).entities[0].value == "5"


def test_energy_vad_ends_after_the_hangover():
    rng = np.random.default_rng(0)
    sr = 16000
    sig = np.concatenate([0.001 * rng.standard_normal(sr), 0.3 * rng.standard_normal(sr),
                          0.001 * rng.standard_normal(sr)]).astype(np.float32)
    for hang in (300, 600):
        vad = A.EnergyVAD(hangover_ms=hang)
        events = []
        for i, c in enumerate(A.chunk_events(sig)):
            e = vad.process(A.chunk_audio(c))
            if e:
                events.append((e, i * 10))
        assert [e for e, _ in events] == ["start", "stop"]
        assert 1000 <= events[0][1] <= 1040  # onset within min_speech_ms of the burst
        assert events[1][1] == pytest.approx(2000 + hang - 10, abs=20)
    with pytest.raises(ValueError, match="hangover_ms"):
        A.EnergyVAD(hangover_ms=0)


# ------------------------------------------------------------------------------------------ TTS


def test_sentence_split():
    assert tts.split_sentences("नमस्ते। अभी पाँच बजे हैं। ठीक है?  हाँ") == ["नमस्ते।", "अभी पाँच बजे हैं।",
                                                                              "ठीक है?", "हाँ"]


@needs_espeak
def test_espeak_hindi_synthesis():
    x = tts.synthesize("अभी पाँच बजे हैं", variant="f2", speed=160)
    assert x.dtype == np.float32 and 0.5 < len(x) / 16000 < 4 and np.abs(x).max() > 0.05
    slow = tts.synthesize("अभी पाँच बजे हैं", speed=100)
    assert len(slow) > 1.3 * len(tts.synthesize("अभी पाँच बजे हैं", speed=200))
    assert len(tts.espeak_variants()) > 50
    parts = list(tts.speak_sentences("नमस्ते। आज मौसम अच्छा है।"))
    assert [s for s, _ in parts] == ["नमस्ते।", "आज मौसम अच्छा है।"]
    with pytest.raises(ValueError, match="speed"):
        tts.synthesize("नमस्ते", speed=10)
    with pytest.raises(ValueError, match="text"):
        tts.synthesize("  ")


# ------------------------------------------------------------------------------------------ offline guard


def test_network_is_refused_inside_no_network():
    with no_network():
        with pytest.raises(NetworkAccessError):
            socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with pytest.raises(NetworkAccessError):
            socket.create_connection(("127.0.0.1", 9))
        with pytest.raises((NetworkAccessError, OSError)):
            urllib.request.urlopen("http://127.0.0.1:9", timeout=1)
        a, b = socket.socketpair(socket.AF_UNIX)  # local IPC stays allowed
        a.close(), b.close()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # restored afterwards
    s.close()


# ------------------------------------------------------------------------------------------ constrained ASR

GEN = {"decoder_start_token_id": 101, "lang_to_id": {"<|hi|>": 102}, "task_to_id": {"transcribe": 103},
       "no_timestamps_token_id": 104}
EOT = 100
# A grammar with shared prefixes, a sentence that is a prefix of another, and a unique long tail.
SENTENCES = {"a": [5, 6, 7], "b": [5, 6, 7, 8, 9], "c": [5, 6, 11], "d": [5, 12, 13, 14, 15, 16, 17],
             "e": [20, 21], "f": [20, 22, 23, 24], "g": [30, 31, 32, 33, 34, 35, 36, 37, 38]}


@pytest.fixture(scope="module")
def tiny():
    model = W.load_hf_whisper(GOLDEN)
    model.generation = GEN
    trie = TokenTrie()
    for text, ids in SENTENCES.items():
        trie.add(ids, text)
    return model, trie


def _reference(model, feats, trie, tokens):
    """Restricted log-probs of the next token after ``tokens`` from the uncached forward pass (one jitted program:
    the ids are padded to the model's 32 positions; causal attention keeps the padding out)."""
    vocab = trie.token_ids() + [EOT]
    ids = [101, 102, 103, 104] + tokens
    logits = np.asarray(_forward(model, feats, jnp.asarray([ids + [EOT] * (32 - len(ids))], jnp.int32)))
    logits = logits[0, len(ids) - 1, vocab]
    lp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    return dict(zip(vocab, lp))


@nnx.jit
def _forward(model, feats, ids):
    return model(feats, ids)


@pytest.mark.parametrize("seed", [0, 1])
def test_constrained_greedy_equals_token_by_token_reference(tiny, seed):
    model, trie = tiny
    audio = np.random.default_rng(seed).uniform(-0.3, 0.3, 12000).astype(np.float32)
    feats = W.log_mel_spectrogram(audio, window_s=1.0)[None]
    node, toks = 0, []
    while True:  # the reference: one full forward per token, argmax over the allowed set
        lp = _reference(model, feats, trie, toks)
        allowed = list(trie.children(node)) + ([EOT] if trie.is_end(node) else [])
        tok = max(allowed, key=lambda t: lp[t])
        if tok == EOT:
            break
        toks.append(tok)
        node = trie.children(node)[tok]
    for draft in (1, 3, 16):
        asr = WhisperASR(model, None, windows_s=(1.0,), grammar=trie, beam_size=1, max_new_tokens=12,
                         draft_tokens=draft)
        got = asr.transcribe(audio)
        assert got.tokens == toks and got.text == trie.sentence(node), (draft, got, toks)
        assert got.text in SENTENCES and got.constrained


def test_wide_beam_is_the_exhaustive_best_sentence(tiny):
    model, trie = tiny
    asr = WhisperASR(model, None, windows_s=(1.0,), grammar=trie, beam_size=len(SENTENCES), max_new_tokens=12)
    for seed in range(3):
        audio = np.random.default_rng(10 + seed).uniform(-0.3, 0.3, 16000).astype(np.float32)
        feats = W.log_mel_spectrogram(audio, window_s=1.0)[None]
        scores = {}
        for text, ids in SENTENCES.items():  # sum of restricted log-probs incl. end-of-text, per token
            total = sum(_reference(model, feats, trie, ids[:i])[t] for i, t in enumerate(ids))
            scores[text] = (total + _reference(model, feats, trie, ids)[EOT]) / len(ids)
        got = asr.transcribe(audio)
        best = max(scores, key=scores.get)
        assert got.text == best and got.score == pytest.approx(scores[best], abs=1e-4)


def test_asr_argument_errors(tiny):
    model, trie = tiny
    with pytest.raises(ValueError, match="beam_size"):
        WhisperASR(model, None, windows_s=(1.0,), beam_size=0)
    with pytest.raises(ValueError, match="windows_s"):
        WhisperASR(model, None, windows_s=(1.0, 0.5))
    with pytest.raises(ValueError, match="max_new_tokens"):
        WhisperASR(model, None, windows_s=(1.0,), max_new_tokens=40)
    asr = WhisperASR(model, None, windows_s=(1.0,), max_new_tokens=8)
    with pytest.raises(ValueError, match="needs a grammar"):
        asr.transcribe(np.zeros(1000, np.float32), constrained=True)
    with pytest.raises(ValueError, match="audio"):
        asr.transcribe(np.zeros((2, 10), np.float32))
    bad = TokenTrie()
    bad.add([EOT, 3], "x")
    with pytest.raises(ValueError, match="end-of-text"):
        asr.set_grammar(bad)


# ------------------------------------------------------------------------------------------ pipeline plumbing


class _CountingASR:
    """Records the audio it is asked to transcribe; answers with a fixed command."""

    language = "hi"

    def __init__(self, text):
        self.text, self.calls = text, []

    def transcribe(self, audio):
        from mani_jax.voice.asr import ASRResult
        self.calls.append(len(audio))
        return ASRResult(self.text, [], 0.0, 5.0, True, {"features": 0.0, "encode": 0.0, "decode": 0.0})


def _burst(rng, *spans):
    """Noise bursts (speech stand-ins) at the given (start_s, end_s) spans inside 3 s of near-silence."""
    x = 0.001 * rng.standard_normal(48000)
    for a, b in spans:
        x[int(a * 16000):int(b * 16000)] = 0.3 * rng.standard_normal(int(b * 16000) - int(a * 16000))
    return x.astype(np.float32)


@pytest.mark.parametrize("spans, asr_calls", [([(0.5, 1.5)], 1),               # early cut reused
                                               ([(0.5, 1.0), (1.15, 1.5)], 2)])  # a pause: first cut stale
def test_early_cut_overlaps_recognition_with_the_hangover(tmp_path, spans, asr_calls):
    from mani_jax.voice.nlu import IntentRecognizer
    from mani_jax.voice.pipeline import VoiceAssistant
    from mani_jax.voice.plugins import PluginHost

    asr = _CountingASR("बारह गुणा सात कितना होता है")
    va = VoiceAssistant(asr=asr, recognizer=IntentRecognizer(), host=PluginHost(tmp_path), early_ms=100)
    turn = va.respond_audio(_burst(np.random.default_rng(0), *spans))
    assert len(asr.calls) == asr_calls
    assert turn.intent == "VaaniCalculate" and "84" in turn.response and turn.reply_audio.size > 0
    assert any(e.startswith("early-cut@") for e in turn.events)
    lat = turn.latency_ms
    assert lat["asr_started_after_speech"] == 100.0
    assert lat["end_of_speech_to_first_audio"] == pytest.approx(max(300.0, 100.0 + lat["asr"]) + lat["after_asr"])
    # what was recognised: the speech + 200 ms pre-roll + the 100 ms of silence before the (last) early cut;
    # with a pause, the cut taken in the pause went stale when speech resumed
    for call, end in zip(asr.calls, [a for _, a in spans][-asr_calls:]):
        assert call == pytest.approx((end - spans[0][0] + 0.2 + 0.1) * 16000, abs=800)
    with pytest.raises(ValueError, match="early_ms"):
        VoiceAssistant(asr=asr, recognizer=None, host=None, early_ms=300)


@needs_espeak
def test_finished_timer_is_announced_while_listening(tmp_path):
    from mani_jax.voice.nlu import IntentRecognizer
    from mani_jax.voice.pipeline import VoiceAssistant
    from mani_jax.voice.plugins import PluginHost

    clock = [1000.0]
    host = PluginHost(tmp_path, monotonic=lambda: clock[0])
    va = VoiceAssistant(asr=None, recognizer=IntentRecognizer(), host=host)
    turn = va.respond_text("पाँच सेकंड का टाइमर लगाओ")
    assert turn.intent == "HassStartTimer" and turn.ok
    quiet = np.zeros(16000 * 2, np.float32)
    assert list(va.run(A.chunk_events(quiet))) == []  # not due yet
    clock[0] += 6.0
    turns = list(va.run(A.chunk_events(quiet)))
    assert len(turns) == 1 and turns[0].intent == "timer_finished"
    assert "5 सेकंड का टाइमर पूरा हो गया" in turns[0].response and turns[0].reply_audio.size > 8000
    assert list(va.run(A.chunk_events(quiet))) == []  # announced once
