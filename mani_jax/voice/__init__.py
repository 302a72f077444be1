"""VAANI: an offline, Hindi-first voice assistant (wake word -> ASR -> understanding -> plugins -> TTS).

Stages exchange Wyoming-protocol events (``wyoming.audio.AudioChunk``, ``wyoming.wake.Detection``,
``wyoming.vad.VoiceStopped``, ``wyoming.asr.Transcript``, ``wyoming.intent.Intent``, ``wyoming.handle.Handled``,
``wyoming.tts.Synthesize``) inside one process. See docs/vaani.md.
"""
