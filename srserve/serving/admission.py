"""Cost-aware admission: what a request costs per stage, what is queued ahead of it, and whether it can finish in time.

Pure Python (no Ray, no torch): the ingress estimates a request's cost, the JobStore checks the quotas and the
deadline against the jobs in flight inside its `create` (atomically, under its lock).

Cost model, per stage, in seconds on one replica:
- a denoising step costs `s_per_token_step x tokens x (1 + tokens / attention_tokens)` (latent tokens after the
  VAE and the 2x2 patch; the second factor is attention's quadratic part), halved without classifier-free guidance;
  sketch runs the switch policy's sketch steps (adaptive: an expected fraction), render the rest;
- encode is a constant, decode is linear in the latent tokens.

Projection (per stage, processor-sharing): a job of cost x sharing a stage of c replicas with jobs whose remaining
costs there are r_i finishes after about max(x, (x + sum min(r_i, x)) / c) - what round-robin or
shortest-remaining-first batch loops give, and what FIFO would only make worse for long jobs. Its stages add up.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from srserve.pipeline.switch import parse_policy

STAGES = ("encode", "sketch", "render", "decode")
DENOISING = ("sketch", "render")
SWITCH = "switch_fraction"  # estimate key: the expected sketch share of the denoising steps (k / N)


@dataclass(frozen=True)
class Shape:
    """What a request's cost depends on."""

    tokens: int  # latent tokens of the video (frames x height x width after the VAE and the patch)
    steps: int
    sketch_steps: float  # expected number of steps on the sketch (large) model
    guided: bool = True  # classifier-free guidance: two forwards per step


def latent_tokens(card: Any, num_frames: int, height: int, width: int) -> int:
    """Tokens the transformers see: temporal VAE stride on frames, `size_multiple` (VAE scale x patch) in space."""
    frames = (num_frames - 1) // card.frame_stride + 1
    return frames * max(1, height // card.size_multiple) * max(1, width // card.size_multiple)


def expected_sketch_steps(switch: str, steps: int, adaptive_fraction: float) -> float:
    """Sketch steps of a switch policy: exact for none, small-only and step:K; for ratio:R the share of a linear
    timestep schedule at or above R; for adaptive the expected fraction, within the policy's bounds."""
    policy = parse_policy(switch)
    if policy.kind == "none":
        return float(steps)
    if policy.kind == "small-only":
        return 0.0
    if policy.kind == "step":
        return float(min(int(policy.value), steps))
    if policy.kind == "ratio":
        return float(min(steps, math.ceil((1.0 - policy.value) * steps)))
    lo, hi = policy.bounds(steps)
    return float(min(max(adaptive_fraction * steps, lo), hi))


def request_shape(generation: Mapping[str, Any], card: Any, adaptive_fraction: float) -> Shape:
    """The shape of a resolved `GenerationRequest` (dumped): its fields are all filled in."""
    steps = int(generation["num_inference_steps"])
    guided = max(float(generation.get("guidance_scale") or 0.0), float(generation.get("guidance_scale_2") or 0.0))
    return Shape(latent_tokens(card, int(generation["num_frames"]), int(generation["height"]),
                               int(generation["width"])),
                 steps, expected_sketch_steps(str(generation["switch"]), steps, adaptive_fraction), guided > 1.0)


@dataclass
class Prices:
    """Seconds per unit of work per stage: from config, refined by what completed jobs measured (EWMA)."""

    sketch: float  # seconds per token-step
    render: float
    encode: float  # seconds per request
    decode: float  # seconds per latent token
    attention_tokens: float = 5000.0
    learn_rate: float = 0.2
    bounds: float = 4.0  # learned prices stay within this factor of the configured ones
    base: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.base = self.base or {s: getattr(self, s) for s in STAGES}

    def effective_tokens(self, tokens: int) -> float:
        return tokens * (1.0 + tokens / self.attention_tokens)

    def units(self, shape: Shape) -> dict[str, float]:
        """Units of work per stage (what a price multiplies)."""
        per_step = self.effective_tokens(shape.tokens) * (1.0 if shape.guided else 0.5)
        return {"encode": 1.0, "sketch": per_step * shape.sketch_steps,
                "render": per_step * (shape.steps - shape.sketch_steps), "decode": float(shape.tokens)}

    def estimate(self, shape: Shape) -> dict[str, float]:
        """Seconds per stage on one replica, plus the expected switch fraction (for progress -> remaining)."""
        units = self.units(shape)
        out = {stage: units[stage] * getattr(self, stage) for stage in STAGES}
        out[SWITCH] = shape.sketch_steps / max(shape.steps, 1)
        return out

    def observe(self, stage: str, seconds: float, units: float) -> None:
        """A stage's measured seconds for `units` of work. Its wall time also holds waiting (for a batch slot, for
        other groups' forwards), which only ever inflates it: prices fall fast and rise slowly."""
        if stage not in STAGES or units <= 0 or not seconds > 0:
            return
        old, seen = getattr(self, stage), seconds / units
        rate = self.learn_rate if seen > old else min(1.0, 2.5 * self.learn_rate)
        base = self.base[stage]
        setattr(self, stage, min(max(old + rate * (seen - old), base / self.bounds), base * self.bounds))

    def learn(self, shape: Shape, stage_seconds: Mapping[str, float], sketch_steps: int | None) -> None:
        """A completed job's stage times; `sketch_steps` is the switch step it really took."""
        if sketch_steps is not None:
            shape = Shape(shape.tokens, shape.steps, float(min(sketch_steps, shape.steps)), shape.guided)
        units = self.units(shape)
        for stage, seconds in stage_seconds.items():
            self.observe(stage, seconds, units.get(stage, 0.0))


def total(estimate: Mapping[str, float]) -> float:
    return sum(estimate.get(stage, 0.0) for stage in STAGES)


def stage_seconds(stages: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Seconds per stage of a job record's `stages` (start/end per stage)."""
    return {name: s["end"] - s["start"] for name, s in stages.items()
            if s.get("end") is not None and s.get("start") is not None and s["end"] >= s["start"]}


# --- what is left, and what it means for a new job ------------------------------------------------------------
def remaining(estimate: Mapping[str, float], progress: int) -> dict[str, float]:
    """Estimated seconds left per stage of a job at `progress` (encode 0-5, sketch then render 5-95 split at the
    switch fraction, decode 95-100; a stage counts whole until its interval is passed, denoising in proportion)."""
    split = 5.0 + 90.0 * float(estimate.get(SWITCH, 0.5))
    spans = {"encode": (0.0, 5.0), "sketch": (5.0, split), "render": (split, 95.0), "decode": (95.0, 100.0)}
    out = {}
    for stage, (lo, hi) in spans.items():
        cost = float(estimate.get(stage, 0.0))
        if stage in DENOISING and hi > lo:
            out[stage] = cost * min(1.0, max(0.0, (hi - progress) / (hi - lo)))
        else:
            out[stage] = cost if progress < hi else 0.0
    return out


def merged(costs: Mapping[str, float]) -> dict[str, float]:
    """Colocated mode: one replica runs every stage, so the stages are one resource."""
    return {"colocated": sum(costs.get(stage, 0.0) for stage in STAGES)}


def projected_s(own: Mapping[str, float], others: Iterable[Mapping[str, float]],
                capacity: Mapping[str, int]) -> float:
    """Seconds until a new job of per-stage cost `own` completes, sharing each stage with `others` (remaining)."""
    others = list(others)
    out = 0.0
    for stage, x in own.items():
        if stage not in capacity or x <= 0:
            continue
        shared = sum(min(float(r.get(stage, 0.0)), x) for r in others)
        out += max(x, (x + shared) / max(1, capacity[stage]))
    return out


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str
    retry_after_s: int | None = None
    param: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "code": self.code, "message": self.message,
                "retry_after_s": self.retry_after_s, "param": self.param}


def retry_after(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def check_deadline(own: Mapping[str, float], mine: list[Mapping[str, float]], theirs: list[Mapping[str, float]],
                   capacity: Mapping[str, int], deadline_s: float, param: str) -> Refusal | None:
    """Refuse a job that would finish after `deadline_s` under the current queue: 422 when it cannot even on an
    idle server, 429 when the caller's own jobs in flight are what is in the way, else 503 (saturated)."""
    alone = projected_s(own, [], capacity)
    if alone > deadline_s:
        return Refusal(422, "deadline_unreachable", f"{param}: the request needs about {alone:.0f}s even on an "
                       f"idle server, over the deadline of {deadline_s:g}s", param=param)
    projected = projected_s(own, mine + theirs, capacity)
    if projected <= deadline_s:
        return None
    without_mine = projected_s(own, theirs, capacity)
    status = 429 if without_mine <= deadline_s else 503
    who = "your jobs in flight" if status == 429 else "the jobs in flight"
    return Refusal(status, "deadline_unreachable", f"with {who} the job would finish in about {projected:.0f}s, "
                   f"past the deadline of {deadline_s:g}s", retry_after(projected - deadline_s))


def largest_field(generation: Mapping[str, Any], card: Any) -> str:
    """The field that grows a request's cost most relative to the model's defaults: size, num_frames or
    num_inference_steps."""
    def latent_frames(frames: int) -> int:
        return (frames - 1) // card.frame_stride + 1

    growth = {"size": int(generation["height"]) * int(generation["width"]) / (card.default_height
                                                                              * card.default_width),
              "num_frames": latent_frames(int(generation["num_frames"])) / latent_frames(card.default_num_frames),
              "num_inference_steps": int(generation["num_inference_steps"]) / card.default_steps}
    return max(growth, key=growth.get)


def check_ceiling(estimate: Mapping[str, float], limit: float | None, generation: Mapping[str, Any], card: Any,
                  size: str) -> Refusal | None:
    """422 when one request's estimated cost is over `max_request_cost_s`, naming the field that grows it most."""
    cost = total(estimate)
    if limit is None or cost <= limit:
        return None
    param = largest_field(generation, card)
    return Refusal(422, "cost_too_high", f"{param}: the request's estimated cost {cost:.0f}s is over "
                   f"max_request_cost_s={limit:g} (size {size}, num_frames {generation['num_frames']}, "
                   f"num_inference_steps {generation['num_inference_steps']}, switch {generation['switch']}); "
                   f"ask for a smaller size, fewer frames or fewer steps", param=param)

WINDOW_S = 60.0  # the per-minute quota's window


def check_quota(quota: Mapping[str, Any], *, in_flight: int, recent: list[float], cost_in_flight: float,
                own_cost: float, soonest_s: float, now: float) -> Refusal | None:
    """One key's quotas (None: no limit). `recent`: created_at of its jobs in the last minute, oldest first;
    `soonest_s`: estimated seconds until one of its jobs in flight finishes."""
    limit = quota.get("max_in_flight")
    if limit is not None and in_flight >= limit:
        return Refusal(429, "quota_in_flight", f"this key has {in_flight} jobs in flight; its limit is "
                       f"max_in_flight={limit}", retry_after(soonest_s))
    limit = quota.get("max_per_minute")
    if limit is not None and len(recent) >= limit:
        leaves = recent[len(recent) - limit] + WINDOW_S  # when the window holds one job fewer than the limit
        return Refusal(429, "quota_per_minute", f"this key created {len(recent)} jobs in the last "
                       f"{WINDOW_S:g}s; its limit is max_per_minute={limit}", retry_after(leaves - now))
    limit = quota.get("max_cost_in_flight")
    if limit is not None and own_cost > limit:
        return Refusal(422, "quota_cost", f"the request's estimated cost {own_cost:.0f}s is over this key's "
                       f"max_cost_in_flight={limit:g}")
    if limit is not None and cost_in_flight + own_cost > limit:
        return Refusal(429, "quota_cost", f"this key's jobs in flight cost about {cost_in_flight:.0f}s; with this "
                       f"one ({own_cost:.0f}s) over its limit max_cost_in_flight={limit:g}",
                       retry_after(cost_in_flight + own_cost - limit))
    return None


def admit(tenant: str, cost: float, estimate: Mapping[str, float],
          active: list[tuple[str, float, int, Mapping[str, float]]], recent: list[float],
          quota: Mapping[str, Any] | None, deadline: Mapping[str, Any] | None, now: float) -> Refusal | None:
    """A new job of `tenant` against the jobs in flight (`active`: tenant, cost, progress, estimate of each):
    its quota, then its `deadline` ({deadline_s, capacity: {stage: replicas}, colocated, param})."""
    left = [(who, remaining(est, progress)) for who, _, progress, est in active]
    mine = [r for who, r in left if who == tenant]
    if quota:
        refusal = check_quota(quota, in_flight=len(mine), recent=recent, own_cost=cost, now=now,
                              cost_in_flight=sum(c for who, c, _, _ in active if who == tenant),
                              soonest_s=min((total(r) for r in mine), default=1.0))
        if refusal is not None:
            return refusal
    if not deadline:
        return None
    own, mine, theirs = _shares(tenant, estimate, left, bool(deadline.get("colocated")))
    return check_deadline(own, mine, theirs, deadline["capacity"], float(deadline["deadline_s"]),
                          deadline.get("param") or "num_inference_steps")


def _shares(tenant: str, estimate: Mapping[str, float], left: list[tuple[str, dict[str, float]]],
            colocated: bool) -> tuple[dict[str, float], list[dict[str, float]], list[dict[str, float]]]:
    """A new job's own remaining costs, the tenant's jobs' and the others' (one resource when colocated)."""
    own = remaining(estimate, 0)
    mine, theirs = [r for who, r in left if who == tenant], [r for who, r in left if who != tenant]
    if colocated:
        own, mine, theirs = merged(own), [merged(r) for r in mine], [merged(r) for r in theirs]
    return own, mine, theirs


def projected_completion(estimate: Mapping[str, float], active: list[tuple[str, float, int, Mapping[str, float]]],
                         capacity: Mapping[str, int], colocated: bool = False) -> float:
    """Seconds until a new job completes under the jobs in flight (`active` as for `admit`): the SLO controller's
    projection of what a job created now will see (srserve.serving.switch_cap)."""
    left = [(who, remaining(est, progress)) for who, _, progress, est in active]
    own, mine, theirs = _shares("", estimate, left, colocated)
    return projected_s(own, mine + theirs, capacity)
