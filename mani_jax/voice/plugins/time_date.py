"""Time and date plugin: HA intents ``HassGetCurrentTime`` and ``HassGetCurrentDate``.

Times are spoken the Hindi way ("दोपहर के 3 बजकर 5 मिनट"); dates and weekdays come from Babel's CLDR Hindi
data (``babel.dates.format_date(..., format="full", locale="hi")`` -> "शुक्रवार, 14 मार्च 2025").
The clock is ``ctx.now`` (injectable).
"""
from __future__ import annotations

from datetime import datetime

from babel.dates import format_date, format_time

from mani_jax.voice.nlu import Intent
from mani_jax.voice.plugins import Plugin, Response

__all__ = ["TimeDatePlugin", "day_period_hi", "spoken_time_hi"]


def day_period_hi(hour: int) -> str:
    """Hindi part of day for a 24-hour ``hour``: सुबह (4-11), दोपहर (12-15), शाम (16-19), रात (20-3)."""
    if 4 <= hour < 12:
        return "सुबह"
    if 12 <= hour < 16:
        return "दोपहर"
    if 16 <= hour < 20:
        return "शाम"
    return "रात"


def spoken_time_hi(moment: datetime) -> str:
    """"दोपहर के 3 बजकर 5 मिनट" / "सुबह के 7 बजे" for ``moment`` (12-hour clock with the part of day)."""
    hour12 = moment.hour % 12 or 12
    period = day_period_hi(moment.hour)
    if moment.minute == 0:
        return f"{period} के {hour12} बजे"
    return f"{period} के {hour12} बजकर {moment.minute} मिनट"


class TimeDatePlugin(Plugin):
    """Current time, date and weekday in Hindi."""

    name = "time"
    intents = ("HassGetCurrentTime", "HassGetCurrentDate")

    def handle(self, intent: Intent) -> Response:
        now = self.ctx.now()
        if intent.name == "HassGetCurrentTime":
            text = f"अभी {spoken_time_hi(now)}{' हैं' if now.minute == 0 else ' हुए हैं'}।"
            return self.reply(text, time=format_time(now, format="short", locale="hi"), hour=now.hour,
                              minute=now.minute)
        full = format_date(now, format="full", locale="hi")
        weekday = format_date(now, format="EEEE", locale="hi")
        return self.reply(f"आज {full} है।", date=now.date().isoformat(), weekday=weekday, formatted=full)
