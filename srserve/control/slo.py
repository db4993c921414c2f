"""The SLO-driven switch point: cap the sketch steps (switch earlier) when the p95 end-to-end latency threatens the
SLO, never below a quality floor, and lift the cap as load falls. A client's fixed `switch` is never overridden.

    state = update(SLOInput(now, latencies, projected_p95_s=project_p95(...)), config, state)   # every tick
    result = apply_cap(request.switch, state.cap, request.num_inference_steps, config, client_fixed=...)
    request = request.model_copy(update={"switch": result.switch})                       # job records `result`

Pure functions of recorded inputs; the state is a small dataclass the caller keeps (and exports: `gauges`).

Rule (hysteresis between two thresholds, one move per `interval_s`):
  * pressure = max(observed p95 of jobs finished since the last change (at least `min_samples`), projected p95);
  * pressure > threaten_ratio x target: cap -= step (from the uncapped ceiling), never below floor_steps;
  * pressure < relax_ratio x target: cap += step; at the ceiling the cap is lifted (None);
  * otherwise hold.
The cap counts sketch steps at `reference_steps` (the model's default N); a request with another N gets it scaled.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from srserve.pipeline.switch import DEFAULT_MAX_FRACTION, SwitchPolicy, parse_policy


@dataclass(frozen=True)
class SLOConfig:
    p95_target_s: float
    floor_steps: int  # quality floor: the cap never goes below this many sketch steps (at reference_steps)
    reference_steps: int = 50
    ceiling_steps: int | None = None  # the uncapped latest switch (default: the adaptive rule's max, 60% of N)
    threaten_ratio: float = 0.9
    relax_ratio: float = 0.7
    step: int = 2
    interval_s: float = 30.0
    window_s: float = 300.0
    min_samples: int = 20

    def __post_init__(self) -> None:
        if self.p95_target_s <= 0:
            raise ValueError("p95_target_s must be > 0")
        if not 1 <= self.floor_steps <= self.reference_steps:
            raise ValueError(f"floor_steps must be in [1, reference_steps={self.reference_steps}]")
        if not 0 < self.relax_ratio < self.threaten_ratio:
            raise ValueError("need 0 < relax_ratio < threaten_ratio (the hysteresis band)")
        if self.step < 1 or self.interval_s < 0 or self.window_s <= 0 or self.min_samples < 1:
            raise ValueError("step >= 1, interval_s >= 0, window_s > 0 and min_samples >= 1")
        if self.ceiling_steps is not None and self.ceiling_steps < self.floor_steps:
            raise ValueError("ceiling_steps must be >= floor_steps")

    @property
    def ceiling(self) -> int:
        if self.ceiling_steps is not None:
            return self.ceiling_steps
        return max(self.floor_steps, round(DEFAULT_MAX_FRACTION * self.reference_steps))


@dataclass(frozen=True)
class SLOInput:
    now: float
    latencies: Sequence[tuple[float, float]] = ()  # (finished_at, end-to-end seconds) of recent jobs
    projected_p95_s: float | None = None


@dataclass(frozen=True)
class SLOState:
    cap: int | None = None  # sketch steps at reference_steps; None: no cap
    last_change_at: float | None = None
    threatened: bool = False
    observed_p95_s: float | None = None
    projected_p95_s: float | None = None
    reason: str = "start"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def p95(values: Sequence[float]) -> float | None:
    """The 95th percentile (nearest rank)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def observed_p95(inp: SLOInput, config: SLOConfig, since: float | None) -> float | None:
    start = inp.now - config.window_s
    if since is not None:
        start = max(start, since)  # jobs that finished before the last change saw another cap
    recent = [s for at, s in inp.latencies if start <= at <= inp.now]
    return p95(recent) if len(recent) >= config.min_samples else None


def update(inp: SLOInput, config: SLOConfig, state: SLOState | None = None) -> SLOState:
    """The controller's next state (its `cap` is what new requests get)."""
    state = state or SLOState()
    observed = observed_p95(inp, config, state.last_change_at)
    known = [v for v in (observed, inp.projected_p95_s) if v is not None]
    pressure = max(known) if known else None
    threatened = pressure is not None and pressure > config.threaten_ratio * config.p95_target_s
    relaxed = pressure is not None and pressure < config.relax_ratio * config.p95_target_s
    cooled = state.last_change_at is None or inp.now - state.last_change_at >= config.interval_s - 1e-9
    cap, reason, changed = state.cap, "hold", False
    if pressure is None:
        reason = "no signal"
    elif threatened:
        current = config.ceiling if cap is None else cap
        lowered = max(config.floor_steps, current - config.step)
        if lowered < current and cooled:
            cap, reason, changed = lowered, "lower cap", True
        else:
            reason = "at floor" if current <= config.floor_steps else "waiting to lower"
    elif relaxed and cap is not None:
        if cooled:
            raised = cap + config.step
            cap, reason, changed = (None if raised >= config.ceiling else raised), "raise cap", True
        else:
            reason = "waiting to raise"
    return SLOState(cap=cap, last_change_at=inp.now if changed else state.last_change_at, threatened=threatened,
                    observed_p95_s=observed, projected_p95_s=inp.projected_p95_s, reason=reason)


def project_p95(stages: Mapping[str, Any], switch_step: float | None, num_steps: float | None,
                tail_factor: float = 1.5) -> float | None:
    """A new request's projected latency, inflated to a p95: sum over stages of (ahead / servers + 1) x cost, x
    `tail_factor`, where ahead = the queue, plus one when every server is busy. `stages` maps stage ->
    autoscale.StageInput (queued, in_flight, replicas, concurrency, costs)."""
    from srserve.control.autoscale import PipelineInput, stage_cost

    inputs = PipelineInput(now=0.0, stages=stages, switch_step=switch_step, num_steps=num_steps)
    total = 0.0
    for name, s in stages.items():
        cost = stage_cost(name, s, inputs)
        if cost is None:
            return None
        servers = max(s.replicas, 1) * max(s.concurrency, 1)
        ahead = s.queued + max(s.in_flight - servers + 1, 0.0)
        total += (ahead / servers + 1.0) * cost
    return total * tail_factor


@dataclass(frozen=True)
class CapResult:
    switch: str  # the policy the request runs
    requested: str  # the policy it asked for (or the model's default)
    cap_steps: int | None  # the cap in force, in this request's steps
    capped: bool  # whether the cap changed the policy

    def record(self) -> dict[str, Any]:
        """What the job records: the cap in force and the switch it got."""
        return {"switch_cap": self.cap_steps, "switch_requested": self.requested, "switch_applied": self.switch}


def scaled_cap(cap: int | None, num_steps: int, config: SLOConfig) -> int | None:
    if cap is None:
        return None
    return max(1, min(num_steps, round(cap * num_steps / config.reference_steps)))


def apply_cap(switch: str, cap: int | None, num_steps: int, config: SLOConfig, *, client_fixed: bool) -> CapResult:
    """The switch policy a request runs under the cap. `client_fixed`: the client chose `switch` itself.

    adaptive (the client's or the default): its `max=` lowered to the cap (never below its own `min=`);
    step:K chosen by the client, ratio:R, none and small-only: untouched; step:K from the model's default: min(K, cap).
    """
    policy = parse_policy(switch)
    requested = str(policy)
    k_cap = scaled_cap(cap, num_steps, config)
    if k_cap is None:
        return CapResult(requested, requested, None, False)
    if policy.kind == "adaptive":
        lo, hi = policy.bounds(num_steps)
        new_hi = max(min(hi, k_cap), lo)
        if new_hi >= hi:
            return CapResult(requested, requested, k_cap, False)
        capped = SwitchPolicy("adaptive", policy.value, policy.min_step, new_hi)
        return CapResult(str(capped), requested, k_cap, True)
    if policy.kind == "step" and not client_fixed and int(policy.value) > k_cap:
        return CapResult(f"step:{k_cap}", requested, k_cap, True)
    return CapResult(requested, requested, k_cap, False)


def gauges(state: SLOState) -> dict[str, float]:
    """The controller's state as metric values (the cap is -1 when none is in force)."""
    return {"srserve_switch_cap_steps": float(-1 if state.cap is None else state.cap),
            "srserve_slo_threatened": float(state.threatened),
            "srserve_slo_observed_p95_seconds": float("nan") if state.observed_p95_s is None else state.observed_p95_s,
            "srserve_slo_projected_p95_seconds": float("nan") if state.projected_p95_s is None
            else state.projected_p95_s}


__all__ = ["CapResult", "SLOConfig", "SLOInput", "SLOState", "apply_cap", "gauges", "observed_p95", "p95",
           "project_p95", "scaled_cap", "update"]
