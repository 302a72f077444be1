"""Hindi speech synthesis with espeak-ng (the only Hindi voice usable offline: see docs/vaani.md).

``synthesize`` runs ``espeak-ng -v hi[+variant] -s SPEED -p PITCH --stdout`` and returns 16 kHz mono float32.
``speak_sentences`` yields one clip per sentence, so the first audio can play before the whole reply is synthesised.
Raises ``RuntimeError`` when espeak-ng is not installed (``apt-get install espeak-ng``).
"""
from __future__ import annotations

import functools
import re
import shutil
import subprocess
from typing import Iterator

import numpy as np

from .audio import decode_wav, resample

ESPEAK = "espeak-ng"
_SENTENCE_END = re.compile(r"(?<=[।॥.!?])\s+")


@functools.cache
def espeak_path() -> str:
    path = shutil.which(ESPEAK)
    if path is None:
        raise RuntimeError("espeak-ng is not installed (Debian/Ubuntu: apt-get install espeak-ng)")
    return path


@functools.cache
def espeak_variants() -> tuple[str, ...]:
    """Names of espeak-ng's voice variants (``espeak-ng --voices=variant``; 102 in espeak-ng 1.51)."""
    out = subprocess.run([espeak_path(), "--voices=variant"], capture_output=True, text=True, check=True).stdout
    names = []
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 5 and parts[4].startswith("!v/"):
            names.append(parts[4][3:])
    return tuple(names)


def synthesize(text: str, *, voice: str = "hi", variant: str | None = None, speed: int = 150, pitch: int = 50,
               amplitude: int = 100) -> np.ndarray:
    """Text -> 16 kHz mono float32 speech from espeak-ng.

    Args:
        text: what to say (Devanagari; digits are read as Hindi number words by espeak-ng's ``hi`` rules).
        voice: espeak-ng language voice (``hi`` by default).
        variant: one of :func:`espeak_variants` (e.g. ``"m3"``, ``"f2"``, ``"Andrea"``) or None.
        speed: words per minute, 80..450.  pitch: 0..99.  amplitude: 0..200.
    Raises:
        ValueError: empty text or an out-of-range setting.  RuntimeError: espeak-ng missing or failing.
    """
    if not text or not text.strip():
        raise ValueError("text must be non-empty")
    if not 80 <= speed <= 450:
        raise ValueError(f"speed must be in 80..450 words per minute, got {speed}")
    if not 0 <= pitch <= 99:
        raise ValueError(f"pitch must be in 0..99, got {pitch}")
    v = voice if variant is None else f"{voice}+{variant}"
    proc = subprocess.run([espeak_path(), "-v", v, "-s", str(speed), "-p", str(pitch), "-a", str(amplitude),
                           "--stdout", text], capture_output=True)
    if proc.returncode != 0 or len(proc.stdout) < 44:
        raise RuntimeError(f"espeak-ng failed (voice {v!r}): {proc.stderr.decode(errors='replace').strip()}")
    audio, rate = decode_wav(proc.stdout)
    return resample(audio, rate)


def split_sentences(text: str) -> list[str]:
    """Split a reply at sentence ends (Devanagari danda ``।``/``॥`` and ``. ! ?``), keeping the punctuation."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def speak_sentences(text: str, **kw) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(sentence, audio)`` for each sentence of ``text`` as soon as it is synthesised."""
    for sentence in split_sentences(text):
        yield sentence, synthesize(sentence, **kw)
