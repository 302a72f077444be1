"""VAANI, the offline Hindi voice assistant: answer one command, listen on a microphone, or benchmark.

  python -m experiments.vaani --wav IN.wav            # a recorded command -> transcript, intent, reply WAV
  python -m experiments.vaani --wav IN.wav --wake     # the recording starts with the wake phrase "हे वाणी"
  python -m experiments.vaani --text "अभी कितने बजे हैं"   # skip ASR
  python -m experiments.vaani --mic                   # live (needs the optional sounddevice package)
  python -m experiments.vaani --benchmark             # espeak-ng commands in held-out voices: accuracy, latency

Every mode runs with internet sockets refused (``mani_jax.voice.offline``) unless ``--allow-network``.
The benchmark synthesises each command of ``IntentRecognizer.benchmark_commands()`` with an espeak-ng voice
variant and speed held out from wake-word training, after the wake phrase, with light noise, streams it through
the whole pipeline and reports the wake-word detection rate, transcript and intent accuracy, and the latency from
end of speech to first reply audio (median, p90) per stage, against the 800 ms target. Writes ``benchmark.json``
and ``latency.png`` under ``--out``. The audio is synthetic: it measures plumbing and latency, not Hindi ASR
accuracy on human speech (docs/vaani.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from experiments.common import write_json_atomic

TARGET_MS = 800.0


def build(args, *, wake: bool):
    """The assistant and the time each part took to load/compile (seconds)."""
    from mani_jax.voice.asr import load_asr
    from mani_jax.voice.audio import EnergyVAD
    from mani_jax.voice.nlu import IntentRecognizer
    from mani_jax.voice.pipeline import VoiceAssistant, command_grammar
    from mani_jax.voice.plugins import PluginHost

    t = {}
    t0 = time.perf_counter()
    rec = IntentRecognizer()
    t["nlu_load_s"] = time.perf_counter() - t0
    fallback = None
    if args.llm_gguf:
        from mani_jax.voice.plugins.llm import LLMFallback
        fallback = LLMFallback(args.llm_gguf)
    host = PluginHost(args.data_dir, config={"media_dir": args.media_dir} if args.media_dir else None,
                      fallback=fallback)
    asr = None
    if not args.text:
        t0 = time.perf_counter()
        grammar = None if args.free else command_grammar(rec)
        asr = load_asr(args.whisper, grammar=grammar, beam_size=args.beam_size,
                       beam_depth=args.beam_depth or None, windows_s=args.windows)
        t["asr_load_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        asr.warmup()
        t["asr_compile_s"] = time.perf_counter() - t0
        if grammar is not None:
            t["grammar_sentences"] = len(grammar)
    detector = None
    if wake:
        from mani_jax.voice.wake import WakeWordDetector, load_wake_model
        t0 = time.perf_counter()
        kw = {} if args.wake_threshold is None else {"threshold": args.wake_threshold}
        detector = WakeWordDetector(load_wake_model(args.wake_model), **kw)
        t["wake_load_s"] = time.perf_counter() - t0
    assistant = VoiceAssistant(asr=asr, recognizer=rec, host=host, wake=detector,
                               vad=EnergyVAD(hangover_ms=args.hangover_ms), fallback=fallback,
                               early_ms=args.early_ms or None)
    t["warmup_s"] = assistant.warmup()
    return assistant, rec, t


def print_turn(turn, out_wav: Path | None):
    print(f"transcript : {turn.transcript}")
    print(f"intent     : {turn.intent} {json.dumps(turn.slots, ensure_ascii=False) if turn.slots else ''}")
    print(f"plugin     : {turn.plugin}")
    print(f"response   : {turn.response}")
    if out_wav is not None:
        print(f"reply audio: {out_wav} ({len(turn.reply_audio) / 16000:.2f} s)")
    print("latency (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in turn.latency_ms.items()))


def cmd_single(args):
    from mani_jax.voice.audio import read_wav, write_wav

    assistant, _, load = build(args, wake=args.wake)
    print("start-up: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in load.items()))
    if args.text:
        turn = assistant.respond_text(args.text)
    else:
        turn = assistant.respond_audio(read_wav(args.wav))
    out = write_wav(args.reply, turn.reply_audio) if turn.reply_audio is not None and turn.reply_audio.size else None
    print_turn(turn, out)
    return turn


def cmd_mic(args):  # pragma: no cover - needs a microphone
    from mani_jax.voice.audio import microphone_chunks

    assistant, _, _ = build(args, wake=not args.no_wake)
    import sounddevice as sd
    print("listening (say 'हे वाणी' and a command; Ctrl-C to stop)")
    for turn in assistant.run(microphone_chunks()):  # commands, and timers/alarms as they finish
        print_turn(turn, None)
        sd.play(turn.reply_audio, 16000, blocking=True)


# ---------------------------------------------------------------------------------------------- benchmark


def _slots_match(expected: dict, got: dict) -> bool:
    for k, v in expected.items():
        if k not in got:
            return False
        g = got[k]
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            try:
                if abs(float(g) - float(v)) > 1e-9:
                    return False
            except (TypeError, ValueError):
                return False
        elif str(g).strip() != str(v).strip():
            return False
    return True


def _noise(rng, n, snr_db, ref):
    p = float(np.mean(ref ** 2)) / (10 ** (snr_db / 10))
    return rng.normal(0.0, np.sqrt(p), n).astype(np.float32)


def synth_command(text, *, variant, speed, pitch, wake_phrase, rng, snr_db=30.0):
    """[0.3 s silence][wake phrase][0.5 s][command][0.2 s] at 16 kHz with white noise at ``snr_db``."""
    from mani_jax.voice import tts

    sil = lambda s: np.zeros(int(s * 16000), np.float32)  # noqa: E731
    cmd = tts.synthesize(text, variant=variant, speed=speed, pitch=pitch)
    parts = [sil(0.3)]
    if wake_phrase:
        parts += [tts.synthesize(wake_phrase, variant=variant, speed=speed, pitch=pitch), sil(0.5)]
    audio = np.concatenate(parts + [cmd, sil(0.2)])
    return audio + _noise(rng, audio.size, snr_db, cmd), cmd.size / 16000


def cmd_benchmark(args):
    from mani_jax.voice import wake as wk

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    assistant, rec, load = build(args, wake=True)
    no_wake = type(assistant)(asr=assistant.asr_stage.asr, recognizer=rec, host=assistant.handle_stage.host,
                              wake=None, vad=type(assistant.vad_stage.vad)(hangover_ms=args.hangover_ms),
                              early_ms=args.early_ms or None)
    commands = rec.benchmark_commands()
    if args.n:
        commands = commands[: args.n]
    rng = np.random.default_rng(args.seed)
    rows = []
    print(f"{len(commands)} commands, held-out voices {len(wk.HELDOUT_VARIANTS)} x speeds {wk.HELDOUT_SPEEDS}; "
          f"start-up {json.dumps({k: round(v, 2) for k, v in load.items()})}", flush=True)
    for i, (text, intent, slots) in enumerate(commands):
        variant = wk.HELDOUT_VARIANTS[i % len(wk.HELDOUT_VARIANTS)]
        speed = wk.HELDOUT_SPEEDS[i % len(wk.HELDOUT_SPEEDS)]
        pitch = int(rng.integers(30, 71))
        audio, dur = synth_command(text, variant=variant, speed=speed, pitch=pitch, wake_phrase=wk.WAKE_PHRASE,
                                   rng=rng, snr_db=args.snr_db)
        try:
            turn = assistant.respond_audio(audio)
        except ValueError:  # the wake word was missed: measure the command on its own
            turn = None
        woke = turn is not None and bool(turn.wake_detected)
        if turn is None:
            cmd_audio, _ = synth_command(text, variant=variant, speed=speed, pitch=pitch, wake_phrase=None,
                                         rng=rng, snr_db=args.snr_db)
            turn = no_wake.respond_audio(cmd_audio)
        text_intent = rec.recognize(text)
        row = dict(text=text, expected_intent=intent, expected_slots=slots, variant=variant, speed=speed,
                   pitch=pitch, command_s=round(dur, 2), wake_detected=woke, transcript=turn.transcript,
                   transcript_exact=turn.transcript == text, intent=turn.intent, slots=turn.slots,
                   intent_correct=turn.intent == intent and _slots_match(slots, turn.slots),
                   text_intent_correct=(text_intent is not None and text_intent.name == intent
                                        and _slots_match(slots, text_intent.slots)),
                   response=turn.response, plugin=turn.plugin, latency_ms=turn.latency_ms)
        rows.append(row)
        print(f"[{i + 1:3d}/{len(commands)}] wake={'y' if woke else 'N'} "
              f"{'ok ' if row['intent_correct'] else 'BAD'} {turn.latency_ms['end_of_speech_to_first_audio']:6.0f} ms "
              f"| {text} -> {turn.transcript} -> {turn.intent}", flush=True)
    summary = summarize(rows, load, args)
    write_json_atomic(out_dir / "benchmark.json", {"summary": summary, "rows": rows})
    plot_latency(rows, out_dir / "latency.png")
    print_summary(summary)
    print(f"wrote {out_dir / 'benchmark.json'} and {out_dir / 'latency.png'}")
    return summary


STAGES = ("vad_hangover", "asr_started_after_speech", "asr_features", "asr_encode", "asr_decode", "asr", "intent",
          "plugin", "tts_first_audio", "after_asr")


def summarize(rows, load, args) -> dict:
    n = len(rows)
    lat = lambda k: np.array([r["latency_ms"].get(k, 0.0) for r in rows])  # noqa: E731
    total = lat("end_of_speech_to_first_audio")
    per_intent = {}
    for r in rows:
        d = per_intent.setdefault(r["expected_intent"], [0, 0])
        d[0] += r["intent_correct"]
        d[1] += 1
    return {
        "audio": "synthetic (espeak-ng 'hi', voice variants and speeds held out from wake-word training, "
                 f"white noise at {args.snr_db} dB SNR)",
        "n_commands": n,
        "wake_detection_rate": float(np.mean([r["wake_detected"] for r in rows])),
        "intent_accuracy": float(np.mean([r["intent_correct"] for r in rows])),
        "intent_accuracy_from_text": float(np.mean([r["text_intent_correct"] for r in rows])),
        "transcript_exact_match": float(np.mean([r["transcript_exact"] for r in rows])),
        "per_intent_accuracy": {k: f"{c}/{t}" for k, (c, t) in sorted(per_intent.items())},
        "latency_ms": {k: {"median": float(np.median(lat(k))), "p90": float(np.percentile(lat(k), 90))}
                       for k in STAGES + ("end_of_speech_to_first_audio",)},
        # The same turns had recognition waited for the hangover (no early cut): hangover + ASR + after ASR.
        "end_of_speech_to_first_audio_without_early_cut_ms": {
            "median": float(np.median(lat("vad_hangover") + lat("asr") + lat("after_asr"))),
            "p90": float(np.percentile(lat("vad_hangover") + lat("asr") + lat("after_asr"), 90))},
        "target_ms": TARGET_MS,
        "meets_target": bool(np.median(total) < TARGET_MS),
        "startup": load,
        "wake_threshold": assistant_threshold(args),
        "asr": {"decoding": "free greedy" if args.free else
                f"grammar-constrained beam {args.beam_size} over the first {args.beam_depth or 'all'} tokens",
                "windows_s": list(args.windows)},
        "machine": f"{os.cpu_count()} CPUs, {sys.platform}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "network": "refused (forbid_network)" if not args.allow_network else "allowed",
    }


def assistant_threshold(args):
    from mani_jax.voice.wake import WakeWordDetector
    import inspect
    return args.wake_threshold or inspect.signature(WakeWordDetector).parameters["threshold"].default


def print_summary(s):
    print(f"\nVAANI benchmark: {s['n_commands']} commands, {s['audio']}")
    print(f"  wake-word detection rate : {100 * s['wake_detection_rate']:.1f}%")
    print(f"  intent accuracy          : {100 * s['intent_accuracy']:.1f}% "
          f"(from the command text itself: {100 * s['intent_accuracy_from_text']:.1f}%)")
    print(f"  transcript exact match   : {100 * s['transcript_exact_match']:.1f}%")
    print(f"  {'stage':32s} {'median ms':>10s} {'p90 ms':>10s}")
    for k, v in s["latency_ms"].items():
        print(f"  {k:32s} {v['median']:10.1f} {v['p90']:10.1f}")
    w = s["end_of_speech_to_first_audio_without_early_cut_ms"]
    print(f"  (without the early cut, from the same stage times: median {w['median']:.0f}, p90 {w['p90']:.0f})")
    verdict = "meets" if s["meets_target"] else "MISSES"
    print(f"  end of speech -> first audio: median {s['latency_ms']['end_of_speech_to_first_audio']['median']:.0f} ms "
          f"{verdict} the {s['target_ms']:.0f} ms target")


def plot_latency(rows, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in STAGES if k != "asr_started_after_speech"]
    med = [np.median([r["latency_ms"].get(k, 0.0) for r in rows]) for k in keys]
    p90 = [np.percentile([r["latency_ms"].get(k, 0.0) for r in rows], 90) for k in keys]
    total = np.array([r["latency_ms"]["end_of_speech_to_first_audio"] for r in rows])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    y = np.arange(len(keys))
    a.barh(y, med, xerr=[np.zeros(len(keys)), np.subtract(p90, med)], capsize=2)
    a.set_yticks(y, keys, fontsize=8)
    a.invert_yaxis()
    a.set_xlabel("ms (median, bar to p90)")
    a.set_title("per stage (recognition overlaps the hangover)", fontsize=9)
    b.hist(total, bins=20)
    b.axvline(TARGET_MS, color="k", ls="--", lw=1, label=f"{TARGET_MS:.0f} ms target")
    b.axvline(np.median(total), color="r", lw=1, label=f"median {np.median(total):.0f} ms")
    b.set_xlabel("end of speech -> first audio (ms), synthetic espeak-ng audio")
    b.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.vaani", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--wav", type=Path, help="a 16-bit PCM WAV with one spoken command (any rate, resampled)")
    mode.add_argument("--text", help="a Hindi command as text (skips the audio front end and ASR)")
    mode.add_argument("--mic", action="store_true", help="listen on the default microphone (sounddevice)")
    mode.add_argument("--benchmark", action="store_true", help="espeak-ng benchmark of accuracy and latency")
    p.add_argument("--wake", action="store_true", help="--wav: the recording starts with the wake phrase")
    p.add_argument("--no-wake", action="store_true", help="--mic: treat all speech as commands")
    p.add_argument("--reply", type=Path, default=Path("runs/vaani/reply.wav"), help="where the reply WAV goes")
    p.add_argument("--out", type=Path, default=Path("runs/vaani"), help="benchmark output directory")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("VAANI_DATA", "runs/vaani/data")),
                   help="plugin state (notes database, weather cache, media)")
    p.add_argument("--media-dir", type=Path, default=None, help="local music for the media plugin")
    p.add_argument("--whisper", default=None, help="a Hugging Face Whisper directory (default: the whisper-base "
                                                   "extra's CTranslate2 weights)")
    p.add_argument("--free", action="store_true", help="free Whisper decoding instead of the command grammar")
    p.add_argument("--beam-size", type=int, default=4, help="constrained beam width (1: greedy)")
    p.add_argument("--beam-depth", type=int, default=10, help="tokens searched with the beam before the best "
                                                               "hypothesis continues greedily (0: beam to the end)")
    p.add_argument("--windows", type=float, nargs="+", default=[5.0, 10.0],
                   help="encoder windows (s) compiled at start-up; an utterance takes the smallest that holds it")
    p.add_argument("--hangover-ms", type=int, default=300, help="VAD silence that ends an utterance")
    p.add_argument("--early-ms", type=int, default=100, help="silence after which recognition starts while the "
                                                              "hangover runs (0: only after the hangover)")
    p.add_argument("--wake-model", default=None, help="wake-word weights (.npz; default: the shipped model)")
    p.add_argument("--wake-threshold", type=float, default=None,
                   help="wake-word probability threshold (default: the detector's, 0.8)")
    p.add_argument("--llm-gguf", default=None, help="a chat GGUF for open questions (llama-cpp-python)")
    p.add_argument("--n", type=int, default=0, help="benchmark: only the first N commands")
    p.add_argument("--snr-db", type=float, default=30.0, help="benchmark: white-noise SNR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-network", action="store_true", help="do not refuse internet sockets")
    args = p.parse_args(argv)
    if args.wav is not None and not args.wav.is_file():
        p.error(f"--wav: no such file {args.wav}")
    if args.beam_size < 1:
        p.error(f"--beam-size must be >= 1, got {args.beam_size}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not args.allow_network:
        from mani_jax.voice.offline import forbid_network
        forbid_network()
    if args.benchmark:
        return cmd_benchmark(args)
    if args.mic:
        return cmd_mic(args)
    return cmd_single(args)


if __name__ == "__main__":
    main()
