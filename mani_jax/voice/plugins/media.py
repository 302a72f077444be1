"""Media plugin: a playlist over a local music folder, controlled by voice.

The folder is ``ctx.config["media_dir"]`` (scanned recursively for ``*.wav *.mp3 *.ogg *.flac``, sorted by
path). The plugin holds the player state (playlist, index, playing/paused, volume 0..100); producing sound
is left to whoever observes :attr:`MediaPlugin.state` (the pipeline, or nothing in tests).

Intents: VAANI's ``VaaniPlayMedia`` (optional ``query``: a word of the file name), ``VaaniMediaStop``;
HA's ``HassMediaPause``, ``HassMediaUnpause``, ``HassMediaNext``, ``HassMediaPrevious``,
``HassSetVolume`` (``volume`` 0..100), ``HassSetVolumeRelative`` (``direction`` up/down, 10 steps).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mani_jax.voice.nlu import Intent
from mani_jax.voice.plugins import Plugin, PluginContext, Response

__all__ = ["MediaPlugin", "PlayerState", "AUDIO_SUFFIXES"]

AUDIO_SUFFIXES = (".wav", ".mp3", ".ogg", ".flac")
VOLUME_STEP = 10


@dataclass
class PlayerState:
    """Player state: ``playlist`` of paths, ``index`` into it, ``playing``/``paused``, ``volume`` 0..100."""

    playlist: list[Path] = field(default_factory=list)
    index: int = 0
    playing: bool = False
    paused: bool = False
    volume: int = 50

    @property
    def current(self) -> Path | None:
        return self.playlist[self.index] if self.playlist else None


def _title(path: Path) -> str:
    return path.stem.replace("_", " ").replace("-", " ").strip()


class MediaPlugin(Plugin):
    """Play/pause/next/previous/volume over local audio files."""

    name = "media"
    intents = ("VaaniPlayMedia", "VaaniMediaStop", "HassMediaPause", "HassMediaUnpause", "HassMediaNext",
               "HassMediaPrevious", "HassSetVolume", "HassSetVolumeRelative")

    def __init__(self, ctx: PluginContext):
        super().__init__(ctx)
        self.state = PlayerState()
        self.rescan()

    def rescan(self) -> int:
        """Rebuild the playlist from ``ctx.config["media_dir"]``; return the number of files."""
        folder = self.ctx.config.get("media_dir")
        files: list[Path] = []
        if folder and Path(folder).is_dir():
            files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
        self.state.playlist = files
        self.state.index = min(self.state.index, max(0, len(files) - 1))
        return len(files)

    def handle(self, intent: Intent) -> Response:
        st = self.state
        if intent.name in ("HassSetVolume", "HassSetVolumeRelative"):
            if intent.name == "HassSetVolume":
                st.volume = max(0, min(100, int(round(float(intent.slots.get("volume", st.volume))))))
            else:
                step = VOLUME_STEP if intent.slots.get("direction", "up") == "up" else -VOLUME_STEP
                st.volume = max(0, min(100, st.volume + step))
            return self.reply(f"आवाज़ {st.volume} प्रतिशत कर दी।", volume=st.volume)
        if not st.playlist and not self.rescan():
            return self.reply("माफ़ कीजिए, संगीत के फ़ोल्डर में कोई गाना नहीं मिला।", ok=False, error="no_media")
        if intent.name == "VaaniPlayMedia":
            query = str(intent.slots.get("query", "")).strip().casefold()
            if query:
                matches = [i for i, p in enumerate(st.playlist) if query in p.stem.casefold()]
                if not matches:
                    return self.reply(f"माफ़ कीजिए, {intent.slots['query']} नाम का गाना नहीं मिला।", ok=False,
                                      error="not_found")
                st.index = matches[0]
            st.playing, st.paused = True, False
            return self._now_playing("चला रही हूँ")
        if intent.name == "VaaniMediaStop":
            st.playing, st.paused = False, False
            return self.reply("गाना बंद कर दिया।", playing=False)
        if intent.name == "HassMediaPause":
            if not st.playing or st.paused:
                return self.reply("अभी कोई गाना नहीं चल रहा है।", ok=False, error="not_playing")
            st.paused = True
            return self.reply("गाना रोक दिया।", paused=True, track=str(st.current))
        if intent.name == "HassMediaUnpause":
            st.playing, st.paused = True, False
            return self._now_playing("फिर से चला रही हूँ")
        step = 1 if intent.name == "HassMediaNext" else -1
        st.index = (st.index + step) % len(st.playlist)
        st.playing, st.paused = True, False
        return self._now_playing("अगला गाना" if step == 1 else "पिछला गाना")

    def _now_playing(self, prefix: str) -> Response:
        st = self.state
        return self.reply(f"{prefix}: {_title(st.current)}।", track=str(st.current), index=st.index,
                          playing=st.playing, paused=st.paused)
