"""Run an :class:`~mani_jax.inference.engine.Engine` on its own thread and feed asyncio consumers.

The engine is synchronous: :meth:`Engine.step` runs one batched iteration (JAX releases the GIL while it
computes). :class:`AsyncEngine` owns one thread that steps the engine whenever it has work, and hands each
generated token to the asyncio queue of the request it belongs to (``loop.call_soon_threadsafe``). Adding
and cancelling requests take the engine lock, so they happen between steps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from typing import Sequence

from mani_jax.inference.engine import Engine, SamplingParams

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting for a slot than the server accepts (HTTP 429)."""


@dataclasses.dataclass
class TokenEvent:
    """One generated token of one request, or its end.

    ``token`` is ``None`` only on an error event (``error`` set). ``finish_reason`` is set on the request's last
    event: ``"stop"`` (a stop token), ``"length"``, ``"cancelled"`` or ``"error"``.
    """

    token: int | None
    logprobs: tuple[float, list[int], list[float]] | None = None
    finish_reason: str | None = None
    error: str | None = None
    prefix_hit_tokens: int = 0
    accepted: int = 0  # speculative decoding: draft tokens accepted / rejected so far
    rejected: int = 0


class AsyncEngine:
    """A background thread stepping ``engine``; requests are submitted and streamed from asyncio.

    Args:
      engine: the engine to drive (its ``warmup`` should have run).
      max_waiting: requests allowed to wait for a slot before :meth:`submit` raises :class:`QueueFull`.
    """

    def __init__(self, engine: Engine, *, max_waiting: int = 64):
        if max_waiting < 0:
            raise ValueError(f"max_waiting: expected >= 0, got {max_waiting}")
        self.engine = engine
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ asyncio side
    def submit(self, prompt: Sequence[int], params: SamplingParams) -> tuple[int, asyncio.Queue]:
        """Queue a request; returns its id and the asyncio queue its :class:`TokenEvent`s arrive on.

        Call from the event loop's thread.

        Raises:
          QueueFull: ``max_waiting`` requests already wait for a slot.
          ValueError: from :meth:`Engine.add_request` (prompt too long, bad token ids, ...).
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._work:
            if self._closed:
                raise RuntimeError("engine is shut down")
            if self.engine.n_waiting >= self.max_waiting:
                raise QueueFull(f"{self.engine.n_waiting} requests are already waiting")
            rid = self.engine.add_request(prompt, params)
            self._queues[rid] = (loop, queue)
            self._work.notify()
        return rid, queue

    def cancel(self, request_id: int) -> None:
        """Stop a request (a client went away): its pages and slot are freed before the next step."""
        with self._work:
            if request_id in self.engine.requests:
                self.engine.cancel(request_id)
                self.engine.forget(request_id)
            self._queues.pop(request_id, None)

    def stats(self) -> dict:
        with self._lock:
            return {"running": self.engine.n_running, "waiting": self.engine.n_waiting,
                    "pages_in_use": self.engine.pool.n_in_use,
                    "pages_cached": self.engine.pool.n_cached, "requests": len(self.engine.requests)}

    def close(self) -> None:
        with self._work:
            self._closed = True
            self._work.notify()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ engine thread
    def _deliver(self, rid: int, event: TokenEvent) -> None:
        target = self._queues.get(rid)
        if target is None:
            return
        loop, queue = target
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._queues.pop(rid, None)

    def _loop(self) -> None:
        eng = self.engine
        while True:
            with self._work:
                while not self._closed and not eng.has_unfinished:
                    self._work.wait()
                if self._closed:
                    return
                try:
                    events = eng.step()
                except Exception as exc:  # noqa: BLE001 - reported to every client, then the engine is reset
                    log.exception("engine step failed")
                    for rid in list(self._queues):
                        self._deliver(rid, TokenEvent(None, finish_reason="error", error=f"engine error: {exc}"))
                    self._queues.clear()
                    eng.reset()
                    continue
                seen: dict[int, int] = {}
                for rid, token, finished in events:
                    req = eng.requests[rid]
                    # this event's index among the request's tokens (a step can emit several per request)
                    n_later = sum(1 for r, _, _ in events if r == rid) - seen.get(rid, 0) - 1
                    seen[rid] = seen.get(rid, 0) + 1
                    i = len(req.tokens) - 1 - n_later
                    lp = req.logprobs[i] if req.params.logprobs is not None else None
                    spec = eng.speculative_stats(rid)
                    self._deliver(rid, TokenEvent(token, lp, req.finish_reason if finished else None,
                                                  prefix_hit_tokens=req.prefix_hit_tokens, **spec))
                    if finished:
                        eng.forget(rid)
                        self._queues.pop(rid, None)
