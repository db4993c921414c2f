"""Which requests a denoising stage steps next: weighted fair queuing over requests, in seconds of device time.

A Sketch or Render replica holds every request that reached it (resident); at each step boundary it runs one
forward: the request with the earliest *virtual finish time* and those of its shape that fit in the forward.
Each request carries a virtual time, the device seconds it was given divided by its weight; its next step would
finish at `vtime + step_s / weight`. Stepping the earliest finisher gives each resident request a share of the
device proportional to its weight, whatever its shape: a small request takes many steps while a large one takes
one, in proportion to their per-step costs, so a large forward never gates a small request's every step.

Why this policy and not shortest-remaining-cost-first with aging (issue 11, point 5):
- It is starvation-free by construction: every resident request gets at least its weight's share, with no
  aging rate to tune. SRPT with aging either ages slowly (a long job starves under a stream of short ones) or
  fast, and then a long job that has aged past its remaining cost runs to its end ahead of every newcomer, which
  is the head-of-line blocking this replaces (a 100-step 256x256x65 job holds the device for ~10 minutes).
- It needs no remaining-cost estimate to be correct: an adaptive sketch does not know where it stops.
- The shortest-first benefit is kept where it is safe: a request whose remaining work is under `short_s` weighs
  `short_boost` times more, so a default job among max-size ones finishes almost as if alone, and a long job
  still gets its share (1/(1 + boost x shorts)).
- Classes are weights: "batch" weighs `batch_weight` of "interactive", so an interactive request is stepped
  first and preempts a batch one at the next step boundary, and a batch one still advances at its share (the
  virtual clock is its aging: while it waits, the others' finish times pass its own).
Newcomers start at the system virtual time (the start time of the last request stepped, never decreasing), so a
request gets no credit for time it was not here, and a stream of newcomers cannot restart the clock to starve
a resident. A forward carries at most `max_forward_s` of estimated work (or one request), which bounds how long
a request that arrives mid-forward waits for its first step.

Pure and torch-free: the stage's loop feeds it `StepView`s (what `DenoiseBatch.views()` reports) and the seconds
each forward took; `StepCosts` learns per-shape step seconds from those.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Hashable, Iterable, Mapping, Sequence

CLASSES = {"interactive": 0, "batch": 1}  # rank: the first wins a tie


@dataclass(frozen=True)
class Policy:
    max_batch_size: int = 1  # requests sharing one forward (1 when the role has a step cache)
    max_forward_s: float | None = 2.0  # companions join a forward while its estimated seconds stay under this
    batch_weight: float = 0.125  # the weight of a "batch" request; "interactive" weighs 1
    short_s: float = 30.0  # a request with less estimated remaining work than this ...
    short_boost: float = 8.0  # ... weighs this much more


@dataclass(frozen=True)
class StepView:
    """One resident request as its batch reports it: torch-free numbers only."""

    group: Hashable  # requests of one group may share a forward (same shapes)
    units: float  # relative size of one step (latent elements x guidance branches)
    remaining_steps: int
    step: int = 0
    num_steps: int = 0


@dataclass(frozen=True)
class Job:
    """One resident request as the policy sees it."""

    key: str
    group: Hashable
    step_s: float  # estimated device seconds of one step of this request
    remaining_steps: int
    priority: str = "interactive"
    vtime: float = 0.0  # device seconds given so far, each divided by the weight it had then
    seq: int = 0  # arrival order: the last tie-break

    def __post_init__(self) -> None:
        if self.priority not in CLASSES:
            raise ValueError(f"priority must be one of {sorted(CLASSES)}, got {self.priority!r}")


def weight(job: Job, policy: Policy) -> float:
    w = policy.batch_weight if job.priority == "batch" else 1.0
    if job.remaining_steps * job.step_s <= policy.short_s:
        w *= policy.short_boost
    return w


def finish_time(job: Job, policy: Policy) -> float:
    """The virtual time at which this request's next step would end."""
    return job.vtime + job.step_s / weight(job, policy)


def order(jobs: Iterable[Job], policy: Policy) -> list[Job]:
    """Earliest virtual finish first; ties: interactive, then less remaining work, then arrival."""
    return sorted(jobs, key=lambda j: (finish_time(j, policy), CLASSES[j.priority], j.remaining_steps * j.step_s,
                                       j.seq))


def pick(jobs: Sequence[Job], policy: Policy) -> list[Job]:
    """The next forward: the earliest finisher and companions of its group, within the size and time budgets
    (empty when no request has a step left: the boundary only retires them)."""
    ranked = order([j for j in jobs if j.remaining_steps > 0], policy)
    if not ranked:
        return []
    first, chosen = ranked[0], [ranked[0]]
    seconds = first.step_s
    for job in ranked[1:]:
        if len(chosen) >= policy.max_batch_size:
            break
        if job.group != first.group:
            continue
        if policy.max_forward_s is not None and seconds + job.step_s > policy.max_forward_s:
            continue
        chosen.append(job)
        seconds += job.step_s
    return chosen


def charged(job: Job, seconds: float, policy: Policy) -> Job:
    """The request after it was given `seconds` of device time."""
    return replace(job, vtime=job.vtime + seconds / weight(job, policy))


class StepCosts:
    """Seconds of one request's step per (group, units), learnt from timed forwards (EWMA); an unseen shape is
    priced from the mean seconds per unit seen so far (a first guess until its own first forward)."""

    def __init__(self, alpha: float = 0.3, s_per_unit: float = 2e-4) -> None:
        self.alpha, self.s_per_unit = alpha, s_per_unit
        self._seconds: dict[tuple[Hashable, float], float] = {}

    def estimate(self, group: Hashable, units: float) -> float:
        known = self._seconds.get((group, units))
        return known if known is not None else self.s_per_unit * units

    def observe(self, group: Hashable, units: float, members: int, seconds: float) -> None:
        if members < 1 or seconds <= 0 or units <= 0:
            return
        each = seconds / members
        key = (group, units)
        old = self._seconds.get(key)
        self._seconds[key] = each if old is None else old + self.alpha * (each - old)
        self.s_per_unit += self.alpha * (each / units - self.s_per_unit)


class FairQueue:
    """The policy's memory across step boundaries: each resident request's class, arrival and virtual time."""

    def __init__(self, policy: Policy, costs: StepCosts | None = None) -> None:
        self.policy, self.costs = policy, costs or StepCosts()
        self.clock = 0.0  # system virtual time: the start time of the last request stepped (never decreases)
        self._jobs: dict[str, tuple[str, int, float]] = {}  # key -> (priority, seq, vtime)
        self._seq = 0

    def __contains__(self, key: str) -> bool:
        return key in self._jobs

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, key: str, priority: str = "interactive") -> None:
        if priority not in CLASSES:
            raise ValueError(f"priority must be one of {sorted(CLASSES)}, got {priority!r}")
        self._seq += 1
        self._jobs[key] = (priority, self._seq, self.clock)

    def remove(self, key: str) -> None:
        self._jobs.pop(key, None)

    def jobs(self, views: Mapping[str, StepView]) -> list[Job]:
        """The resident requests the batch reports, as the policy sees them (unknown keys are skipped)."""
        out = []
        for key, view in views.items():
            if key in self._jobs:
                priority, seq, vtime = self._jobs[key]
                out.append(Job(key, view.group, self.costs.estimate(view.group, view.units), view.remaining_steps,
                               priority, vtime, seq))
        return out

    def pick(self, views: Mapping[str, StepView]) -> list[str]:
        chosen = pick(self.jobs(views), self.policy)
        if chosen:
            self.clock = max(self.clock, chosen[0].vtime)
        return [job.key for job in chosen]

    def charge(self, keys: Sequence[str], views: Mapping[str, StepView], seconds: float) -> None:
        """Account one forward of `keys` that took `seconds`: each member is given an equal share."""
        stepped = self.jobs({k: views[k] for k in keys if k in views})
        if not stepped:
            return
        first = views[stepped[0].key]
        self.costs.observe(first.group, first.units, len(stepped), seconds)
        for job in stepped:
            after = charged(job, seconds / len(stepped), self.policy)
            priority, seq, _ = self._jobs[job.key]
            self._jobs[job.key] = (priority, seq, after.vtime)


def admission_order(priorities: Sequence[str], free: int | None) -> list[int]:
    """Which waiting requests (indices, in arrival order) join the resident set when `free` places are left
    (None: no limit): interactive first, then by arrival."""
    ranked = sorted(range(len(priorities)), key=lambda i: (CLASSES.get(priorities[i], 0), i))
    return ranked if free is None else ranked[:max(0, free)]
