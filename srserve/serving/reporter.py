"""How stage replicas tell the JobStore what their jobs are doing, at a cost that follows time, not steps.

A `Reporter` (one per replica process) collects stage events: start and end of a stage, and the latest
progress of each running job (every denoising step overwrites the last). Every `interval_s`, while it holds
any or runs a job, it sends them all in one `store.report(events)` call, whose answer names the jobs that must stop (a
DELETE, or a superseded attempt): their `Watch` is set, and the denoising loop stops them at the next step
boundary. So a replica makes at most one store call per interval whatever its batch size and step rate, and a
DELETE stops a running stage within about one interval plus one step. A request the denoising scheduler keeps
paused (resident, not stepped while others are) still heartbeats and is still stopped at the next boundary;
Decode watches too, and stops between the chunks of its work.

Stage ends also ride with the job (`StageMessage.reports`) to Decode, whose result carries them to
`store.complete`, so a finished job's record is whole without waiting for a report.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from srserve.serving.calls import call, describe

logger = logging.getLogger("ray.serve")


def stage_event(kind: str, job_id: str, attempt: int, stage: str, **fields: Any) -> dict[str, Any]:
    return {"kind": kind, "job": job_id, "attempt": attempt, "stage": stage, "at": time.time(), **fields}


class Watch:
    """One running request's progress reports and stop flag (set from the report's answer or a cancel)."""

    def __init__(self, reporter: "Reporter", job_id: str, attempt: int, stage: str) -> None:
        self.reporter, self.job_id, self.attempt, self.stage = reporter, job_id, attempt, stage
        self.stop = threading.Event()
        self.first_step_at: float | None = None  # wall clock of the first step done (time to first progress)
        self._reported_at = 0.0  # monotonic time of the last progress this watch recorded

    @property
    def key(self) -> str:
        return f"{self.job_id}#{self.attempt}"

    def on_step(self, step: int, num_steps: int) -> None:
        """Called by the denoising thread after each step: cheap, no I/O."""
        if self.first_step_at is None:
            self.first_step_at = time.time()
        self._reported_at = time.monotonic()
        self.reporter.progress(self, step, num_steps)

    def waiting(self, step: int, num_steps: int) -> None:
        """Called by the denoising thread for a resident request it did not step this time (the scheduler gave
        the forward to others): a heartbeat at most once per interval, so the watchdog sees it alive while paused.
        Only a completed forward calls it, so a stuck forward still silences every request of the replica."""
        now = time.monotonic()
        if now - self._reported_at >= self.reporter.interval_s:
            self._reported_at = now
            self.reporter.progress(self, step, num_steps)

    def should_cancel(self) -> bool:
        return self.stop.is_set()


class Reporter:
    def __init__(self, store: Any, interval_s: float) -> None:
        self.store, self.interval_s = store, interval_s
        self._lock = threading.Lock()
        self._events: list[dict[str, Any]] = []
        self._progress: dict[str, dict[str, Any]] = {}  # the latest per running request
        self._watches: dict[str, Watch] = {}
        self._task: asyncio.Task | None = None

    def watch(self, job_id: str, attempt: int, stage: str) -> Watch:
        self._ensure_running()
        watch = Watch(self, job_id, attempt, stage)
        with self._lock:
            self._watches[watch.key] = watch
        return watch

    def unwatch(self, watch: Watch) -> None:
        with self._lock:
            if self._watches.get(watch.key) is watch:
                del self._watches[watch.key]
            self._progress.pop(watch.key, None)

    def add(self, event: dict[str, Any]) -> None:
        self._ensure_running()
        with self._lock:
            self._events.append(event)

    def progress(self, watch: Watch, step: int, num_steps: int) -> None:
        event = stage_event("progress", watch.job_id, watch.attempt, watch.stage, step=step, num_steps=num_steps)
        with self._lock:
            self._progress[watch.key] = event

    async def flush(self) -> None:
        with self._lock:
            events = self._events + list(self._progress.values())
            # A running request with no news (a step longer than the interval) still asks whether to stop,
            # without touching its heartbeat: a stuck step must still look silent to the watchdog.
            events += [stage_event("watch", w.job_id, w.attempt, w.stage) for key, w in self._watches.items()
                       if key not in self._progress]
            self._events, self._progress = [], {}
        if not events:
            return
        try:
            stop = await call(self.store, "report", events, retry_s=max(5.0, self.interval_s))
        except Exception as err:  # best effort: the next round reports again, the watchdog covers silence
            logger.warning("stage report of %d events failed: %s", len(events), describe(err))
            return
        with self._lock:
            for key in stop:
                if key in self._watches:
                    self._watches[key].stop.set()

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            try:
                self._task = asyncio.get_running_loop().create_task(self._run())
            except RuntimeError:  # no loop in this thread: the next call from the replica's loop starts it
                pass

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush()
