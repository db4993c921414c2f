"""Stage-ratio autoscaling: size encode, sketch, render and decode together from their queues, in-flight work and
per-request stage costs, which move with the switch step k (sketch k x t_large, render (N - k) x t_small).

The decision is `decide(inputs, config, state)`, a pure function of recorded inputs; `StageRatioPolicy` is the
application-level policy Ray Serve 2.60 calls with one `AutoscalingContext` per autoscaling deployment, and
`StageStats` is what each replica keeps for `record_autoscaling_stats`.

Per stage s, with arrival rate lam, cost c_s (busy seconds of one replica per request), backlog B_s (requests queued
here, plus those queued upstream when `couple`: they will arrive within the horizon) and in-flight work I_s:

    need_s = max(lam x c_s, I_s / concurrency_s) / target_utilization + B_s x c_s / (drain_horizon_s x concurrency_s)

c_sketch = k x t_sketch_step and c_render = (N - k) x t_render_step when the sketch reports the recent switch step k
(so a lower switch cap moves replicas from sketch to render at once); otherwise the stage's measured seconds per
request. Hysteresis: up only when need > replicas + up_tolerance, down only to ceil(need + down_hysteresis). A change
waits until the stage has wanted it for upscale_delay_s (or downscale_delay_s) without a break, and never comes
sooner than cooldown_s after the stage's last change: a load hovering at a threshold changes a stage at most once per
delay.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

STAGES = ("encode", "sketch", "render", "decode")  # pipeline order
DEFAULT_DEPLOYMENTS = {"Encode": "encode", "Sketch": "sketch", "Render": "render", "Decode": "decode"}
STATE_KEY = "srserve"  # our part of each deployment's Serve policy_state

# What each replica reports from `record_autoscaling_stats` (Serve averages each over look_back_period_s per replica).
METRIC_QUEUED = "srserve_queued"  # requests waiting inside this replica (e.g. a denoising stage's inbox)
METRIC_IN_FLIGHT = "srserve_in_flight"  # requests being processed
METRIC_SECONDS = "srserve_seconds_per_request"  # busy seconds per request (recent mean)
METRIC_ARRIVALS = "srserve_arrivals_per_s"  # requests this replica started per second (recent)
METRIC_STEP_SECONDS = "srserve_step_seconds"  # sketch/render: seconds per denoising step per request
METRIC_SWITCH_STEP = "srserve_switch_step"  # sketch: mean switch step k of the requests it finished
METRIC_NUM_STEPS = "srserve_num_steps"  # sketch/render: mean step count N
SUMMED = (METRIC_QUEUED, METRIC_IN_FLIGHT, METRIC_ARRIVALS)


@dataclass(frozen=True)
class StageInput:
    replicas: int  # the stage's current target
    min_replicas: int = 1
    max_replicas: int = 1
    queued: float = 0.0
    in_flight: float = 0.0
    seconds_per_request: float | None = None  # measured busy seconds of one replica per request
    step_seconds: float | None = None  # sketch/render: seconds per step per request
    concurrency: int = 1  # requests one replica serves at once (a denoising batch)


@dataclass(frozen=True)
class PipelineInput:
    now: float
    stages: Mapping[str, StageInput]  # only the stages that autoscale
    arrival_rate: float | None = None  # requests per second entering the pipeline
    switch_step: float | None = None  # recent mean k (sketch steps), the switch cap included
    num_steps: float | None = None  # recent mean N


@dataclass(frozen=True)
class AutoscaleConfig:
    target_utilization: float = 0.8
    drain_horizon_s: float = 120.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 300.0
    cooldown_s: float | None = None  # default: upscale_delay_s
    up_tolerance: float = 0.1
    down_hysteresis: float = 0.5
    max_step_up: int | None = None  # most replicas one change adds (None: as many as needed)
    couple: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.target_utilization <= 1:
            raise ValueError(f"target_utilization must be in (0, 1], got {self.target_utilization}")
        for name in ("drain_horizon_s",):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("upscale_delay_s", "downscale_delay_s", "up_tolerance", "down_hysteresis"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    @property
    def cooldown(self) -> float:
        return self.upscale_delay_s if self.cooldown_s is None else self.cooldown_s


@dataclass
class StageState:
    """A stage's memory between decisions: when it last changed, and the change it has wanted since when."""

    last_change_at: float | None = None
    pending: int | None = None
    pending_since: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "StageState":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in names})


@dataclass(frozen=True)
class StageDecision:
    replicas: int
    need: float  # replicas the load asks for (before hysteresis, delays and bounds)
    cost_s: float | None  # the per-request cost used
    reason: str


def stage_cost(stage: str, s: StageInput, inputs: PipelineInput) -> float | None:
    """Busy seconds of one replica per request: from the switch step for sketch/render when known, else measured."""
    k, n = inputs.switch_step, inputs.num_steps
    if s.step_seconds is not None and k is not None and n is not None:
        if stage == "sketch":
            return max(k, 0.0) * s.step_seconds
        if stage == "render":
            return max(n - k, 0.0) * s.step_seconds
    return s.seconds_per_request


def stage_need(stage: str, inputs: PipelineInput, config: AutoscaleConfig) -> tuple[float, float | None]:
    """(replicas needed, the cost used) for one stage."""
    s = inputs.stages[stage]
    cost = stage_cost(stage, s, inputs)
    conc = max(s.concurrency, 1)
    backlog = s.queued
    if config.couple:
        upstream = STAGES[:STAGES.index(stage)] if stage in STAGES else ()
        backlog += sum(inputs.stages[u].queued for u in upstream if u in inputs.stages)
    busy = s.in_flight / conc
    if cost is None:  # nothing measured yet: follow occupancy, and drain the queue as if a request took a replica
        return (busy + backlog / conc) / config.target_utilization, None
    flow = inputs.arrival_rate * cost / conc if inputs.arrival_rate is not None else 0.0
    need = max(flow, busy) / config.target_utilization + backlog * cost / (config.drain_horizon_s * conc)
    return need, cost


def _candidate(need: float, s: StageInput, config: AutoscaleConfig, has_work: bool) -> int:
    r = s.replicas
    lo, hi = s.min_replicas, max(s.max_replicas, s.min_replicas)
    if has_work:
        lo = max(lo, 1)  # never scale a stage with work to zero
    if need > r + config.up_tolerance:
        want = math.ceil(need - 1e-9)
        if config.max_step_up is not None:
            want = min(want, r + config.max_step_up)
    elif not has_work and need <= 0:
        want = lo  # idle: down to the minimum (zero if allowed)
    elif math.ceil(need + config.down_hysteresis - 1e-9) < r:
        want = math.ceil(need + config.down_hysteresis - 1e-9)
    else:
        want = r
    return min(max(want, lo), hi)


def decide(inputs: PipelineInput, config: AutoscaleConfig, state: Mapping[str, StageState | Mapping[str, Any]]
           ) -> tuple[dict[str, int], dict[str, StageState], dict[str, StageDecision]]:
    """Desired replicas per autoscaling stage, the new state, and why. Pure: same inputs, same outputs."""
    now = inputs.now
    replicas: dict[str, int] = {}
    new_state: dict[str, StageState] = {}
    why: dict[str, StageDecision] = {}
    for stage, s in inputs.stages.items():
        st = state.get(stage)
        st = StageState(**st.to_dict()) if isinstance(st, StageState) else StageState.from_dict(st)
        need, cost = stage_need(stage, inputs, config)
        want = _candidate(need, s, config, has_work=s.queued + s.in_flight > 0)
        current = s.replicas
        out_of_bounds = not s.min_replicas <= current <= max(s.max_replicas, s.min_replicas)
        if want == current:
            st.pending = st.pending_since = None
            reason = "steady"
        elif out_of_bounds:  # bounds changed under us: follow them at once
            current, reason = want, "bounds"
            st.pending = st.pending_since = None
            st.last_change_at = now
        else:
            up = want > current
            if st.pending is None or (st.pending > current) != up:
                st.pending_since = now
            st.pending = want
            delay = config.upscale_delay_s if up else config.downscale_delay_s
            waited = now - st.pending_since
            cooled = st.last_change_at is None or now - st.last_change_at >= config.cooldown - 1e-9
            if waited >= delay - 1e-9 and cooled:
                current, reason = want, "scale up" if up else "scale down"
                st.last_change_at = now
                st.pending = st.pending_since = None
            else:
                reason = f"waiting to scale {'up' if up else 'down'} to {want}"
        replicas[stage] = current
        new_state[stage] = st
        why[stage] = StageDecision(current, round(need, 4), cost, reason)
    return replicas, new_state, why


# --- what replicas report ----------------------------------------------------------------------------------------
class StageStats:
    """Per-replica figures for `record_autoscaling_stats` (thread-safe; no Ray): starts per second over the last
    `window_s`, and moving averages (weight 0.2 on the newest) of seconds per request, switch step, step count and
    seconds per step.

    The stage calls `started()` when a request begins, `finished(seconds, ...)` when it ends, and returns
    `snapshot(queued, in_flight)` from its `record_autoscaling_stats` method.
    """

    def __init__(self, window_s: float = 60.0, clock: Any = time.monotonic) -> None:
        self.window_s, self.clock = window_s, clock
        self._lock = threading.Lock()
        self._means: dict[str, float] = {}
        self._starts: list[float] = []

    def started(self) -> None:
        with self._lock:
            self._starts.append(self.clock())

    def finished(self, seconds: float, *, switch_step: float | None = None, num_steps: float | None = None,
                 step_seconds: float | None = None) -> None:
        with self._lock:
            for name, value in ((METRIC_SECONDS, seconds), (METRIC_SWITCH_STEP, switch_step),
                                (METRIC_NUM_STEPS, num_steps), (METRIC_STEP_SECONDS, step_seconds)):
                if value is not None:
                    old = self._means.get(name)
                    self._means[name] = float(value) if old is None else 0.8 * old + 0.2 * float(value)

    def snapshot(self, queued: float, in_flight: float) -> dict[str, float]:
        now = self.clock()
        with self._lock:
            self._starts = [t for t in self._starts if now - t <= self.window_s]
            rate = len(self._starts) / self.window_s
            return {METRIC_QUEUED: float(queued), METRIC_IN_FLIGHT: float(in_flight), METRIC_ARRIVALS: rate,
                    **self._means}


# --- the Ray Serve adapter ---------------------------------------------------------------------------------------
def _metric(ctx: Any, name: str) -> float | None:
    per_replica = (getattr(ctx, "aggregated_metrics", None) or {}).get(name) or {}
    values = [float(v) for v in per_replica.values() if v is not None and not math.isnan(float(v))]
    if not values:
        return None
    return sum(values) if name in SUMMED else sum(values) / len(values)


def inputs_from_contexts(contexts: Mapping[Any, Any], deployments: Mapping[str, str],
                         concurrency: Mapping[str, int] | None = None) -> tuple[PipelineInput, dict[str, Any]]:
    """The policy's inputs from Serve's contexts (one per autoscaling deployment), and stage -> deployment id."""
    stages: dict[str, StageInput] = {}
    ids: dict[str, Any] = {}
    by_stage: dict[str, Any] = {}
    now = None
    for dep_id, ctx in contexts.items():
        stage = deployments.get(ctx.deployment_name)
        if stage is None:
            continue
        ids[stage], by_stage[stage] = dep_id, ctx
        now = ctx.current_time if ctx.current_time is not None else now
        replica_queued = _metric(ctx, METRIC_QUEUED)
        in_flight = _metric(ctx, METRIC_IN_FLIGHT)
        handle_queued = float(ctx.total_queued_requests or 0.0)
        if in_flight is None:  # no custom metrics (yet): Serve's own counts (ongoing less queued at handles)
            in_flight = max(0.0, float(ctx.total_num_requests or 0.0) - handle_queued)
        stages[stage] = StageInput(
            replicas=int(ctx.target_num_replicas), min_replicas=int(ctx.capacity_adjusted_min_replicas),
            max_replicas=int(ctx.capacity_adjusted_max_replicas), queued=handle_queued + (replica_queued or 0.0),
            in_flight=in_flight, seconds_per_request=_metric(ctx, METRIC_SECONDS),
            step_seconds=_metric(ctx, METRIC_STEP_SECONDS), concurrency=int((concurrency or {}).get(stage, 1)))
    arrival = next((a for a in (_metric(by_stage[s], METRIC_ARRIVALS) for s in STAGES if s in by_stage)
                    if a is not None), None)
    sketch, any_denoise = by_stage.get("sketch"), [by_stage[s] for s in ("sketch", "render") if s in by_stage]
    switch_step = _metric(sketch, METRIC_SWITCH_STEP) if sketch is not None else None
    num_steps = next((n for n in (_metric(c, METRIC_NUM_STEPS) for c in any_denoise) if n is not None), None)
    return PipelineInput(now if now is not None else time.time(), stages, arrival, switch_step, num_steps), ids


class StageRatioPolicy:
    """Ray Serve application-level autoscaling policy (`autoscaling_policy.policy_function` of the application,
    `policy_kwargs` -> this constructor; Serve instantiates the class once and calls it every control-loop tick with
    {DeploymentID: AutoscalingContext}; it returns ({DeploymentID: replicas}, {DeploymentID: policy_state})).

    kwargs: `deployments` (deployment name -> stage; default Encode/Sketch/Render/Decode), `concurrency` (stage ->
    requests a replica serves at once) and any `AutoscaleConfig` field. Serve applies each deployment's own
    upscale/downscale delays and factors on top: set them to 0 / 1 in those deployments' autoscaling_config, so this
    policy's delays are the only ones.
    """

    def __init__(self, deployments: Mapping[str, str] | None = None, concurrency: Mapping[str, int] | None = None,
                 **config: Any) -> None:
        self.deployments = dict(deployments or DEFAULT_DEPLOYMENTS)
        unknown = sorted(set(self.deployments.values()) - set(STAGES))
        if unknown:
            raise ValueError(f"deployments map to unknown stages {unknown}; stages are {list(STAGES)}")
        self.concurrency = dict(concurrency or {})
        self.config = AutoscaleConfig(**config)
        self.last: dict[str, StageDecision] = {}

    def __call__(self, contexts: Mapping[Any, Any]) -> tuple[dict[Any, int], dict[Any, dict[str, Any]]]:
        inputs, ids = inputs_from_contexts(contexts, self.deployments, self.concurrency)
        state = {stage: (contexts[ids[stage]].policy_state or {}).get(STATE_KEY) for stage in ids}
        replicas, new_state, self.last = decide(inputs, self.config, state)
        decisions = {ids[stage]: n for stage, n in replicas.items()}
        states = {ids[stage]: {STATE_KEY: new_state[stage].to_dict(), f"{STATE_KEY}_need": self.last[stage].need}
                  for stage in replicas}
        return decisions, states


def policy_config(**kwargs: Any) -> dict[str, Any]:
    """The application's `autoscaling_policy` entry for a Serve config (`applications[i].autoscaling_policy`)."""
    return {"policy_function": f"{__name__}:StageRatioPolicy", "policy_kwargs": kwargs}


def deployment_autoscaling_config(min_replicas: int, max_replicas: int, initial_replicas: int | None = None,
                                  metrics_interval_s: float = 2.0, look_back_period_s: float = 10.0) -> dict[str, Any]:
    """A stage's `autoscaling_config` under this policy: Serve's own delays off (the policy has its own)."""
    config: dict[str, Any] = {"min_replicas": min_replicas, "max_replicas": max_replicas,
                              "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
                              "metrics_interval_s": metrics_interval_s, "look_back_period_s": look_back_period_s}
    if initial_replicas is not None:
        config["initial_replicas"] = initial_replicas
    return config


__all__ = ["AutoscaleConfig", "PipelineInput", "StageDecision", "StageInput", "StageRatioPolicy", "StageState",
           "StageStats", "decide", "deployment_autoscaling_config", "inputs_from_contexts", "policy_config",
           "stage_cost", "stage_need"]
