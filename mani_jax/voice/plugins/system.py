"""System status plugin: CPU count and load, memory, disk space and uptime, spoken in Hindi.

Sources: ``os.cpu_count()``, ``os.getloadavg()``, ``/proc/meminfo`` (``MemTotal``/``MemAvailable``, Linux),
``shutil.disk_usage(ctx.config.get("disk_path", ctx.data_dir))`` and ``/proc/uptime``; a source that is
missing on the platform is left out of the reply. Intent ``VaaniSystemStatus`` with slot ``aspect``:
``all`` | ``cpu`` | ``memory`` | ``disk`` | ``uptime``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from mani_jax.voice.nlu import Intent
from mani_jax.voice.plugins import Plugin, Response
from mani_jax.voice.plugins.timer import describe_duration_hi

__all__ = ["SystemPlugin", "read_meminfo", "read_uptime"]

GIB = 1024**3


def read_meminfo(path: str | Path = "/proc/meminfo") -> dict[str, int]:
    """``/proc/meminfo`` as ``{field: bytes}``; empty when unreadable."""
    out: dict[str, int] = {}
    try:
        for line in Path(path).read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    except OSError:
        return {}
    return out


def read_uptime(path: str | Path = "/proc/uptime") -> float | None:
    """Seconds since boot from ``/proc/uptime``; ``None`` when unreadable."""
    try:
        return float(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _gb(n: float) -> str:
    return f"{n / GIB:.1f}".rstrip("0").rstrip(".")


class SystemPlugin(Plugin):
    """Machine health in Hindi."""

    name = "system"
    intents = ("VaaniSystemStatus",)

    def handle(self, intent: Intent) -> Response:
        aspect = intent.slots.get("aspect", "all")
        parts: list[str] = []
        data: dict = {}
        if aspect in ("all", "cpu"):
            cores = os.cpu_count() or 1
            data["cpu_count"] = cores
            text = f"प्रोसेसर में {cores} कोर हैं"
            try:
                load1 = os.getloadavg()[0]
                data["load1"] = load1
                text += f", पिछले एक मिनट का औसत लोड {load1:.1f} है, यानी लगभग {round(100 * load1 / cores)} प्रतिशत"
            except (OSError, AttributeError):
                pass
            parts.append(text)
        if aspect in ("all", "memory"):
            mem = read_meminfo()
            if "MemTotal" in mem:
                avail = mem.get("MemAvailable", mem.get("MemFree", 0))
                data.update(mem_total=mem["MemTotal"], mem_available=avail)
                parts.append(f"कुल {_gb(mem['MemTotal'])} जीबी मेमोरी में से {_gb(avail)} जीबी खाली है")
        if aspect in ("all", "disk"):
            path = self.ctx.config.get("disk_path", self.ctx.data_dir)
            try:
                usage = shutil.disk_usage(path)
                data.update(disk_total=usage.total, disk_free=usage.free)
                parts.append(f"डिस्क पर {_gb(usage.total)} जीबी में से {_gb(usage.free)} जीबी जगह खाली है")
            except OSError:
                pass
        if aspect in ("all", "uptime"):
            up = read_uptime()
            if up is not None:
                data["uptime_s"] = up
                shown = up // 60 * 60 if up < 86400 else up // 3600 * 3600
                days, rest = divmod(int(shown), 86400)
                spoken = (f"{days} दिन " if days else "") + (describe_duration_hi(rest) if rest or not days else "")
                parts.append(f"सिस्टम {spoken.strip()} से चल रहा है")
        if not parts:
            return self.reply("माफ़ कीजिए, सिस्टम की यह जानकारी उपलब्ध नहीं है।", ok=False, aspect=aspect)
        return self.reply("। ".join(parts) + "।", aspect=aspect, **data)
