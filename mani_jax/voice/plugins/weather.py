"""Weather plugin: answers ``HassGetWeather`` from a local cache file, never the network.

Cache schema (``ctx.data_dir / "weather.json"``, written by whatever fetches weather when online)::

    {
      "दिल्ली": {"temp_c": 31.5, "condition_hi": "धूप", "humidity": 40, "updated": "2025-03-14T09:00:00"},
      "मुंबई":  {...}
    }

Keys are city names as the ``vaani_city`` list outputs them (Hindi); matching also ignores case and
surrounding spaces. ``temp_c`` in °C, ``humidity`` in percent (optional), ``updated`` an ISO-8601 local time.
The city is the ``city`` slot, else ``ctx.config["default_city"]``, else the only city in the cache.
Data older than ``ctx.config.get("weather_max_age_h", 6)`` hours is reported with its age; a missing or
corrupt cache gives a polite "unavailable" reply (``ok=False``).
"""
from __future__ import annotations

import json
import math
from datetime import datetime

from mani_jax.voice.nlu import Intent
from mani_jax.voice.plugins import Plugin, Response
from mani_jax.voice.plugins.timer import describe_duration_hi

__all__ = ["WeatherPlugin", "load_weather_cache"]


def load_weather_cache(path) -> dict[str, dict]:
    """Read and validate the cache at ``path``.

    Raises:
        FileNotFoundError: if the file is missing.
        ValueError: if it is not JSON or an entry lacks a numeric ``temp_c`` or an ISO ``updated``.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"weather cache {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"weather cache {path} must be a JSON object of city -> entry")
    for city, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("temp_c"), (int, float)) \
                or not math.isfinite(entry["temp_c"]):
            raise ValueError(f"weather cache entry {city!r} needs a numeric temp_c")
        datetime.fromisoformat(str(entry.get("updated")))  # raises ValueError
    return data


class WeatherPlugin(Plugin):
    """Spoken weather from the cached report."""

    name = "weather"
    intents = ("HassGetWeather",)

    def handle(self, intent: Intent) -> Response:
        path = self.ctx.data_dir / "weather.json"
        try:
            cache = load_weather_cache(path)
        except FileNotFoundError:
            return self.reply("माफ़ कीजिए, अभी मौसम की जानकारी उपलब्ध नहीं है।", ok=False, error="no_cache")
        except ValueError:
            return self.reply("माफ़ कीजिए, मौसम की जानकारी पढ़ी नहीं जा सकी।", ok=False, error="corrupt_cache")
        city = intent.slots.get("city") or self.ctx.config.get("default_city")
        if city is None and len(cache) == 1:
            city = next(iter(cache))
        entry = None
        if city is not None:
            wanted = str(city).strip().casefold()
            entry = next((v for k, v in cache.items() if k.strip().casefold() == wanted), None)
        if entry is None:
            where = f"{city} के" if city else "आपके शहर के"
            return self.reply(f"माफ़ कीजिए, {where} मौसम की जानकारी उपलब्ध नहीं है।", ok=False, error="no_city")
        updated = datetime.fromisoformat(str(entry["updated"]))
        now = self.ctx.now()
        if updated.tzinfo is not None and now.tzinfo is None:
            updated = updated.replace(tzinfo=None)
        age_s = max(0.0, (now - updated).total_seconds())
        temp = round(float(entry["temp_c"]))
        text = f"{city} में तापमान {temp} डिग्री सेल्सियस है"
        if entry.get("condition_hi"):
            text += f", मौसम {entry['condition_hi']} है"
        if isinstance(entry.get("humidity"), (int, float)):
            text += f", नमी {round(entry['humidity'])} प्रतिशत"
        text += "।"
        max_age_h = float(self.ctx.config.get("weather_max_age_h", 6))
        stale = age_s > max_age_h * 3600
        if stale:
            age = describe_duration_hi(age_s // 3600 * 3600) if age_s < 2 * 86400 else f"{int(age_s // 86400)} दिन"
            text = f"यह जानकारी {age} पुरानी है। " + text
        return self.reply(text, city=city, temp_c=float(entry["temp_c"]), stale=stale, age_s=age_s)
