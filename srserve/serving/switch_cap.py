"""The SLO-driven switch point as an ingress replica runs it: gathers the controller's inputs, ticks it, caps jobs.

`SwitchCapController` keeps what `srserve.control.slo.update` needs between ticks - the end-to-end latencies of
the jobs this replica saw complete (within `window_s`) and the admission projections of the jobs it created since
the last tick - and the controller's state, whose cap `cap` applies to each new job. No Ray, no I/O: the ingress
feeds it and runs `tick` every `tick_s` (tested with a fake clock).

One controller per ingress replica, over the jobs that replica creates and drives: with several ingress replicas
each has its own cap, from its own share of the traffic (each share sees the same pools, so their pressures agree
up to sampling noise; no replica waits on another's state). The projected p95 is the p95 of the projected
completion times that the JobStore's admission computed for this replica's creates since the last tick
(processor-sharing over every job in flight, srserve.serving.admission): None when deadline checks are off or no
job was created meanwhile, and then the observed latencies alone decide.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable

from srserve.control import slo
from srserve.control.slo import CapResult, SLOConfig, SLOState


class SwitchCapController:
    def __init__(self, config: SLOConfig, clock: Callable[[], float] = time.time,
                 on_state: Callable[[SLOState], None] | None = None) -> None:
        """`clock`: wall seconds (job records' created_at are wall time); `on_state`: called with each new state
        (the ingress exports it as gauges)."""
        self.config, self.clock, self.on_state = config, clock, on_state
        self.state = SLOState()
        self._latencies: deque[tuple[float, float]] = deque()  # (finished_at, seconds), oldest first
        self._projections: list[float] = []  # projected completion seconds of the creates since the last tick

    def completed(self, created_at: float, finished_at: float | None = None) -> None:
        """A job driven here completed: its end-to-end latency counts toward the observed p95."""
        at = self.clock() if finished_at is None else finished_at
        self._latencies.append((at, max(0.0, at - created_at)))

    def projected(self, seconds: float | None) -> None:
        """Admission's projected completion time of a job just created (or refused for its deadline)."""
        if seconds is not None and seconds >= 0:
            self._projections.append(float(seconds))

    def tick(self, now: float | None = None) -> SLOState:
        """Run the controller once; the new state's cap applies to the jobs created from now on."""
        now = self.clock() if now is None else now
        while self._latencies and self._latencies[0][0] < now - self.config.window_s:
            self._latencies.popleft()  # older than the window: update() would not count them either
        projected, self._projections = slo.p95(self._projections), []
        self.state = slo.update(slo.SLOInput(now, tuple(self._latencies), projected), self.config, self.state)
        if self.on_state is not None:
            self.on_state(self.state)
        return self.state

    def cap(self, switch: str, num_steps: int, client_fixed: bool) -> CapResult:
        """The switch a new job runs under the cap in force (`client_fixed`: the request named its `switch`)."""
        return slo.apply_cap(switch, self.state.cap, num_steps, self.config, client_fixed=client_fixed)

    def gauges(self) -> dict[str, float]:
        return slo.gauges(self.state)


__all__ = ["SwitchCapController"]
