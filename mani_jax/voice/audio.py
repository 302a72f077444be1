"""Audio I/O for VAANI: 16 kHz mono float32 everywhere inside the assistant.

Sources (WAV files, an optional ``sounddevice`` microphone, any iterator of chunks) all yield
:class:`wyoming.audio.AudioChunk` events of 16-bit little-endian PCM, 16 kHz, mono, in 10 ms frames -- the shape
the Wyoming protocol (OHF-Voice/wyoming ``audio.py``) puts on the wire, so a stage can later move to another process.
:class:`EnergyVAD` ends an utterance after ``hangover_ms`` (default 300) of frames below an energy threshold.
"""
from __future__ import annotations

import io
import os
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from wyoming.audio import AudioChunk

SAMPLE_RATE = 16_000
SAMPLE_WIDTH = 2  # bytes, s16le
CHANNELS = 1
FRAME_MS = 10
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000


def resample(audio: np.ndarray, orig_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling (``scipy.signal.resample_poly``) of a 1-D float signal; returns float32."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"audio must be 1-D (mono), got shape {audio.shape}")
    if orig_rate <= 0 or target_rate <= 0:
        raise ValueError(f"sample rates must be positive, got orig_rate={orig_rate}, target_rate={target_rate}")
    if orig_rate == target_rate:
        return audio
    from scipy.signal import resample_poly

    g = np.gcd(int(orig_rate), int(target_rate))
    return resample_poly(audio, target_rate // g, orig_rate // g).astype(np.float32)


def pcm16_to_float(pcm: bytes) -> np.ndarray:
    """s16le bytes -> float32 in [-1, 1)."""
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(audio: np.ndarray) -> bytes:
    """float32 in [-1, 1] -> s16le bytes (clipped)."""
    a = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    return (a * 32767.0).round().astype("<i2").tobytes()


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Parse a PCM WAV (any channel count, 8/16/32-bit) -> (mono float32 audio, sample rate).

    Streamed WAVs whose header says 0xFFFFFFFF frames (``espeak-ng --stdout``) are read to the end of the data.
    Raises ``ValueError`` for a file that is not PCM WAV.
    """
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
            frames = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as e:
        raise ValueError(f"not a PCM WAV file: {e}") from None
    dtype = {1: np.uint8, 2: "<i2", 4: "<i4"}.get(width)
    if dtype is None:
        raise ValueError(f"unsupported WAV sample width {width} bytes (expected 1, 2 or 4)")
    x = np.frombuffer(frames[: len(frames) - len(frames) % (width * channels)], dtype=dtype).astype(np.float32)
    if width == 1:
        x = (x - 128.0) / 128.0
    else:
        x /= float(2 ** (8 * width - 1))
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    return x, rate


def read_wav(path: str | Path) -> np.ndarray:
    """Read a WAV file as 16 kHz mono float32 (resampled if needed). Raises ``FileNotFoundError``/``ValueError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"wav: no such file {str(path)!r}")
    audio, rate = decode_wav(path.read_bytes())
    return resample(audio, rate)


def encode_wav(audio: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """float32 mono -> 16-bit PCM WAV bytes."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(float_to_pcm16(audio))
    return buf.getvalue()


def write_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same directory (fsynced), then rename: a reader sees
    the old file or the new one, never half of one. Creates parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_wav(path: str | Path, audio: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    """Write a 16-bit mono WAV atomically (:func:`write_atomic`)."""
    return write_atomic(path, encode_wav(audio, rate))


def chunk_events(audio: np.ndarray, *, frame_ms: int = FRAME_MS, start_s: float = 0.0) -> Iterator[AudioChunk]:
    """Split 16 kHz mono float32 audio into Wyoming ``AudioChunk`` events of ``frame_ms`` (the last one padded)."""
    n = SAMPLE_RATE * frame_ms // 1000
    audio = np.asarray(audio, dtype=np.float32)
    for i in range(0, len(audio), n):
        frame = audio[i:i + n]
        if len(frame) < n:
            frame = np.pad(frame, (0, n - len(frame)))
        yield AudioChunk(rate=SAMPLE_RATE, width=SAMPLE_WIDTH, channels=CHANNELS, audio=float_to_pcm16(frame),
                         timestamp=int(round(1000 * (start_s + i / SAMPLE_RATE))))


def chunk_audio(chunk: AudioChunk) -> np.ndarray:
    """A Wyoming ``AudioChunk`` -> 16 kHz mono float32 (converted if the chunk's format differs)."""
    if chunk.width != 2:
        raise ValueError(f"AudioChunk.width must be 2 (s16le), got {chunk.width}")
    x = pcm16_to_float(chunk.audio)
    if chunk.channels > 1:
        x = x.reshape(-1, chunk.channels).mean(axis=1)
    return resample(x, chunk.rate)


def microphone_chunks(*, frame_ms: int = FRAME_MS, device=None) -> Iterator[AudioChunk]:  # pragma: no cover - needs hardware
    """Live 16 kHz mono chunks from the default input device through ``sounddevice`` (optional extra ``mic``)."""
    try:
        import sounddevice as sd
    except ImportError as e:
        raise RuntimeError("--mic needs the optional 'sounddevice' package: pip install 'mani_jax[mic]'") from e
    n = SAMPLE_RATE * frame_ms // 1000
    t0 = 0
    with sd.RawInputStream(samplerate=SAMPLE_RATE, channels=1, dtype="int16", blocksize=n, device=device) as stream:
        while True:
            data, _overflow = stream.read(n)
            yield AudioChunk(rate=SAMPLE_RATE, width=2, channels=1, audio=bytes(data), timestamp=t0)
            t0 += frame_ms


def frame_energy_db(frame: np.ndarray) -> float:
    """RMS level of a frame in dBFS (a full-scale sine is -3 dB); silence floors at -120 dB."""
    rms = float(np.sqrt(np.mean(np.square(frame, dtype=np.float64)))) if len(frame) else 0.0
    return 20.0 * np.log10(max(rms, 1e-6))


@dataclass
class EnergyVAD:
    """Energy voice-activity detector with onset and hangover (silence) counting over 10 ms frames.

    Speech starts after ``min_speech_ms`` of frames above ``threshold_db`` (dBFS) and ends after ``hangover_ms`` of
    frames below it. ``threshold_db=None`` adapts: noise floor (the 10th percentile of recent frame levels) + 12 dB,
    never below -50 dBFS. ``process(frame)`` returns ``"start"``, ``"stop"`` or ``None``.
    """

    threshold_db: float | None = None
    hangover_ms: int = 300
    min_speech_ms: int = 30
    frame_ms: int = FRAME_MS

    def __post_init__(self):
        if self.hangover_ms <= 0 or self.min_speech_ms <= 0:
            raise ValueError(f"hangover_ms and min_speech_ms must be > 0, got {self.hangover_ms}, {self.min_speech_ms}")
        self.reset()

    def reset(self):
        self.in_speech = False
        self._above = 0
        self._below = 0
        self._levels: list[float] = []

    @property
    def silence_ms(self) -> int:
        """Milliseconds of consecutive frames below the threshold so far."""
        return self._below * self.frame_ms

    def threshold(self) -> float:
        if self.threshold_db is not None:
            return self.threshold_db
        if not self._levels:
            return -50.0
        return max(-50.0, float(np.percentile(self._levels[-300:], 10)) + 12.0)

    def process(self, frame: np.ndarray) -> str | None:
        level = frame_energy_db(frame)
        thr = self.threshold()
        self._levels.append(level)
        if level >= thr:
            self._above += 1
            self._below = 0
        else:
            self._below += 1
            self._above = 0
        if not self.in_speech and self._above * self.frame_ms >= self.min_speech_ms:
            self.in_speech = True
            return "start"
        if self.in_speech and self._below * self.frame_ms >= self.hangover_ms:
            self.in_speech = False
            return "stop"
        return None
