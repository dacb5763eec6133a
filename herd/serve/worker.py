"""The engine thread: the one owner of the (synchronous, not thread-safe) engine.

HTTP handlers run on the asyncio event loop; the engine runs here, looping `step()` while it has
work and sleeping on its command queue when it has none. Handlers hand it requests and aborts
through that queue (`submit`, `abort`); each request's outputs come back on an asyncio queue of the
handler's, filled with `loop.call_soon_threadsafe`, so no handler ever touches the engine.

Admission is bounded: at most `max_batch` requests run and `max_waiting` more wait; beyond that
`submit` raises `QueueFull` and the handler answers 429. A step that raises fails the requests
it held (their handlers answer 500, the traceback goes to the server's log) and the engine is
rebuilt, so one bad request cannot wedge the server.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..inference.batching import Engine, Request, StepOutput
from .metrics import Metrics

log = logging.getLogger("herd.serve")


class QueueFull(Exception):
    pass


class EngineFailed(Exception):
    """Put on a request's channel when the engine raised while running it."""


@dataclass
class _Channel:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrived: float
    last_token: float | None = None


class EngineWorker:
    def __init__(self, make_engine: Callable[[], Engine], max_batch: int, max_waiting: int, metrics: Metrics):
        self.make_engine, self.metrics = make_engine, metrics
        self.capacity = max_batch + max_waiting
        self.engine = make_engine()
        self.commands: queue.Queue = queue.Queue()
        self.channels: dict[str, _Channel] = {}  # engine request id -> where its outputs go
        self.lock = threading.Lock()  # guards `channels` membership (admission happens on the loop)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="herd-engine", daemon=True)

    # ---------------------------------------------------------------- called from the event loop
    def start(self):
        self.thread.start()

    def stop(self, timeout: float = 10.0):
        self.stopping.set()
        self.commands.put(None)  # wake the thread
        self.thread.join(timeout)

    def in_flight(self) -> int:
        return len(self.channels)

    def submit(self, requests: list[Request]) -> asyncio.Queue:
        """Queues requests (the choices of one HTTP request, all or none); their outputs arrive on
        the returned queue as StepOutput objects (or an EngineFailed)."""
        loop, outputs, now = asyncio.get_running_loop(), asyncio.Queue(), time.perf_counter()
        with self.lock:
            if len(self.channels) + len(requests) > self.capacity:
                self.metrics.add("herd_requests_rejected_total")
                raise QueueFull
            for r in requests:  # one queue, timed per request
                self.channels[r.id] = _Channel(loop, outputs, now)
        self.metrics.add("herd_prompt_tokens_total", sum(len(r.prompt_ids) for r in requests))
        for r in requests:
            self.commands.put(("add", r))
        return outputs

    def abort(self, request_id: str):
        self.commands.put(("abort", request_id))

    # ---------------------------------------------------------------- the engine thread
    def _run(self):
        while not self.stopping.is_set():
            idle = not self.engine.has_unfinished()
            try:
                command = self.commands.get(timeout=0.5) if idle else self.commands.get_nowait()
            except queue.Empty:
                command = None
            while command is not None:
                self._apply(*command)
                try:
                    command = self.commands.get_nowait()
                except queue.Empty:
                    command = None
            if self.engine.has_unfinished():
                try:
                    outputs = self.engine.step()
                except Exception as e:  # noqa: BLE001 - logged in full; the clients get a 500
                    log.exception("engine step failed; failing its requests and rebuilding the engine")
                    self._fail_all(e)
                    continue
                now = time.perf_counter()
                for out in outputs:
                    self._deliver(out, now)

    def _apply(self, kind: str, arg):
        if kind == "abort":
            if arg in self.channels:
                self.engine.abort(arg)
            return
        try:
            self.engine.add(arg)
        except ValueError as e:  # the server checks limits first; this is the engine's last word
            self._send(arg.id, e, final=True)

    def _deliver(self, out: StepOutput, now: float):
        channel = self.channels.get(out.request_id)
        if channel is None:
            return
        if out.token_ids:
            self.metrics.add("herd_generation_tokens_total", len(out.token_ids))
            with self.metrics.lock:
                if channel.last_token is None:
                    self.metrics.ttft.observe(now - channel.arrived)
                else:
                    self.metrics.itl.observe(now - channel.last_token)
            channel.last_token = now
        if out.finished:
            self.metrics.add("herd_requests_finished_total")
        self._send(out.request_id, out, final=out.finished)

    def _send(self, request_id: str, item, final: bool):
        with self.lock:
            channel = self.channels.pop(request_id) if final else self.channels.get(request_id)
        if channel is not None and not channel.loop.is_closed():
            channel.loop.call_soon_threadsafe(channel.queue.put_nowait, item)

    def _fail_all(self, error: Exception):
        self.engine = self.make_engine()  # first, so that whoever hears of the failure finds the new engine
        for request_id in list(self.channels):
            self._send(request_id, EngineFailed(str(error)), final=True)
