"""`Colocated`: one deployment whose replicas hold every role and run the whole request in-process.

encode -> sketch -> render -> decode through the very stage classes the disaggregated app deploys (so the job
records, progress, cancellation and artifacts are the same), handing the state over in memory. The roles share
one FIFO `compute` lock, so a replica runs one model computation at a time, as one device would; requests in
the replica interleave at step boundaries, and bookkeeping (store calls, mp4 encoding) overlaps computation.
This is diffusers' two-transformer WanPipeline, served; with `force_switch: none` it is large-only serving and
the replica does not load the render model.
"""
from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

from srserve.config import ModelSpec
from srserve.pipeline.switch import parse_policy
from srserve.serving.args import ColocatedOptions, StageOptions
from srserve.serving.messages import HandoffProbe, StageMessage
from srserve.serving.metrics import StageMetrics
from srserve.serving.reporter import Reporter
from srserve.serving.stages import Decode, Encode, Render, Sketch, resolve_spec


class FairLock:
    """A ticket lock: threads enter in the order they asked, so a role that steps in a loop cannot starve others."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> None:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._cond.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc: Any) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


class Colocated(HandoffProbe):
    def __init__(self, model: str | ModelSpec | None, store: Any, options: dict[str, Any],
                 artifacts_url: str) -> None:
        self.options = ColocatedOptions.model_validate(options)
        common = self.options.model_dump(include=set(StageOptions.model_fields))
        compute, reporter = FairLock(), Reporter(store, self.options.progress_interval_s)
        # One "colocated" stage in the metrics, its roles' load summed; step latency is labelled by role.
        metrics = StageMetrics("colocated", self.options.model_name or resolve_spec(model).name)
        self.encode = Encode(model, store, {**common, "prompt_cache_size": self.options.prompt_cache_size},
                             compute, reporter, metrics)
        self.sketch = Sketch(model, store, common, compute, reporter, metrics)
        force = self.options.force_switch
        self.render = None if force and parse_policy(force).kind == "none" else \
            Render(model, store, common, compute, reporter, metrics)
        self.decode = Decode(model, store, common, artifacts_url, compute, reporter, metrics)

    async def __call__(self, msg: StageMessage) -> dict[str, Any]:
        if self.options.force_switch:
            msg = replace(msg, request=msg.request.model_copy(update={"switch": self.options.force_switch}))
        with self.encode.metrics.in_stage():
            msg = await self.encode(msg)
            msg = await self.sketch(msg)
            if not msg.state.done:  # `none` leaves no render steps
                if self.render is None:
                    raise RuntimeError(f"job {msg.job_id}: steps left after sketch, but this replica has no render "
                                       "model")
                msg = await self.render(msg)
            return await self.decode(msg)

    def load(self) -> int:
        """Requests denoising or waiting to, in this replica."""
        return self.sketch.load() + (self.render.load() if self.render is not None else 0)
