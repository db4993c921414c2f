"""Switch policies: when the sketch (large) model hands over to the render (small) model.

Pure Python, no torch: the engine feeds the adaptive rule one float per denoising step.

Grammar: `none` | `small-only` | `step:K` | `ratio:R` | `adaptive[:THRESHOLD][:min=K][:max=K]`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal, Sequence

PolicyKind = Literal["none", "small-only", "step", "ratio", "adaptive"]
DEFAULT_ADAPTIVE_THRESHOLD = 0.01
# Adaptive bounds default to fractions of the step count, so one policy string serves any N.
DEFAULT_MIN_FRACTION = 0.1
DEFAULT_MAX_FRACTION = 0.6
# Numbers are ASCII and bounded before int()/float() see them: no 4300-digit int, no overflowing float, no
# full-width digits (which int() and float() would take).
_STEP = re.compile(r"[0-9]{1,6}")
_FRACTION = re.compile(r"[0-9]{0,3}(\.[0-9]{1,12})?([eE][+-]?[0-9]{1,3})?")  # str() writes 1e-05
MAX_STEP = 999_999
_QUOTE = 100


def _quote(text: str) -> str:
    """The policy text as an error message quotes it: at most 100 characters."""
    return repr(text[:_QUOTE]) + ("..." if len(text) > _QUOTE else "")


def _step(text: str, what: str) -> int:
    if not _STEP.fullmatch(text):
        raise ValueError(f"{what} must be a whole number between 0 and {MAX_STEP}")
    return int(text)


def _fraction(text: str, what: str) -> float:
    if not text or not _FRACTION.fullmatch(text):
        raise ValueError(f"{what} must be a plain decimal such as 0.5")
    return float(text)


@dataclass(frozen=True)
class SwitchPolicy:
    kind: PolicyKind
    value: float | None = None  # K for step, R for ratio, the threshold for adaptive
    min_step: int | None = None  # adaptive only: earliest switch (number of sketch steps)
    max_step: int | None = None  # adaptive only: latest switch

    def __str__(self) -> str:
        if self.kind in ("none", "small-only"):
            return self.kind
        if self.kind == "step":
            return f"step:{int(self.value)}"
        if self.kind == "ratio":
            return f"ratio:{self.value:g}"
        text = f"adaptive:{self.value:g}"
        text += f":min={self.min_step}" if self.min_step is not None else ""
        return text + (f":max={self.max_step}" if self.max_step is not None else "")

    def bounds(self, num_steps: int) -> tuple[int, int]:
        """(min, max) switch step for the adaptive rule, clamped to [1, num_steps]."""
        lo = self.min_step if self.min_step is not None else max(2, round(DEFAULT_MIN_FRACTION * num_steps))
        hi = self.max_step if self.max_step is not None else round(DEFAULT_MAX_FRACTION * num_steps)
        lo = min(max(lo, 1), num_steps)
        return lo, min(max(hi, lo), num_steps)


def parse_policy(text: str) -> SwitchPolicy:
    """Parse a policy string; ValueError says what is wrong and what is accepted."""
    accepted = "one of none, small-only, step:K, ratio:R, adaptive[:THRESHOLD][:min=K][:max=K]"
    raw = text.strip().lower()
    head, _, rest = raw.partition(":")
    try:
        if head in ("none", "small-only") and not rest:
            return SwitchPolicy(head)
        if head == "step" and rest:
            return SwitchPolicy("step", float(_step(rest, "K")))
        if head == "ratio" and rest:
            r = _fraction(rest, "R")
            if not 0.0 <= r <= 1.0:
                raise ValueError("R must be in [0, 1]")
            return SwitchPolicy("ratio", r)
        if head == "adaptive":
            return _parse_adaptive(rest)
    except ValueError as err:
        raise ValueError(f"switch policy {_quote(text)}: {err}; {accepted}") from None
    raise ValueError(f"switch policy {_quote(text)} is not {accepted}")


def _parse_adaptive(rest: str) -> SwitchPolicy:
    threshold, lo, hi = DEFAULT_ADAPTIVE_THRESHOLD, None, None
    for part in filter(None, rest.split(":")):
        if part.startswith("min="):
            lo = _step(part[4:], "min")
        elif part.startswith("max="):
            hi = _step(part[4:], "max")
        else:
            threshold = _fraction(part, "THRESHOLD")
    if not 0.0 < threshold < 1.0:
        raise ValueError("THRESHOLD must be in (0, 1)")
    if (lo is not None and lo < 1) or (hi is not None and hi < 1):
        raise ValueError("min and max must be >= 1")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError("min must be <= max")
    return SwitchPolicy("adaptive", threshold, lo, hi)


def fixed_switch_step(policy: SwitchPolicy, timesteps: Sequence[float], num_train_timesteps: int) -> int | None:
    """Number of steps the sketch model runs, known up front; None for the adaptive rule.

    `ratio:R` follows diffusers' WanPipeline: the large model runs while t >= R * num_train_timesteps.
    """
    n = len(timesteps)
    if policy.kind == "none":
        return n
    if policy.kind == "small-only":
        return 0
    if policy.kind == "step":
        return min(int(policy.value), n)
    if policy.kind == "ratio":
        boundary = policy.value * num_train_timesteps
        return sum(1 for t in timesteps if t >= boundary)
    return None


@dataclass
class AdaptiveSwitch:
    """SRDiffusion's self-diff rule, fed once per denoising step with the guided output's relative change.

    d_i = tanh(mean|o_i - o_{i-1}| / mean|o_{i-1}|); switch after step i when 0 < d_{i-1} - d_i < threshold,
    never before `min_step` sketch steps and always at `max_step`.
    """

    threshold: float
    min_step: int
    max_step: int
    diffs: list[float] = field(default_factory=list)  # d_1, d_2, ... (step 0 has no predecessor)

    @classmethod
    def for_policy(cls, policy: SwitchPolicy, num_steps: int) -> "AdaptiveSwitch":
        lo, hi = policy.bounds(num_steps)
        return cls(policy.value, lo, hi)

    def observe(self, step_index: int, relative_change: float | None) -> bool:
        """Record step `step_index`'s relative change (None at step 0); True when the switch is after it."""
        if relative_change is not None:
            self.diffs.append(math.tanh(relative_change))
        steps_done = step_index + 1
        if steps_done >= self.max_step:
            return True
        if steps_done < self.min_step or len(self.diffs) < 2:
            return False
        drop = self.diffs[-2] - self.diffs[-1]
        return 0.0 < drop < self.threshold
