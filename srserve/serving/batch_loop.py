"""The step-level batch loop of a denoising replica (Sketch, Render): one worker thread over a `DenoiseBatch`.

At each step boundary it admits what reached the replica, asks the fair scheduler (`srserve.pipeline.scheduling`)
which requests the next forward carries, runs that forward, charges its measured seconds to them and hands the
finished ones back to their callers' event loops. Requests not stepped stay resident and paused: they keep their
state in memory, heartbeat, and are checked for a stop (DELETE, superseded attempt, caller gone) at every boundary.
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

from srserve.pipeline.errors import Cancelled
from srserve.pipeline.scheduling import FairQueue, Policy, admission_order
from srserve.serving.args import StageOptions
from srserve.serving.metrics import StageMetrics
from srserve.serving.reporter import Watch

logger = logging.getLogger("ray.serve")
_LIVE: "weakref.WeakSet[BatchLoop]" = weakref.WeakSet()


@dataclass
class Entry:
    """One request handed to the loop: its batch key, state, watch, class, and where its result goes."""

    key: str
    state: Any
    watch: Watch
    priority: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class BatchLoop:
    def __init__(self, batch: Any, options: StageOptions, compute: Any, metrics: StageMetrics,
                 role: str) -> None:
        self.batch, self.options, self.compute, self.metrics, self.role = batch, options, compute, metrics, role
        sched = options.scheduling
        self.queue = FairQueue(Policy(max_batch_size=batch.forward_size, max_forward_s=sched.max_forward_s,
                                      batch_weight=sched.batch_weight, short_s=sched.short_s,
                                      short_boost=sched.short_boost))
        self.inbox: queue.Queue[Entry] = queue.Queue()
        self.pending: list[Entry] = []  # reached the replica, not resident yet (only beyond max_resident)
        self.entries: dict[str, Entry] = {}  # resident: in the batch
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self.run, name=f"{role}-batch", daemon=True)
        self.thread.start()
        _LIVE.add(self)

    def submit(self, entry: Entry) -> None:
        self.inbox.put(entry)
        self.publish_load()

    def load(self) -> int:
        """Requests in this replica now (resident, or waiting to become so)."""
        return len(self.batch) + len(self.pending) + self.inbox.qsize()

    def waiting_and_resident(self) -> tuple[int, int]:
        """(requests waiting to join the batch, requests in it)."""
        return len(self.pending) + self.inbox.qsize(), len(self.batch)

    def publish_load(self) -> None:
        waiting, resident = self.waiting_and_resident()
        self.metrics.set_load(resident, waiting, part=self.role)

    def run(self) -> None:
        while not self.closed.is_set():
            try:
                self._admit()
                self.publish_load()
                if self.batch:
                    self._forward()
                    self.publish_load()
            except Exception as err:  # never leave a caller waiting: fail what is in flight, keep serving
                logger.exception("%s batch loop failed", self.role)
                for key in list(self.batch.active):
                    self.batch.discard(key)  # frees its step-cache state too
                    self._resolve(key, err)

    def _forward(self) -> None:
        """One step boundary and one forward, of the requests the scheduler picked."""
        views = self.batch.views()
        keys = self.queue.pick(views)
        if not keys:  # nothing has a step left: the boundary only retires
            finished, seconds = self.batch.step(keys), 0.0
        else:
            with self.compute, self.metrics.step(len(keys), self.role):
                began = time.perf_counter()
                finished = self.batch.step(keys)
                seconds = time.perf_counter() - began
        stepped = [k for k in keys if not isinstance(finished.get(k), Cancelled)]  # not those stopped at the boundary
        self.queue.charge(stepped, views, seconds)
        for key, result in finished.items():
            self._resolve(key, result)
        for key, view in views.items():  # the paused ones: alive, only not stepped this time
            entry = self.entries.get(key)
            if entry is not None and key not in keys:
                entry.watch.waiting(view.step, view.num_steps)

    def _admit(self) -> None:
        """Everything that reached the replica joins at this boundary (interactive first when `max_resident`
        leaves places for only some); when idle, wait for one request, then linger for companions."""
        deadline = time.monotonic()
        if not self.batch and not self.pending:
            try:
                self.pending.append(self.inbox.get(timeout=0.5))
            except queue.Empty:
                return
            deadline += self.options.batch_wait_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining > 0 and len(self.pending) >= self.batch.forward_size:
                remaining = 0  # enough companions for a full forward: stop lingering
            try:
                self.pending.append(self.inbox.get(timeout=remaining) if remaining > 0 else self.inbox.get_nowait())
            except queue.Empty:
                break
        for entry in [e for e in self.pending if e.watch.should_cancel()]:  # stopped before it became resident
            self.pending.remove(entry)
            entry.loop.call_soon_threadsafe(_settle, entry.future, Cancelled("cancelled while waiting to join"))
        limit = self.options.scheduling.max_resident
        chosen = set(admission_order([e.priority for e in self.pending],
                                     None if limit is None else limit - len(self.batch)))
        admitted = [e for i, e in enumerate(self.pending) if i in chosen]
        self.pending = [e for i, e in enumerate(self.pending) if i not in chosen]
        for entry in admitted:
            self._add(entry)

    def _add(self, entry: Entry) -> None:
        self.entries[entry.key] = entry
        try:
            self.queue.add(entry.key, entry.priority)
            with self.compute:
                self.batch.add(entry.key, entry.state, on_step=entry.watch.on_step,
                               should_cancel=entry.watch.should_cancel)
        except Exception as err:
            self._resolve(entry.key, err)

    def _resolve(self, key: str, result: Any) -> None:
        self.queue.remove(key)
        entry = self.entries.pop(key, None)
        if entry is not None:
            entry.loop.call_soon_threadsafe(_settle, entry.future, result)

    def close(self, wait_s: float = 0.0) -> None:
        """Stop the thread after its current boundary (waiting up to `wait_s` for it)."""
        self.closed.set()
        if wait_s and self.thread is not threading.current_thread():
            self.thread.join(wait_s)


@atexit.register
def _close_all() -> None:
    """End the worker threads before the interpreter does: a thread that ran torch ops still alive at exit was
    seen to abort the process ("terminate called without an active exception")."""
    for loop in list(_LIVE):
        loop.close(wait_s=2.0)


def _settle(future: asyncio.Future, result: Any) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
