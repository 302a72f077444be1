"""VAANI plugins: the skills that answer recognised intents.

A plugin is a :class:`Plugin` subclass registered in the entry-point group ``mani_jax.voice.plugins``
(see ``pyproject.toml``; any installed distribution can add more). :class:`PluginHost` loads them, maps
intent names to plugins and isolates failures: an exception while loading or handling is logged and turned
into a spoken Hindi apology (``Response(ok=False)``), never propagated.
"""
from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Iterable

from mani_jax.voice.nlu import Intent

__all__ = ["Plugin", "PluginContext", "Response", "PluginHost", "ENTRY_POINT_GROUP", "APOLOGY", "NOT_UNDERSTOOD"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "mani_jax.voice.plugins"
APOLOGY = "माफ़ कीजिए, यह काम करते समय कुछ गड़बड़ हो गई। कृपया दोबारा कोशिश करें।"
NOT_UNDERSTOOD = "माफ़ कीजिए, मैं समझ नहीं पाई। कृपया दोबारा कहिए।"


@dataclass
class PluginContext:
    """What a plugin gets from its host.

    Attributes:
        data_dir: directory for the plugin's state (notes database, weather cache); created by the host.
        now: clock returning the current local ``datetime`` (injectable for tests).
        config: free-form settings, e.g. ``{"media_dir": "/music", "default_city": "दिल्ली"}``.
        monotonic: monotonic clock in seconds (injectable; timers use it for deadlines).
    """

    data_dir: Path
    now: Callable[[], datetime] = datetime.now
    config: dict[str, Any] = field(default_factory=dict)
    monotonic: Callable[[], float] = time.monotonic


@dataclass
class Response:
    """A plugin's answer.

    Attributes:
        text: the Hindi reply to speak (digits are fine; espeak-ng ``hi`` reads them as Hindi words).
        plugin: name of the plugin that answered (``""`` for the host itself).
        ok: ``False`` when the request could not be served (error, unavailable data, rejected input).
        data: structured result for callers and tests (e.g. ``{"value": 84}``).
    """

    text: str
    plugin: str = ""
    ok: bool = True
    data: dict[str, Any] = field(default_factory=dict)


class Plugin(abc.ABC):
    """Base class of VAANI plugins.

    Subclasses set :attr:`name` and :attr:`intents` (the intent names they handle) and implement
    :meth:`handle`. ``__init__`` receives the :class:`PluginContext`.
    """

    name: str = "plugin"
    intents: tuple[str, ...] = ()

    def __init__(self, ctx: PluginContext):
        self.ctx = ctx

    @abc.abstractmethod
    def handle(self, intent: Intent) -> Response:
        """Answer ``intent`` (whose name is in :attr:`intents`) with a Hindi :class:`Response`."""

    def reply(self, text: str, ok: bool = True, **data: Any) -> Response:
        """Shorthand for ``Response(text, self.name, ok, data)``."""
        return Response(text=text, plugin=self.name, ok=ok, data=data)


class PluginHost:
    """Loads plugins and routes intents to them.

    Args:
        data_dir: state directory shared by plugins (created if missing).
        now: injectable clock for :class:`PluginContext` (default ``datetime.now``).
        plugins: plugin classes to use instead of the entry points (for tests and embedding).
        config: passed to every plugin as ``ctx.config``.
        monotonic: injectable monotonic clock (seconds).
        fallback: ``callable(text) -> str | None`` answering text no intent matched (e.g.
            :class:`mani_jax.voice.plugins.llm.LLMFallback`); see :meth:`handle_text`.

    Raises:
        TypeError: if ``data_dir`` is not a path-like value.
    """

    def __init__(self, data_dir: str | Path, *, now: Callable[[], datetime] | None = None,
                 plugins: Iterable[type[Plugin]] | None = None, config: dict[str, Any] | None = None,
                 monotonic: Callable[[], float] | None = None,
                 fallback: Callable[[str], str | None] | None = None):
        if not isinstance(data_dir, (str, Path)):
            raise TypeError(f"data_dir must be str or Path, got {type(data_dir).__name__}")
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.ctx = PluginContext(data_dir=self.data_dir, now=now or datetime.now, config=dict(config or {}),
                                 monotonic=monotonic or time.monotonic)
        self.fallback = fallback
        self.plugins: dict[str, Plugin] = {}
        self.routes: dict[str, Plugin] = {}
        self.load_errors: dict[str, str] = {}
        classes = list(plugins) if plugins is not None else None
        if classes is None:
            for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
                try:
                    self._add(ep.load())
                except Exception as exc:  # noqa: BLE001 - isolation: a broken plugin must not stop the host
                    log.exception("VAANI plugin %r failed to load", ep.name)
                    self.load_errors[ep.name] = repr(exc)
        else:
            for cls in classes:
                try:
                    self._add(cls)
                except Exception as exc:  # noqa: BLE001
                    log.exception("VAANI plugin %r failed to load", getattr(cls, "__name__", cls))
                    self.load_errors[getattr(cls, "__name__", str(cls))] = repr(exc)

    def _add(self, cls: type[Plugin]) -> None:
        plugin = cls(self.ctx)
        self.plugins[plugin.name] = plugin
        for name in plugin.intents:
            self.routes.setdefault(name, plugin)

    def handle(self, intent: Intent | None) -> Response:
        """Route ``intent`` to its plugin and return the plugin's :class:`Response`.

        ``None`` or an intent no plugin handles gives a polite "didn't understand" reply; ``HassNevermind``
        is acknowledged by the host; any exception inside the plugin is logged and becomes a Hindi apology
        (``ok=False``) that names nothing internal.
        """
        if intent is None:
            return Response(NOT_UNDERSTOOD, "", False, {"reason": "no_intent"})
        if intent.name == "HassNevermind":
            return Response("ठीक है।", "", True, {})
        plugin = self.routes.get(intent.name)
        if plugin is None:
            return Response(NOT_UNDERSTOOD, "", False, {"reason": "unhandled_intent", "intent": intent.name})
        try:
            response = plugin.handle(intent)
            if not isinstance(response, Response):
                raise TypeError(f"plugin {plugin.name!r} returned {type(response).__name__}, not Response")
            return response
        except Exception:  # noqa: BLE001 - isolation
            log.exception("VAANI plugin %r failed on intent %s", plugin.name, intent.name)
            return Response(APOLOGY, plugin.name, False, {"reason": "plugin_error"})

    def handle_text(self, text: str, recognizer=None) -> Response:
        """Recognise ``text`` (with ``recognizer``, an :class:`~mani_jax.voice.nlu.IntentRecognizer`) and
        handle it; when nothing is recognised and a ``fallback`` was given, speak its answer instead.

        Raises:
            ValueError: if ``recognizer`` is ``None``.
        """
        if recognizer is None:
            raise ValueError("handle_text(recognizer=...) needs an IntentRecognizer")
        intent = recognizer.recognize(text)
        if intent is None and self.fallback is not None:
            try:
                answer = self.fallback(text)
            except Exception:  # noqa: BLE001
                log.exception("VAANI fallback failed")
                return Response(APOLOGY, "fallback", False, {"reason": "fallback_error"})
            if answer:
                return Response(answer, "fallback", True, {})
        return self.handle(intent)

    def stop(self) -> None:
        """Call ``stop()`` on plugins that have one (timers), ignoring their errors."""
        for plugin in self.plugins.values():
            stop = getattr(plugin, "stop", None)
            if callable(stop):
                try:
                    stop()
                except Exception:  # noqa: BLE001
                    log.exception("VAANI plugin %r failed to stop", plugin.name)
