"""What every stage deployment shares (`StageBase`): its options, engine roles, job store reporter, metrics, the
events a job carries from stage to stage, and the figures Serve's autoscaling reads from each replica
(`record_autoscaling_stats`: queue, in flight, arrivals, seconds per request and per step, the switch step; read
by the application-level policy in srserve/control/autoscale.py)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import replace
from typing import Any

from ray import serve

from srserve.config import ModelSpec
from srserve.control.autoscale import StageStats
from srserve.pipeline.errors import Cancelled
from srserve.pipeline.families import load_engine
from srserve.pipeline.spec import resolve_model_spec
from srserve.serving.args import StageOptions
from srserve.serving.artifacts import ArtifactStore
from srserve.serving.calls import describe
from srserve.serving.gpu import start_gpu_sampler
from srserve.serving.logs import install_job_filter, job_context, log_transition
from srserve.serving.messages import HandoffProbe, JobCancelled, StageMessage
from srserve.serving.metrics import StageMetrics
from srserve.serving.reporter import Reporter, stage_event

logger = logging.getLogger("ray.serve")


def resolve_spec(model: str | ModelSpec | dict[str, Any]) -> ModelSpec:
    """`AppArgs.model` (a path or inline ModelSpec fields; AppArgs names the bundled model) as a checked spec."""
    return resolve_model_spec(ModelSpec.model_validate(model) if isinstance(model, dict) else model)


def pin_process(cores: list[int] | None) -> None:
    """Pin every thread of this process (and so the threads it starts later) to `cores` (Linux only)."""
    if not cores or not hasattr(os, "sched_setaffinity"):
        return
    try:
        os.sched_setaffinity(0, cores)
    except (OSError, ValueError) as err:
        raise ValueError(f"cpu_affinity {cores}: cannot pin to these cores here ({err})") from None
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that just ended
            os.sched_setaffinity(int(tid), cores)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (unit tests)
        return "local"


class StageBase(HandoffProbe):
    role = ""
    roles: tuple[str, ...] = ()  # the engine roles whose weights this stage loads
    options_model: type[StageOptions] = StageOptions

    def __init__(self, model: str | ModelSpec | None, store: Any, options: dict[str, Any],
                 compute: Any = None, reporter: Reporter | None = None, metrics: StageMetrics | None = None) -> None:
        self.options = self.options_model.model_validate(options)
        install_job_filter()
        pin_process(self.options.cpu_affinity)
        if self.options.torch_threads:
            import torch

            torch.set_num_threads(self.options.torch_threads)
        # Held around every model computation: a no-op alone, shared by the roles of a Colocated replica.
        self.compute = compute if compute is not None else contextlib.nullcontext()
        self.engine = load_engine(resolve_spec(model), roles=self.roles)  # SREngine, or the simulated one
        self.store = store
        # Where the denoising stages save the state they hand on, and Encode loads it for a resumed job.
        url = self.options.checkpoint_url
        self.checkpoints = ArtifactStore(url) if url else None
        self.reporter = reporter or Reporter(store, self.options.progress_interval_s)
        self.replica = _replica_id()
        # A Colocated replica passes one "colocated" StageMetrics that its roles share.
        self.metrics = metrics or StageMetrics(self.role, self.options.model_name or self.engine.spec.name)
        self._lock = asyncio.Lock()  # encode, decode: one request at a time
        self._queued = self._busy = 0  # encode, decode: waiting for `_lock`, holding it
        self.autoscale_stats = StageStats(self.options.stats_window_s)  # what Serve's autoscaling reads
        start_gpu_sampler(self.options.pool or "none")  # once per process and pool; a daemon thread

    def _begin(self, msg: StageMessage) -> StageMessage:
        """The stage's start event joins those riding with the job (no store call here)."""
        start = stage_event("start", msg.job_id, msg.attempt, self.role, replica=self.replica)
        self.autoscale_stats.started()
        log_transition(msg.job_id, msg.attempt, self.role, self.replica, 0.0, "started",
                       prompt=msg.request.prompt, log_prompts=self.options.log_prompts)
        return replace(msg, reports=(*msg.reports, start))

    def _end(self, msg: StageMessage, info: dict[str, Any]) -> StageMessage:
        if msg.transfer is not None:
            info = {**info, "handoff": msg.transfer}
            ended = [e["stage"] for e in msg.reports if e["kind"] == "end"]
            self.metrics.observe_handoff(ended[-1] if ended else "other", msg.transfer, self.role)
        seconds = self._left(msg, "ok", **{k: v for k, v in info.items() if k in ("switch_step", "step", "num_steps")})
        self._record_cost(msg, info, seconds)
        end = stage_event("end", msg.job_id, msg.attempt, self.role, info=info)
        return replace(msg, reports=(*msg.reports, end), transfer=None)

    def _left(self, msg: StageMessage, outcome: str, **fields: Any) -> float:
        """The request leaves the stage: its latency (from its start event, returned) and its transition line."""
        began = next((e["at"] for e in reversed(msg.reports) if e["kind"] == "start" and e["stage"] == self.role),
                     None)
        seconds = time.time() - began if began is not None else 0.0
        if self.metrics.stage == self.role:  # a Colocated replica times the whole request instead
            self.metrics.observe_stage(seconds, outcome)
        log_transition(msg.job_id, msg.attempt, self.role, self.replica, seconds, outcome, **fields)
        return seconds

    def _record_cost(self, msg: StageMessage, info: dict[str, Any], seconds: float) -> None:
        """A finished request's cost for the autoscaling stats (encode, decode: timed in `_turn` instead, which
        leaves out the wait for the lock)."""

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this on every replica each metrics interval; the app-level policy reads the figures."""
        return self.autoscale_stats.snapshot(self._queued, self._busy)

    @contextlib.contextmanager
    def _scope(self, msg: StageMessage) -> Any:
        """The stage's work for one job (after `_begin`): lines logged inside carry the job id; a request that
        leaves by an exception is measured and logged as cancelled or failed."""
        with job_context(msg.job_id, msg.attempt):
            try:
                yield
            except BaseException as err:
                cancelled = isinstance(err, (JobCancelled, Cancelled, asyncio.CancelledError))
                self._left(msg, "cancelled" if cancelled else "failed", **({} if cancelled else
                                                                           {"error": describe(err)}))
                raise

    @contextlib.asynccontextmanager
    async def _turn(self) -> Any:
        """Hold the stage's lock (encode, decode: one request at a time), the load gauges following."""
        self._queued += 1
        self._publish_load()
        entered = False
        try:
            async with self._lock:
                self._queued, self._busy, entered = self._queued - 1, self._busy + 1, True
                self._publish_load()
                held = time.perf_counter()
                try:
                    yield
                finally:
                    self._busy -= 1
                    self.autoscale_stats.finished(time.perf_counter() - held)
        finally:
            if not entered:
                self._queued -= 1
            self._publish_load()

    def _publish_load(self) -> None:
        self.metrics.set_load(self._busy, self._queued, part=self.role)
