"""Timer and alarm plugin.

Intents: HA's ``HassStartTimer`` (slots ``hours``/``minutes``/``seconds``, from hi.json), ``HassCancelTimer``
(optional ``start_hours``/``start_minutes``/``start_seconds``), ``HassCancelAllTimers``, ``HassTimerStatus``,
``HassPauseTimer``, ``HassUnpauseTimer``; VAANI's ``VaaniSetAlarm`` (``hour`` as a float, 7.5 = 7:30,
optional ``minute`` and ``period`` morning/afternoon/evening/night) and ``VaaniCancelAlarm``.

Deadlines are on the monotonic clock ``ctx.monotonic`` (injectable; seconds). Alarms are converted from the
wall clock ``ctx.now`` to a monotonic deadline when set. Nothing fires by itself unless :meth:`TimerPlugin.start`
runs the polling thread; :meth:`TimerPlugin.poll` fires due timers (callers may call it from their own loop).
Callbacks registered with :meth:`TimerPlugin.add_listener` receive the finished :class:`Timer`.
"""
from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable

from mani_jax.voice.nlu import Intent
from mani_jax.voice.plugins import Plugin, PluginContext, Response
from mani_jax.voice.plugins.time_date import spoken_time_hi

__all__ = ["TimerPlugin", "Timer", "describe_duration_hi", "alarm_datetime"]

log = logging.getLogger(__name__)


@dataclass
class Timer:
    """One timer or alarm. ``deadline`` is on ``ctx.monotonic``; ``remaining`` is set while paused."""

    id: int
    kind: str  # "timer" | "alarm"
    duration_s: float
    deadline: float
    label: str
    remaining: float | None = None  # seconds left when paused

    @property
    def paused(self) -> bool:
        return self.remaining is not None


def describe_duration_hi(seconds: float) -> str:
    """"1 घंटे 30 मिनट", "45 सेकंड" for a duration in seconds (rounded to whole seconds)."""
    total = max(0, int(round(seconds)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    parts = []
    if hours:
        parts.append(f"{hours} घंटे")
    if minutes:
        parts.append(f"{minutes} मिनट")
    if secs or not parts:
        parts.append(f"{secs} सेकंड")
    return " ".join(parts)


def alarm_datetime(now: datetime, hour: float, minute: int | None = None, period: str | None = None) -> datetime:
    """Next wall-clock moment (after ``now``) for a spoken alarm time.

    ``hour`` may carry a fraction (7.5 = 7:30, 6.75 = 6:45); ``period`` (morning/afternoon/evening/night)
    picks AM/PM; without it the nearest upcoming of the two 12-hour readings is used.

    Raises:
        ValueError: if ``hour`` is outside 0..24, ``minute`` outside 0..59, or ``period`` is unknown.
    """
    if not 0 <= hour < 24:
        raise ValueError(f"hour must be in [0, 24), got {hour}")
    if minute is not None and not 0 <= minute <= 59:
        raise ValueError(f"minute must be in 0..59, got {minute}")
    if period not in (None, "morning", "afternoon", "evening", "night"):
        raise ValueError(f"period must be morning/afternoon/evening/night, got {period!r}")
    whole = int(hour)
    mins = int(round((hour - whole) * 60)) + (minute or 0)
    if period == "morning":
        candidates = [whole % 12]
    elif period in ("afternoon", "evening"):
        candidates = [whole if whole >= 12 else whole + 12]
    elif period == "night":
        candidates = [whole + 12 if 6 <= whole < 12 else whole % 12 if whole == 12 else whole]
    else:
        candidates = [whole] if whole >= 12 or whole == 0 else [whole, whole + 12]
    best = None
    for h in candidates:
        moment = now.replace(hour=h % 24, minute=0, second=0, microsecond=0) + timedelta(minutes=mins)
        if moment <= now:
            moment += timedelta(days=1)
        if best is None or moment < best:
            best = moment
    return best


class TimerPlugin(Plugin):
    """Countdown timers and clock alarms held in memory."""

    name = "timer"
    intents = ("HassStartTimer", "HassCancelTimer", "HassCancelAllTimers", "HassTimerStatus",
               "HassPauseTimer", "HassUnpauseTimer", "VaaniSetAlarm", "VaaniCancelAlarm")

    def __init__(self, ctx: PluginContext):
        super().__init__(ctx)
        self.timers: list[Timer] = []
        self._ids = itertools.count(1)
        self._listeners: list[Callable[[Timer], None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------- firing
    def add_listener(self, callback: Callable[[Timer], None]) -> None:
        """Call ``callback(timer)`` whenever a timer or alarm finishes."""
        self._listeners.append(callback)

    def poll(self) -> list[Timer]:
        """Fire (remove and notify) every running timer whose deadline has passed; return them."""
        now = self.ctx.monotonic()
        with self._lock:
            due = [t for t in self.timers if not t.paused and t.deadline <= now]
            self.timers = [t for t in self.timers if t not in due]
        for timer in due:
            for callback in list(self._listeners):
                try:
                    callback(timer)
                except Exception:  # noqa: BLE001 - a listener must not break the timer loop
                    log.exception("timer listener failed")
        return due

    def start(self, interval_s: float = 0.25) -> None:
        """Run :meth:`poll` every ``interval_s`` seconds on a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval_s):
                self.poll()

        self._thread = threading.Thread(target=loop, name="vaani-timers", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the polling thread (timers are kept)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    # ---------------------------------------------------------------------------- intents
    def handle(self, intent: Intent) -> Response:
        handler = {
            "HassStartTimer": self._start_timer, "HassCancelTimer": self._cancel,
            "HassCancelAllTimers": self._cancel_all, "HassTimerStatus": self._status,
            "HassPauseTimer": self._pause, "HassUnpauseTimer": self._unpause,
            "VaaniSetAlarm": self._set_alarm, "VaaniCancelAlarm": self._cancel_alarms,
        }[intent.name]
        return handler(intent)

    @staticmethod
    def _seconds(slots: dict, prefix: str = "") -> float:
        return (float(slots.get(prefix + "hours", 0) or 0) * 3600 + float(slots.get(prefix + "minutes", 0) or 0) * 60
                + float(slots.get(prefix + "seconds", 0) or 0))

    def _running(self, kind: str = "timer") -> list[Timer]:
        return [t for t in self.timers if t.kind == kind]

    def _remaining(self, timer: Timer) -> float:
        return timer.remaining if timer.paused else max(0.0, timer.deadline - self.ctx.monotonic())

    def _start_timer(self, intent: Intent) -> Response:
        seconds = self._seconds(intent.slots)
        if seconds <= 0:
            return self.reply("टाइमर कितनी देर का लगाऊँ? जैसे, पाँच मिनट का टाइमर लगाओ।", ok=False,
                              error="no_duration")
        if seconds > 24 * 3600:
            return self.reply("माफ़ कीजिए, मैं 24 घंटे से लंबा टाइमर नहीं लगा सकती।", ok=False, error="too_long")
        label = describe_duration_hi(seconds)
        timer = Timer(next(self._ids), "timer", seconds, self.ctx.monotonic() + seconds, label)
        with self._lock:
            self.timers.append(timer)
        return self.reply(f"{label} का टाइमर लगा दिया।", timer_id=timer.id, seconds=seconds)

    def _find(self, intent: Intent) -> Timer | None:
        timers = self._running("timer")
        wanted = self._seconds(intent.slots, "start_")
        if wanted:
            timers = [t for t in timers if abs(t.duration_s - wanted) < 1]
        return timers[-1] if timers else None

    def _cancel(self, intent: Intent) -> Response:
        timer = self._find(intent)
        if timer is None:
            return self.reply("कोई टाइमर नहीं चल रहा है।", ok=False, error="no_timer")
        with self._lock:
            self.timers.remove(timer)
        return self.reply(f"{timer.label} का टाइमर बंद कर दिया।", timer_id=timer.id)

    def _drop(self, kind: str) -> int:
        """Remove every timer (``kind="timer"``) or alarm (``"alarm"``); return how many were running."""
        with self._lock:
            count = len(self._running(kind))
            self.timers = [t for t in self.timers if t.kind != kind]
        return count

    def _cancel_all(self, intent: Intent) -> Response:
        count = self._drop("timer")
        if not count:
            return self.reply("कोई टाइमर नहीं चल रहा है।", ok=False, error="no_timer")
        return self.reply(f"सारे {count} टाइमर बंद कर दिए।" if count > 1 else "टाइमर बंद कर दिया।", count=count)

    def _status(self, intent: Intent) -> Response:
        timers = self._running("timer")
        if not timers:
            return self.reply("अभी कोई टाइमर नहीं चल रहा है।", count=0)
        parts = []
        for t in timers:
            state = " (रुका हुआ)" if t.paused else ""
            parts.append(f"{t.label} वाले टाइमर में {describe_duration_hi(self._remaining(t))} बाकी हैं{state}")
        return self.reply("। ".join(parts) + "।", count=len(timers),
                          remaining=[round(self._remaining(t), 3) for t in timers])

    def _pause(self, intent: Intent) -> Response:
        timer = self._find(intent)
        if timer is None or timer.paused:
            return self.reply("कोई चलता हुआ टाइमर नहीं है।", ok=False, error="no_timer")
        timer.remaining = max(0.0, timer.deadline - self.ctx.monotonic())
        return self.reply("टाइमर रोक दिया।", timer_id=timer.id)

    def _unpause(self, intent: Intent) -> Response:
        paused = [t for t in self._running("timer") if t.paused]
        if not paused:
            return self.reply("कोई रुका हुआ टाइमर नहीं है।", ok=False, error="no_timer")
        timer = paused[-1]
        timer.deadline = self.ctx.monotonic() + timer.remaining
        timer.remaining = None
        return self.reply("टाइमर फिर से चालू कर दिया।", timer_id=timer.id)

    def _set_alarm(self, intent: Intent) -> Response:
        try:
            hour = float(intent.slots.get("hour"))
            minute = intent.slots.get("minute")
            when = alarm_datetime(self.ctx.now(), hour, int(minute) if minute is not None else None,
                                  intent.slots.get("period"))
        except (TypeError, ValueError):
            return self.reply("माफ़ कीजिए, अलार्म का समय समझ नहीं आया।", ok=False, error="bad_time")
        delay = (when - self.ctx.now()).total_seconds()
        label = spoken_time_hi(when)
        alarm = Timer(next(self._ids), "alarm", delay, self.ctx.monotonic() + delay, label)
        with self._lock:
            self.timers.append(alarm)
        day = "कल " if when.date() != self.ctx.now().date() else ""
        return self.reply(f"{day}{label} का अलार्म लगा दिया।", alarm_id=alarm.id, at=when.isoformat(),
                          seconds=delay)

    def _cancel_alarms(self, intent: Intent) -> Response:
        count = self._drop("alarm")
        if not count:
            return self.reply("कोई अलार्म लगा हुआ नहीं है।", ok=False, error="no_alarm")
        return self.reply("अलार्म हटा दिया।" if count == 1 else f"सारे {count} अलार्म हटा दिए।", count=count)
