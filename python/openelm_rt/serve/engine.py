"""AsyncEngine: one Session's continuous-batching engine shared by the requests of an asyncio server.

The engine steps on a thread of its own (`_core.Engine.start()`: the forward pass runs in C++,
without the GIL). The event loop watches the engine's event descriptor (`Engine.event_fd`, a pipe
that is readable while events wait) and takes the events itself, so a token reaches its request's
asyncio queue with one wake-up of the loop and no thread hand-off (where the loop cannot watch a
descriptor, a thread waits for the events without the GIL and hands them over). Submitting and
cancelling are cheap thread-safe calls made from the loop. Not a public API: the HTTP server
(`openelm_rt.serve.app`) and the Ray deployment use it.
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..session import Session


@dataclass
class Request:
    """One submitted sequence: its engine id, its events' queue, and timings for the metrics."""
    id: int
    n_prompt: int
    queue: asyncio.Queue
    t_submit: float = field(default_factory=time.perf_counter)
    t_last: Optional[float] = None  # when its last token arrived
    done: bool = False


class AsyncEngine:
    """The Session's engine driven for an asyncio loop (call `start` from inside the loop)."""

    def __init__(self, session: Session, on_token=None, on_finish=None):
        self.session = session
        self._eng = session._engine
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._reqs: Dict[int, Request] = {}
        self._stop = threading.Event()
        self._pump: Optional[threading.Thread] = None
        self._fd: Optional[int] = None  # the engine's event descriptor the loop watches
        self._on_token = on_token    # (request, seconds since submit or since its last token, first?)
        self._on_finish = on_finish  # (request, final event)

    # -- lifetime ---------------------------------------------------------------------------
    def start(self, loop: Optional[asyncio.AbstractEventLoop] = None):
        self._loop = loop or asyncio.get_running_loop()
        self._eng.start()
        fd = self._eng.event_fd()
        if fd >= 0:
            try:
                self._loop.add_reader(fd, self._take_events)
                self._fd = fd
                return
            except NotImplementedError:  # a loop that cannot watch descriptors (Windows' proactor)
                pass
        self._pump = threading.Thread(target=self._pump_events, name="openelm-rt-events", daemon=True)
        self._pump.start()

    def shutdown(self):
        """Stops the engine thread; requests still running end with finish reason 'cancelled'."""
        for rid in list(self._reqs):
            self._eng.cancel(rid)
        self._stop.set()
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._fd = None
        if self._pump is not None:
            self._pump.join()
            self._pump = None
        self._eng.stop()

    def _pump_events(self):
        while not self._stop.is_set():
            events = self._eng.wait_events(0.05)
            if events:
                try:
                    self._loop.call_soon_threadsafe(self._dispatch, events)
                except RuntimeError:  # the loop has closed
                    return

    def _take_events(self):  # on the loop: the event descriptor is readable
        events = self._eng.take_events()
        if events:
            self._dispatch(events)

    def _dispatch(self, events):
        now = time.perf_counter()
        for e in events:
            r = self._reqs.get(e["id"])
            if r is None:
                continue
            if e["token"] >= 0 and self._on_token is not None:
                first = r.t_last is None
                self._on_token(r, now - (r.t_submit if first else r.t_last), first)
            if e["token"] >= 0:
                r.t_last = now
            if e["finish"]:
                r.done = True
                del self._reqs[e["id"]]
                if self._on_finish is not None:
                    self._on_finish(r, e)
            r.queue.put_nowait(e)

    # -- requests ---------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Sequences submitted and not finished (running or waiting in the engine)."""
        return len(self._reqs)

    def submit(self, prompt_ids: List[int], **params) -> Request:
        """Queues a sequence; params are those of `_core.Engine.submit`. Raises ValueError for a
        bad request (the core names the field)."""
        rid = self._eng.submit(prompt_ids, **params)
        r = Request(id=rid, n_prompt=len(prompt_ids), queue=asyncio.Queue())
        self._reqs[rid] = r
        return r

    def cancel(self, r: Request):
        """Ends a sequence (its KV is freed before the next step; a step in progress is abandoned)."""
        if not r.done:
            self._eng.cancel(r.id)

    def stats(self) -> dict:
        return self._eng.stats()
