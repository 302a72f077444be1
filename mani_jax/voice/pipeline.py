"""VAANI's pipeline: stages in one process, connected by Wyoming events.

Every stage is a :class:`Stage`: ``handle(event) -> list[Event]``, taking and giving ``wyoming.event.Event``
objects (the protocol's JSONL header + PCM payload shape; OHF-Voice/wyoming), so any stage can later run as a
Wyoming server in another process without changing what flows between them:

==============  =====================================================  ==========================================
stage           consumes                                               emits
==============  =====================================================  ==========================================
WakeStage       ``audio-chunk``                                        ``detection``, then passes audio through
VadStage        ``audio-chunk`` (after a detection, or always)         ``voice-started``, ``voice-stopped``,
                                                                       ``transcribe`` + ``audio-start/chunk/stop``
AsrStage        ``transcribe``, ``audio-start/chunk/stop``              ``transcript``
IntentStage     ``transcript``                                         ``intent`` or ``not-recognized``
HandleStage     ``intent``, ``not-recognized``                         ``handled``
TtsStage        ``handled`` / ``synthesize``                           ``audio-start``, ``audio-chunk`` per
                                                                       sentence, ``audio-stop``
==============  =====================================================  ==========================================

:class:`VoiceAssistant` chains them and records a :class:`Turn` per command with per-stage latency.
**Latency** is measured from the end of speech (the last voiced frame) to the first reply audio. Audio arrives in
real time, so the stream's clock counts: recognition starts on the VAD's early cut (``early_ms`` of silence) and
runs while the hangover elapses; the reply starts after ``max(hangover, early_ms + ASR wall time)`` plus the wall
time of intent, plugin and the first sentence's synthesis. Without a valid early cut it is ``hangover + ASR + ...``.
"""
from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event
from wyoming.handle import Handled
from wyoming.intent import Intent as WyIntent
from wyoming.intent import NotRecognized
from wyoming.tts import Synthesize
from wyoming.vad import VoiceStarted, VoiceStopped
from wyoming.wake import Detection

from . import tts
from .audio import CHANNELS, FRAME_MS, SAMPLE_RATE, SAMPLE_WIDTH, EnergyVAD, chunk_audio, chunk_events

_clock = time.perf_counter


def command_grammar(recognizer) -> list[str]:
    """The ASR's command grammar: the recogniser's expanded sentences in Devanagari only. Sentences with Latin
    letters (English city or app names) are left out: whisper-base prefers Latin tokens on synthetic Hindi, and
    the first tokens decide a constrained search."""
    return [s for s in recognizer.command_sentences() if not any("a" <= c.lower() <= "z" for c in s)]


class Stage(abc.ABC):
    """One pipeline stage: Wyoming events in, Wyoming events out (``handle`` may return none)."""

    name = "stage"

    @abc.abstractmethod
    def handle(self, event: Event) -> list[Event]:
        """The events this stage emits for ``event`` (events it does not consume pass through unchanged)."""

    def reset(self):
        pass


class WakeStage(Stage):
    """Runs a :class:`~mani_jax.voice.wake.WakeWordDetector` on 10 ms chunks. Before a detection nothing passes;
    after one, audio passes on until :meth:`reset` (the turn ends). ``detector=None`` passes everything."""

    name = "wake"

    def __init__(self, detector=None):
        self.detector = detector
        self.awake = detector is None

    def reset(self):
        self.awake = self.detector is None
        if self.detector is not None:
            self.detector.reset()

    def handle(self, event: Event) -> list[Event]:
        if not AudioChunk.is_type(event.type):
            return [event]
        if self.awake:
            return [event]
        chunk = AudioChunk.from_event(event)
        det = self.detector.process(chunk_audio(chunk))
        if det is None:
            return []
        self.awake = True
        return [Detection(name=det.name, timestamp=chunk.timestamp).event()]


class VadStage(Stage):
    """Cuts one utterance out of the chunk stream with :class:`~mani_jax.voice.audio.EnergyVAD`.

    Keeps ``preroll_ms`` of audio before the onset (the VAD needs ``min_speech_ms`` to decide). After a wake
    detection, speech that was already going on (the tail of the wake phrase) is skipped until ``guard_ms`` of
    silence. On ``voice-stopped`` it emits ``transcribe`` and the utterance as ``audio-start``/chunks/``audio-stop``.

    **Early cut**: after ``early_ms`` of silence (before the hangover confirms the end) it also emits the utterance
    so far, with ``transcribe`` context ``{"early": true}``, so recognition can run while the hangover elapses.
    The final ``transcribe`` carries ``{"early_valid": true}`` when no speech came after that cut: the early
    transcript is then the answer (its audio differs only by trailing silence).
    """

    name = "vad"

    def __init__(self, vad: EnergyVAD | None = None, *, preroll_ms: int = 200, guard_ms: int = 150,
                 early_ms: int | None = 100, language: str = "hi"):
        self.vad = vad or EnergyVAD()
        if early_ms is not None and not 0 < early_ms < self.vad.hangover_ms:
            raise ValueError(f"early_ms: expected None or 0 < early_ms < hangover_ms={self.vad.hangover_ms}, "
                             f"got {early_ms}")
        self.early_ms = early_ms
        self.preroll = max(1, preroll_ms // FRAME_MS)
        self.guard = guard_ms // FRAME_MS
        self.language = language
        self.reset()

    def reset(self):
        self.vad.reset()
        self.ring: list[AudioChunk] = []
        self.utterance: list[AudioChunk] = []
        self.armed = True
        self.silent = 0
        self.early_valid = False

    def handle(self, event: Event) -> list[Event]:
        if Detection.is_type(event.type):  # don't take the end of the wake phrase for the command
            self.vad.reset()
            self.armed, self.silent = False, 0
            return [event]
        if not AudioChunk.is_type(event.type):
            return [event]
        chunk = AudioChunk.from_event(event)
        frame = chunk_audio(chunk)
        if not self.armed:  # wait for the silence after the wake phrase
            voiced = self.vad.process(frame) is not None or self.vad.in_speech
            self.silent = 0 if voiced else self.silent + 1
            if self.silent >= self.guard:
                self.vad.reset()
                self.armed = True
            return []
        state = self.vad.process(frame)
        out: list[Event] = []
        if self.vad.in_speech or state == "stop":
            if state == "start":
                self.utterance = list(self.ring)
                self.early_valid = False
                out.append(VoiceStarted(timestamp=chunk.timestamp).event())
            self.utterance.append(chunk)
            if state is None and self.vad.silence_ms == 0:
                self.early_valid = False  # speech (again): an earlier cut is stale
            elif state is None and self.early_ms and self.vad.silence_ms == self.early_ms:
                self.early_valid = True
                out.extend(self._utterance_events(Transcribe(language=self.language, context={"early": True}),
                                                  chunk.timestamp + FRAME_MS))
        else:
            self.ring = (self.ring + [chunk])[-self.preroll:]
        if state == "stop":
            hang = self.vad.hangover_ms
            out.append(VoiceStopped(timestamp=chunk.timestamp + FRAME_MS - hang).event())
            out.extend(self._utterance_events(
                Transcribe(language=self.language, context={"early_valid": self.early_valid}),
                chunk.timestamp + FRAME_MS))
            self.utterance, self.ring, self.early_valid = [], [], False
        return out

    def _utterance_events(self, transcribe: Transcribe, end_ms: int) -> list[Event]:
        return ([transcribe.event(), AudioStart(rate=SAMPLE_RATE, width=SAMPLE_WIDTH, channels=CHANNELS,
                                                timestamp=self.utterance[0].timestamp).event()]
                + [c.event() for c in self.utterance] + [AudioStop(timestamp=end_ms).event()])


class AsrStage(Stage):
    """Collects ``audio-start``..``audio-stop`` after ``transcribe`` and runs :class:`~mani_jax.voice.asr.WhisperASR`."""

    name = "asr"

    def __init__(self, asr):
        self.asr = asr
        self.audio: list[np.ndarray] | None = None
        self.last = None  # the last ASRResult

    def reset(self):
        self.audio = None

    def handle(self, event: Event) -> list[Event]:
        if AudioStart.is_type(event.type):
            self.audio = []
            return []
        if AudioChunk.is_type(event.type) and self.audio is not None:
            self.audio.append(chunk_audio(AudioChunk.from_event(event)))
            return []
        if AudioStop.is_type(event.type) and self.audio is not None:
            audio = np.concatenate(self.audio) if self.audio else np.zeros(FRAME_MS * 16, np.float32)
            self.audio = None
            self.last = self.asr.transcribe(audio)
            return [Transcript(text=self.last.text, language=self.asr.language,
                               context={"score": self.last.score, "window_s": self.last.window_s,
                                        "constrained": self.last.constrained}).event()]
        if Transcribe.is_type(event.type):
            return []
        return [event]


class IntentStage(Stage):
    """``transcript`` -> ``intent`` (slots as entities) or ``not-recognized``, with an
    :class:`~mani_jax.voice.nlu.IntentRecognizer`."""

    name = "intent"

    def __init__(self, recognizer):
        self.recognizer = recognizer
        self.last = None

    def handle(self, event: Event) -> list[Event]:
        if not Transcript.is_type(event.type):
            return [event]
        text = Transcript.from_event(event).text
        self.last = self.recognizer.recognize(text)
        if self.last is None:
            return [NotRecognized(text=text).event()]
        ev = self.last.to_wyoming().event()
        ev.data.setdefault("context", {})
        ev.data["context"] = {**(ev.data["context"] or {}), "confidence": self.last.confidence,
                              "source": self.last.source}
        return [ev]


class HandleStage(Stage):
    """``intent`` -> the plugin's Hindi reply as ``handled``; ``not-recognized`` goes to the optional ``fallback``
    (e.g. a local LLM: ``text -> reply or None``) or gets a polite "didn't understand". The intent is rebuilt
    from the event alone (name, entities, text, context), as a stage in another process would."""

    name = "handle"
    NOT_UNDERSTOOD = "माफ़ कीजिए, मैं समझ नहीं पाई। कृपया फिर से कहिए।"

    def __init__(self, host, fallback: Callable[[str], str | None] | None = None):
        self.host, self.fallback = host, fallback
        self.last = None

    def handle(self, event: Event) -> list[Event]:
        if WyIntent.is_type(event.type):
            from .nlu import Intent

            wy = WyIntent.from_event(event)
            ctx = wy.context or {}
            intent = Intent(wy.name, {e.name: e.value for e in wy.entities}, wy.text or "",
                            float(ctx.get("confidence", 1.0)), str(ctx.get("source", "hassil")))
            self.last = self.host.handle(intent)
            return [Handled(text=self.last.text, context={"plugin": self.last.plugin, "ok": self.last.ok}).event()]
        if NotRecognized.is_type(event.type):
            text = NotRecognized.from_event(event).text or ""
            reply = None
            if self.fallback is not None and text:
                try:
                    reply = self.fallback(text)
                except Exception:  # noqa: BLE001 - isolation: a failing LLM is a polite reply, not a crash
                    reply = None
            self.last = None
            return [Handled(text=reply or self.NOT_UNDERSTOOD,
                            context={"plugin": "llm" if reply else None, "ok": bool(reply)}).event()]
        return [event]


class TtsStage(Stage):
    """``handled``/``synthesize`` -> espeak-ng speech, one sentence at a time (the first sentence's audio goes out
    before the next is synthesised), framed as ``audio-start``, 10 ms ``audio-chunk`` events, ``audio-stop``."""

    name = "tts"

    def __init__(self, *, variant: str | None = None, speed: int = 150, pitch: int = 50):
        self.options = dict(variant=variant, speed=speed, pitch=pitch)

    def stream(self, event: Event) -> Iterator[Event]:
        if Handled.is_type(event.type):
            text = Handled.from_event(event).text or ""
        elif Synthesize.is_type(event.type):
            text = Synthesize.from_event(event).text
        else:
            yield event
            return
        yield AudioStart(rate=SAMPLE_RATE, width=SAMPLE_WIDTH, channels=CHANNELS).event()
        t = 0.0
        for sentence, audio in tts.speak_sentences(text, **self.options):
            for c in chunk_events(audio, start_s=t):
                yield c.event()
            t += len(audio) / SAMPLE_RATE
        yield AudioStop().event()

    def handle(self, event: Event) -> list[Event]:
        return list(self.stream(event))


@dataclass
class Turn:
    """One command: what was heard, understood and said, and how long each stage took (milliseconds)."""

    transcript: str | None = None
    intent: str | None = None
    slots: dict = field(default_factory=dict)
    plugin: str | None = None
    response: str | None = None
    ok: bool = False
    wake_detected: bool | None = None
    reply_audio: np.ndarray | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"transcript": self.transcript, "intent": self.intent, "slots": self.slots, "plugin": self.plugin,
                "response": self.response, "ok": self.ok, "wake_detected": self.wake_detected,
                "latency_ms": {k: round(v, 1) for k, v in self.latency_ms.items()}}


class VoiceAssistant:
    """The whole assistant: ``[wake] -> vad -> asr -> intent -> handle -> tts``.

    Args:
      asr: a :class:`~mani_jax.voice.asr.WhisperASR` (None: text input only, :meth:`respond_text`).
      recognizer: an :class:`~mani_jax.voice.nlu.IntentRecognizer`.
      host: a :class:`~mani_jax.voice.plugins.PluginHost`.
      wake: a :class:`~mani_jax.voice.wake.WakeWordDetector`, or None to treat all speech as commands.
      vad: the :class:`~mani_jax.voice.audio.EnergyVAD` (300 ms hangover by default).
      fallback: optional ``text -> reply`` for unrecognised text (a local LLM).
      early_ms: silence after which recognition starts speculatively (None: only after the hangover).
    """

    def __init__(self, *, asr, recognizer, host, wake=None, vad: EnergyVAD | None = None,
                 fallback: Callable[[str], str | None] | None = None, tts_options: dict | None = None,
                 early_ms: int | None = 100):
        self.asr_stage = AsrStage(asr) if asr is not None else None
        self.wake_stage = WakeStage(wake)
        self.vad_stage = VadStage(vad, early_ms=early_ms)
        self.intent_stage = IntentStage(recognizer)
        self.handle_stage = HandleStage(host, fallback)
        self.tts_stage = TtsStage(**(tts_options or {}))

    def warmup(self) -> float:
        """Load what the first turn would otherwise pay for (espeak-ng, the resampler, the recogniser's caches);
        compile the ASR separately with :meth:`WhisperASR.warmup`. Returns seconds spent."""
        t0 = _clock()
        tts.synthesize("नमस्ते", **self.tts_stage.options)
        self.intent_stage.recognizer.recognize("नमस्ते")
        return _clock() - t0

    def due_announcements(self) -> list[Turn]:
        """Timers and alarms that have finished (the ``timer`` plugin's :meth:`poll`), each as a spoken
        :class:`Turn` (``intent="timer_finished"``). :meth:`run` calls this once per second of audio."""
        timer = getattr(self.handle_stage.host, "plugins", {}).get("timer")
        if timer is None or not hasattr(timer, "poll"):
            return []
        turns = []
        for t in timer.poll():
            from .plugins.timer import describe_duration_hi

            text = (f"आपका {t.label} का अलार्म बज रहा है।" if t.kind == "alarm" and t.label else
                    "आपका अलार्म बज रहा है।" if t.kind == "alarm" else
                    f"आपका {describe_duration_hi(t.duration_s)} का टाइमर पूरा हो गया।")
            turn = Turn(intent="timer_finished", slots={"id": t.id, "kind": t.kind}, plugin="timer", ok=True)
            handled = Handled(text=text, context={"plugin": "timer", "ok": True}).event()
            turn.response = text
            turn.reply_audio = np.concatenate([chunk_audio(AudioChunk.from_event(e))
                                               for e in self.tts_stage.stream(handled) if AudioChunk.is_type(e.type)])
            turns.append(turn)
        return turns

    def reset(self):
        for s in (self.wake_stage, self.vad_stage, self.asr_stage):
            if s is not None:
                s.reset()

    # ------------------------------------------------------------------ text in

    def respond_text(self, text: str) -> Turn:
        """Skip the audio front end: ``text`` -> intent -> plugin -> spoken reply."""
        turn = Turn(transcript=text)
        turn.latency_ms["end_of_speech_to_first_audio"] = self._after_asr([Transcript(text=text).event()], turn)
        return turn

    # ------------------------------------------------------------------ audio in

    def run(self, chunks: Iterable[AudioChunk | Event], *, announce: bool = True) -> Iterator[Turn]:
        """Stream Wyoming ``AudioChunk``s (10 ms, 16 kHz) through the stages; yield a :class:`Turn` per command,
        and one per finished timer or alarm (:meth:`due_announcements`, checked every second of audio).
        Audio is processed as fast as it comes (a file is not slowed to real time)."""
        new_turn = lambda: Turn(wake_detected=False if self.wake_stage.detector is not None else None)  # noqa: E731
        turn, pending, early_events, early = new_turn(), None, None, None
        for i, c in enumerate(chunks):
            if announce and i % (1000 // FRAME_MS) == 0:  # once a second of audio: finished timers speak up
                yield from self.due_announcements()
            ev = c if isinstance(c, Event) else c.event()
            for e in self.wake_stage.handle(ev):
                if Detection.is_type(e.type):
                    turn.wake_detected = True
                    turn.events.append(f"detection@{Detection.from_event(e).timestamp}ms")
                for e2 in self.vad_stage.handle(e):
                    if VoiceStarted.is_type(e2.type):
                        turn.events.append(f"voice-started@{VoiceStarted.from_event(e2).timestamp}ms")
                    elif VoiceStopped.is_type(e2.type):
                        pending = []
                        turn.events.append(f"voice-stopped@{VoiceStopped.from_event(e2).timestamp}ms")
                        turn.latency_ms["vad_hangover"] = float(self.vad_stage.vad.hangover_ms)
                    elif pending is None and Transcribe.is_type(e2.type):  # an early cut begins
                        early_events = [e2]
                    elif pending is None and early_events is not None:
                        early_events.append(e2)
                        if AudioStop.is_type(e2.type):  # recognise now, while the hangover runs
                            early = self._recognize(early_events)
                            turn.events.append(f"early-cut@{AudioStop.from_event(e2).timestamp}ms")
                            early_events = None
                    elif pending is not None:  # transcribe, audio-start, the utterance's chunks, audio-stop
                        pending.append(e2)
                        if AudioStop.is_type(e2.type):
                            yield self._finish_utterance(pending, turn, early)
                            self.reset()
                            turn, pending, early = new_turn(), None, None

    def respond_audio(self, audio: np.ndarray, *, trailing_silence_s: float = 0.6) -> Turn:
        """One recording (16 kHz mono float32) -> the first :class:`Turn` found in it (wake word first when a
        detector is set). Silence is appended so the VAD can end the utterance. Raises ``ValueError`` when no
        command is found (no speech, or no wake word)."""
        audio = np.concatenate([np.asarray(audio, np.float32),
                                np.zeros(int(trailing_silence_s * SAMPLE_RATE), np.float32)])
        self.reset()
        for turn in self.run(chunk_events(audio), announce=False):
            return turn
        what = "wake word" if self.wake_stage.detector is not None and not self.wake_stage.awake else "speech end"
        raise ValueError(f"audio: no command found (no {what} detected in {len(audio) / SAMPLE_RATE:.1f} s)")

    # ------------------------------------------------------------------ the rest of a turn

    def _recognize(self, events: list[Event]) -> dict:
        """Run the ASR stage on ``transcribe`` + audio events; the transcripts, its timings and wall time."""
        t0 = _clock()
        transcripts = [e2 for e in events for e2 in (self.asr_stage.handle(e) if self.asr_stage else [])]
        timings = dict(self.asr_stage.last.timings_ms) if self.asr_stage and self.asr_stage.last else {}
        return {"transcripts": transcripts, "timings": timings, "wall_ms": 1e3 * (_clock() - t0)}

    def _finish_utterance(self, events: list[Event], turn: Turn, early: dict | None) -> Turn:
        """End of an utterance. Latency from the end of speech: with a valid early cut the ASR started
        ``early_ms`` after it and ran while the hangover elapsed, so post-processing starts at
        ``max(hangover, early_ms + asr)``; otherwise at ``hangover + asr``."""
        hangover = turn.latency_ms.get("vad_hangover", 0.0)
        ctx = Transcribe.from_event(events[0]).context or {} if events and Transcribe.is_type(events[0].type) else {}
        if early is not None and ctx.get("early_valid"):
            rec, start = early, float(self.vad_stage.early_ms)
        else:
            rec, start = self._recognize(events), hangover
        turn.latency_ms["asr"] = rec["wall_ms"]
        turn.latency_ms["asr_started_after_speech"] = start
        for k, v in rec["timings"].items():
            turn.latency_ms[f"asr_{k}"] = v
        transcripts = rec["transcripts"]
        turn.transcript = Transcript.from_event(transcripts[0]).text if transcripts else ""
        post = self._after_asr(transcripts, turn)
        ready = max(hangover, start + rec["wall_ms"])
        turn.latency_ms["end_of_speech_to_first_audio"] = ready + post
        return turn

    def _after_asr(self, transcripts: list[Event], turn: Turn) -> float:
        """Intent, plugin and speech for a transcript; fills ``turn``; returns ms to the first reply audio."""
        t0 = _clock()
        intents = [e2 for e in transcripts for e2 in self.intent_stage.handle(e)]
        t1 = _clock()
        handled = [e2 for e in intents for e2 in self.handle_stage.handle(e)]
        t2 = _clock()
        wy = next((WyIntent.from_event(e) for e in intents if WyIntent.is_type(e.type)), None)
        turn.intent, turn.slots = (wy.name, {e.name: e.value for e in wy.entities}) if wy else (None, {})
        h = Handled.from_event(handled[0])
        turn.response, turn.plugin, turn.ok = h.text, (h.context or {}).get("plugin"), bool((h.context or {}).get("ok"))
        audio, first = [], None
        for e in self.tts_stage.stream(handled[0]):
            if AudioChunk.is_type(e.type):
                if first is None:
                    first = _clock()
                audio.append(chunk_audio(AudioChunk.from_event(e)))
        turn.reply_audio = np.concatenate(audio) if audio else np.zeros(0, np.float32)
        turn.latency_ms["intent"] = 1e3 * (t1 - t0)
        turn.latency_ms["plugin"] = 1e3 * (t2 - t1)
        turn.latency_ms["tts_first_audio"] = 1e3 * ((first or _clock()) - t2)
        turn.latency_ms["tts_total"] = 1e3 * (_clock() - t2)
        post = 1e3 * ((first or _clock()) - t0)
        turn.latency_ms["after_asr"] = post
        return post
