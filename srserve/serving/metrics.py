"""srserve's own metrics: every series defined once here (`METRICS`), recorded through a small typed API.

Backends (metrics_backend.py; chosen per process at the first record, or by `configure`):
- inside Ray (`ray.is_initialized()`: replicas, actors, the `srserve serve` driver): `ray.serve.metrics`, which
  adds `deployment`, `replica` and `application` tags inside a replica. Each node's metrics agent exports them
  with Ray's namespace, so `srserve_x` is scraped as `ray_srserve_x` (`_total` for counters, `_bucket`/`_sum`/
  `_count` for histograms; Ray 2.60 approximates `_sum` from bucket midpoints, so panels use quantiles). Ray's
  agent drops a gauge not set for two report intervals: the backend sets gauges again every half interval.
- outside Ray (unit tests, in-process `srserve generate`): prometheus-client in a private registry, under the
  same exported names plus an `application` label, so the dashboards work on both (`prom.serve_metrics` serves it).
- `configure("none")`: nothing is recorded.
Labels are bounded: stage, role, model, policy, status, reason, op, hop, phase, outcome, pool, gpu. Values outside
the known sets become "other"; job ids, prompts and keys are never labels.

Where each call goes (one object per replica, made in its `__init__`, after Serve has set the replica context):
- `sm = StageMetrics(stage, model)` in each stage (stages.py `_Stage.__init__`: encode, sketch, render, decode;
  a Colocated replica makes one "colocated" object that its four roles share).
  - `sm.set_load(in_flight, waiting, part=role)` whenever a request arrives, joins the batch or leaves (waiting =
    received, not yet in a batch or, for encode/decode, not yet holding the stage's lock; in flight = in the batch
    or running). `part` sums the roles of a Colocated replica; an unchanged value is not recorded again.
  - `sm.observe_step(seconds, batch_size, role)` after each forward pass: a `DenoiseBatch.step()` of the whole
    batch (sketch, render), one encode (text encoder + step-0 state) or one VAE decode; timed inside the compute
    lock, so a Colocated role's wait for the device is not counted.
  - `sm.observe_stage(seconds, outcome)` when a request leaves the stage (from its start event to `_end`, or to
    the exception: outcome ok, cancelled or failed).
  - `sm.observe_handoff(src, msg.transfer)` at `_end` when the message crossed a process: the state's bytes and
    serialize/transit/deserialize seconds (hop `src->stage`, `src` = the stage whose end event came last), and the
    prompt embeddings fetched by reference in the denoising stages (hop `encode->sketch:embeddings`, phase
    `fetch`: the ObjectRef await, transfer and deserialisation together).
  - `sm.cache_hit()` / `sm.cache_miss()` at Encode's prompt-embedding cache lookup.
- `jm = JobMetrics(model)` in the ingress replica (ingress.py), shared with its JobDriver (driver.py).
  - `jm.created(policy)` when a job is admitted and stored; `jm.refused(refusal_reason(status, code))` for every
    refused POST /v1/videos (the API's error handlers: 429 queue_full, 400/422 invalid, ...). Refusals by Serve's
    own backpressure (the ingress's max_queued_requests) never reach srserve's code: see Serve's HTTP panels.
  - `jm.completed(policy, created_at, result)` when `store.complete` says "completed": Decode's result carries
    every stage event of the attempt that completed, so it records, at completion (the driver no longer sees stage
    starts or steps as they happen: stages report to the store, and the watchdog reads it only every interval):
    `started` (queue wait: created -> the attempt's first stage start), `first_progress` (created -> its first
    denoising step done, the `first_step_at` of the denoising stages' end events) and `ended` (completed, with the
    switch step). So queue wait and time to first progress cover completed jobs only; for a retried job they
    measure up to the attempt that completed.
  - `jm.retried(err)` when `retry_or_fail` answers "retry".
  - `jm.ended(status, reason, policy, seconds)` once per job at any other terminal state the driver reaches
    (failed: timeout, retries_exhausted or the error's class; cancelled). Jobs ended by the store itself while no
    driver held them (`claim_orphans`, `begin_attempt` of a job cancelled between attempts) are not counted.
  - `jm.set_in_flight(n)` whenever the driver's set of active jobs changes; `jm.set_flex_in_flight(n)` whenever
    its count of jobs on flex replicas does (AppArgs.flex).
  - `jm.set_slo(slo.gauges(state))` after each tick of the ingress's SLO controller (AppArgs.slo; switch_cap.py).
- `StoreMetrics()`: `with st.timed(op): ...` around each job-store operation, in JobStoreDeployment's wrapper.
- GPU gauges: `srserve.serving.gpu.start_gpu_sampler(pool)` once per stage replica (`_Stage.__init__`, pool = the
  stage's `pool` option, "none" without one).
`policy_kind(text)`, `failure_reason(err)` and `refusal_reason(status, code)` turn a switch string, an exception and
an HTTP refusal into bounded label values.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator, Mapping

from srserve.serving.metrics_backend import (  # noqa: F401  (configure, registry: re-exported for callers)
    NAMESPACE, Kind, MetricDef, backend_name, configure, record_metric, registry)

# Seconds, 1 ms .. 10 min: millisecond CPU steps and seconds-long GPU steps both land mid-range; whole minutes
# from 10 s up, so a latency SLO (10 s, 30 s, 1 min, 5 min...) is a bucket bound.
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
           300.0, 600.0)
JOB_SECONDS = SECONDS + (1200.0, 1800.0, 3600.0)  # a job under load queues behind others: up to an hour
BATCH = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0)
STEPS = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 14.0, 16.0, 20.0, 25.0, 30.0, 40.0, 50.0,
         60.0, 80.0, 100.0)  # Ray wants boundaries > 0: 0.5 holds k = 0 (small-only)
BYTES = (1e3, 1e4, 1e5, 1e6, 3e6, 1e7, 3e7, 1e8, 3e8, 1e9, 3e9, 1e10)

STAGES = ("encode", "sketch", "render", "decode", "colocated")
ROLES = ("encode", "sketch", "render", "decode")
POLICIES = ("none", "small-only", "step", "ratio", "adaptive")
STATUSES = ("completed", "failed", "cancelled")
OUTCOMES = ("ok", "cancelled", "failed")
FAILURE_REASONS = ("none", "cancelled", "replica_lost", "stalled", "timeout", "oom", "retries_exhausted",
                   "lease_expired", "invalid", "error")
REFUSAL_REASONS = ("queue_full", "quota", "deadline", "not_ready", "too_large", "invalid")
STORE_OPS = ("ping", "get", "list", "create", "begin_attempt", "renew", "watch", "claim_orphans", "retry_or_fail",
             "fail", "complete", "complete_and_get", "mark_cancelled", "delete", "report", "stage_started",
             "heartbeat", "stage_finished", "expired", "purge")  # SQLiteJobStore's public methods
PHASES = {"serialize_s": "serialize", "transit_s": "transit", "deserialize_s": "deserialize"}
EMBEDDINGS_HOP = "encode->{dst}:embeddings"  # the prompt embeddings, fetched by reference (phase "fetch")
OTHER = "other"
# srserve.control.slo.gauges() names defined here under others (metric names carry no digits, so not "p95").
SLO_GAUGES = {"srserve_slo_observed_p95_seconds": "srserve_slo_observed_latency_seconds",
              "srserve_slo_projected_p95_seconds": "srserve_slo_projected_latency_seconds"}


def _m(name: str, kind: Kind, description: str, labels: tuple[str, ...], buckets: tuple[float, ...] = ()
       ) -> MetricDef:
    return MetricDef(f"srserve_{name}", kind, description, labels, buckets)


_STAGE = ("stage", "model")
_JOB = ("model", "policy")
_GPU = ("pool", "gpu")
METRICS: dict[str, MetricDef] = {d.name: d for d in (
    _m("stage_requests_in_flight", "gauge", "Requests in this replica's batch.", _STAGE),
    _m("stage_requests_waiting", "gauge", "Requests received, waiting to join a batch.", _STAGE),
    _m("stage_batch_size", "histogram", "Requests per forward pass.", _STAGE + ("role",), BATCH),
    _m("step_seconds", "histogram", "Seconds per forward pass (a denoising step; one encode or decode).",
       _STAGE + ("role",), SECONDS),
    _m("stage_seconds", "histogram", "Seconds one request spent in the stage.", _STAGE + ("outcome",), SECONDS),
    _m("handoff_bytes", "histogram", "Bytes of the state handed over, per hop.", ("model", "hop"), BYTES),
    _m("handoff_seconds", "histogram", "Seconds per hop and phase (serialize, transit, deserialize).",
       ("model", "hop", "phase"), SECONDS),
    _m("prompt_cache_hits", "counter", "Prompt-embedding cache hits.", _STAGE),
    _m("prompt_cache_misses", "counter", "Prompt-embedding cache misses.", _STAGE),
    _m("jobs_created", "counter", "Jobs admitted.", _JOB),
    _m("jobs_ended", "counter", "Jobs that reached a terminal state.", ("model", "status", "reason")),
    _m("jobs_in_flight", "gauge", "Jobs this driver replica is running.", ("model",)),
    _m("flex_jobs_in_flight", "gauge", "Jobs this driver replica runs on flex replicas (whole, beside the pools).",
       ("model",)),
    _m("admission_refusals", "counter", "Requests refused at admission.", ("model", "reason")),
    _m("job_retries", "counter", "Job attempts retried.", ("model", "reason")),
    _m("job_seconds", "histogram", "Seconds from creation to the terminal state.", _JOB + ("status",),
       JOB_SECONDS),
    _m("job_queue_seconds", "histogram", "Seconds from creation to the first stage start.", _JOB, JOB_SECONDS),
    _m("job_first_progress_seconds", "histogram", "Seconds from creation to the first progress.", _JOB,
       JOB_SECONDS),
    _m("job_switch_step", "histogram", "Sketch steps k before the switch to the render model.", _JOB, STEPS),
    # The SLO controller of each ingress replica (srserve.control.slo.gauges names them; AppArgs.slo).
    _m("switch_cap_steps", "gauge", "Sketch steps the SLO controller caps new jobs at (reference steps; -1: none).",
       ("model",)),
    _m("slo_threatened", "gauge", "1 while the p95 end-to-end latency threatens the SLO, else 0.", ("model",)),
    _m("slo_observed_latency_seconds", "gauge", "p95 end-to-end seconds of the jobs completed since the cap's "
       "last move (NaN: too few).", ("model",)),
    _m("slo_projected_latency_seconds", "gauge", "p95 of admission's projected completion seconds of the jobs "
       "created since the last tick (NaN: none).", ("model",)),
    _m("store_op_seconds", "histogram", "Job-store operation seconds.", ("op", "status"), SECONDS),
    _m("gpu_sampler_up", "gauge", "1 while the NVML sampler runs, 0 where NVML or GPUs are absent.", ("pool",)),
    _m("gpu_utilization_percent", "gauge", "GPU utilisation (NVML), percent.", _GPU),
    _m("gpu_memory_used_bytes", "gauge", "GPU memory used, bytes.", _GPU),
    _m("gpu_memory_total_bytes", "gauge", "GPU memory total, bytes.", _GPU),
    _m("gpu_power_watts", "gauge", "GPU power draw, watts.", _GPU),
    _m("gpu_temperature_celsius", "gauge", "GPU temperature, degrees Celsius.", _GPU),
)}


def record(name: str, value: float, tags: Mapping[str, str]) -> None:
    """Record one value of a defined metric (KeyError for an undefined name); never raises otherwise."""
    record_metric(METRICS[name], value, tags)


def bounded(value: str | None, allowed: tuple[str, ...]) -> str:
    return value if value in allowed else OTHER


def policy_kind(switch: str | None) -> str:
    """`adaptive:0.02:min=3` -> "adaptive"; anything unknown -> "other"."""
    return bounded((switch or "").strip().lower().partition(":")[0], POLICIES)


_REASON_BY_TYPE = {"JobCancelled": "cancelled", "CancelledError": "cancelled", "StageStalled": "stalled",
                   "TimeoutError": "timeout", "OutOfMemoryError": "oom", "MemoryError": "oom",
                   "RayActorError": "replica_lost", "ActorUnavailableError": "replica_lost",
                   "ObjectLostError": "replica_lost", "OwnerDiedError": "replica_lost",
                   "DeploymentUnavailableError": "replica_lost", "ValidationError": "invalid"}


def refusal_reason(status: int, code: str | None = None) -> str:
    """The bounded reason of a refused create: 429 queue_full (or quota), 503 not_ready, 413 too_large,
    400/422 invalid, anything else "other"."""
    if status == 429:
        return "queue_full" if code in (None, "queue_full") else bounded(code, REFUSAL_REASONS)
    return {503: "not_ready", 413: "too_large", 400: "invalid", 422: "invalid"}.get(status, OTHER)


def failure_reason(err: BaseException | str | None) -> str:
    """A bounded reason for an exception (walking Ray's `.cause` chain), a reason name, or a `describe()` line
    ("TimeoutError: ..."); None -> "none", anything unknown -> "error"."""
    if err is None:
        return "none"
    if isinstance(err, str):
        return err if err in FAILURE_REASONS else _REASON_BY_TYPE.get(err.partition(":")[0].strip(), "error")
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        for cls in type(err).__mro__:
            if cls.__name__ in _REASON_BY_TYPE:
                return _REASON_BY_TYPE[cls.__name__]
        seen.add(id(err))
        err = getattr(err, "cause", None) or err.__cause__
    return "error"


class StageMetrics:
    """The metrics of one stage replica; label dicts are built once, so each call is a dict merge and a record."""

    def __init__(self, stage: str, model: str) -> None:
        self.stage, self.model = bounded(stage, STAGES), model
        self._tags = {"stage": self.stage, "model": model}
        self._role = self.stage if self.stage in ROLES else OTHER
        self._lock = threading.Lock()
        self._parts: dict[str | None, tuple[int, int]] = {}
        self._load: tuple[int, int] | None = None

    def set_load(self, in_flight: int, waiting: int, part: str | None = None) -> None:
        """The replica's load; with `part`, this part's share (the gauges show the sum over parts: the roles of
        a Colocated replica). Thread-safe; a value equal to the last one recorded is not recorded again."""
        with self._lock:
            self._parts[part] = (in_flight, waiting)
            load = (sum(p[0] for p in self._parts.values()), sum(p[1] for p in self._parts.values()))
            if load == self._load:
                return
            self._load = load
            record("srserve_stage_requests_in_flight", load[0], self._tags)
            record("srserve_stage_requests_waiting", load[1], self._tags)

    def observe_step(self, seconds: float, batch_size: int, role: str | None = None) -> None:
        tags = {**self._tags, "role": bounded(role, ROLES) if role else self._role}
        record("srserve_step_seconds", seconds, tags)
        record("srserve_stage_batch_size", batch_size, tags)

    @contextlib.contextmanager
    def step(self, batch_size: int, role: str | None = None) -> Iterator[None]:
        """`with sm.step(len(batch), "sketch"): ...` times one forward pass (also when it raises)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.observe_step(time.perf_counter() - began, batch_size, role)

    def observe_stage(self, seconds: float, outcome: str = "ok") -> None:
        record("srserve_stage_seconds", seconds, {**self._tags, "outcome": bounded(outcome, OUTCOMES)})

    @contextlib.contextmanager
    def in_stage(self) -> Iterator[None]:
        """`with sm.in_stage(): ...` times one request through the stage: outcome ok, or cancelled / failed by
        the exception that left it (Colocated: the whole request, its four roles together)."""
        began = time.perf_counter()
        try:
            yield
        except BaseException as err:
            self.observe_stage(time.perf_counter() - began,
                               "cancelled" if failure_reason(err) == "cancelled" else "failed")
            raise
        self.observe_stage(time.perf_counter() - began)

    def observe_handoff(self, src: str, transfer: Mapping[str, float] | None, dst: str | None = None) -> None:
        """`transfer` is `StageMessage.transfer` (bytes, serialize_s, transit_s, deserialize_s) at the receiver."""
        if not transfer:
            return
        hop = f"{bounded(src, ROLES)}->{bounded(dst, ROLES) if dst else self._role}"
        record("srserve_handoff_bytes", transfer.get("bytes", 0.0), {"model": self.model, "hop": hop})
        for key, phase in PHASES.items():
            if key in transfer:
                record("srserve_handoff_seconds", transfer[key], {"model": self.model, "hop": hop, "phase": phase})
        if "embeddings_bytes" in transfer:  # set by the denoising stages that fetched the embeddings by reference
            hop = EMBEDDINGS_HOP.format(dst=hop.partition("->")[2])
            record("srserve_handoff_bytes", transfer["embeddings_bytes"], {"model": self.model, "hop": hop})
            if "embeddings_s" in transfer:
                record("srserve_handoff_seconds", transfer["embeddings_s"],
                       {"model": self.model, "hop": hop, "phase": "fetch"})

    def cache_hit(self) -> None:
        record("srserve_prompt_cache_hits", 1, self._tags)

    def cache_miss(self) -> None:
        record("srserve_prompt_cache_misses", 1, self._tags)


_DEFAULT_REASON = {"completed": "none", "cancelled": "cancelled"}


class JobMetrics:
    """Job-level metrics, recorded by the replica that drives jobs (the ingress)."""

    def __init__(self, model: str) -> None:
        self.model = model

    def _job(self, policy: str | None) -> dict[str, str]:
        return {"model": self.model, "policy": policy_kind(policy)}

    def created(self, policy: str | None) -> None:
        record("srserve_jobs_created", 1, self._job(policy))

    def refused(self, reason: str) -> None:
        record("srserve_admission_refusals", 1, {"model": self.model, "reason": bounded(reason, REFUSAL_REASONS)})

    def started(self, policy: str | None, queue_seconds: float) -> None:
        record("srserve_job_queue_seconds", queue_seconds, self._job(policy))

    def first_progress(self, policy: str | None, seconds: float) -> None:
        record("srserve_job_first_progress_seconds", seconds, self._job(policy))

    def retried(self, reason: str | BaseException) -> None:
        record("srserve_job_retries", 1, {"model": self.model, "reason": failure_reason(reason)})

    def ended(self, status: str, reason: str | BaseException | None = None, policy: str | None = None,
              seconds: float | None = None, switch_step: int | None = None) -> None:
        status = bounded(status, STATUSES)
        # Without a reason: completed -> "none", cancelled -> "cancelled", failed -> "error".
        why = failure_reason(reason) if reason is not None else _DEFAULT_REASON.get(status, "error")
        record("srserve_jobs_ended", 1, {"model": self.model, "status": status, "reason": why})
        if seconds is not None:
            record("srserve_job_seconds", seconds, {**self._job(policy), "status": status})
        if switch_step is not None:
            record("srserve_job_switch_step", max(switch_step, 0.5), self._job(policy))  # k = 0 -> first bucket

    def completed(self, policy: str | None, created_at: float, result: Mapping) -> None:
        """A job that completed, from Decode's `result`: its stage events (`reports`) give the queue wait (created
        -> first stage start) and the time to first progress (created -> first denoising step done, the
        `first_step_at` of the denoising stages' end events); then `ended("completed", ...)`."""
        reports = result.get("reports") or ()
        starts = [e["at"] for e in reports if e.get("kind") == "start" and e.get("at")]
        if starts:
            self.started(policy, max(0.0, min(starts) - created_at))
        firsts = [(e.get("info") or {}).get("first_step_at") for e in reports if e.get("kind") == "end"]
        firsts = [at for at in firsts if at]
        if firsts:
            self.first_progress(policy, max(0.0, min(firsts) - created_at))
        self.ended("completed", None, policy, max(0.0, time.time() - created_at), result.get("switch_step"))

    def set_in_flight(self, jobs: int) -> None:
        record("srserve_jobs_in_flight", jobs, {"model": self.model})

    def set_flex_in_flight(self, jobs: int) -> None:
        record("srserve_flex_jobs_in_flight", jobs, {"model": self.model})

    def set_slo(self, gauges: Mapping[str, float]) -> None:
        """The SLO controller's state (`srserve.control.slo.gauges`), after each of its ticks."""
        for name, value in gauges.items():
            record(SLO_GAUGES.get(name, name), value, {"model": self.model})


class StoreMetrics:
    """Job-store operation latency by op (and whether it raised)."""

    def observe(self, op: str, seconds: float, ok: bool = True) -> None:
        record("srserve_store_op_seconds", seconds, {"op": bounded(op, STORE_OPS), "status": "ok" if ok else "error"})

    @contextlib.contextmanager
    def timed(self, op: str) -> Iterator[None]:
        began, ok = time.perf_counter(), False
        try:
            yield
            ok = True
        finally:
            self.observe(op, time.perf_counter() - began, ok)
