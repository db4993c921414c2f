"""The switch-step distribution the simulation and the planner draw from, scaled to any step count.

Default: the switch steps srd-tiny's adaptive rule chose per job (`switch_steps.json`, "srd-tiny-adaptive": 243 jobs
of the serving benchmark, N = 30, mean 9.48), taken as fractions k/N of the steps and scaled to the request's N. The
quality table's mean (srd-tiny's default `adaptive:0.02:min=6`, 8.5 of 30) is the other recorded choice.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_PATH = Path(__file__).with_name("switch_steps.json")


@dataclass(frozen=True)
class SwitchDistribution:
    """A discrete distribution of switch points as fractions of the step count (k / N)."""

    fractions: tuple[float, ...]
    probs: tuple[float, ...]
    name: str = "custom"
    source: str = ""

    def __post_init__(self) -> None:
        if not self.fractions or len(self.fractions) != len(self.probs):
            raise ValueError("a switch distribution needs as many probabilities as fractions, at least one")
        if any(not 0.0 <= f <= 1.0 for f in self.fractions) or any(p < 0 for p in self.probs):
            raise ValueError("fractions must be in [0, 1] and probabilities >= 0")
        if not math.isclose(sum(self.probs), 1.0, rel_tol=1e-9):
            raise ValueError(f"probabilities sum to {sum(self.probs)}, not 1")

    @classmethod
    def load(cls, name: str | None = None, path: str | Path = DATA_PATH) -> "SwitchDistribution":
        with open(path) as f:
            data = json.load(f)
        name = name or data["default"]
        if name not in data["distributions"]:
            raise ValueError(f"switch distribution {name!r}: one of {sorted(data['distributions'])}")
        d = data["distributions"][name]
        n = d["num_steps"]
        if d.get("counts"):
            total = sum(d["counts"].values())
            items = sorted((int(k) / n, c / total) for k, c in d["counts"].items())
            return cls(tuple(f for f, _ in items), tuple(p for _, p in items), name, d["source"])
        return cls((d["mean"] / n,), (1.0,), name, d["source"])

    @classmethod
    def fixed(cls, fraction: float) -> "SwitchDistribution":
        return cls((float(fraction),), (1.0,), f"fixed:{fraction:g}", "a fixed fraction of the steps")

    def steps(self, num_steps: int, cap: int | None = None, floor: int = 0) -> list[tuple[int, float]]:
        """(k, probability) at `num_steps`: k = round(fraction x N), at most `cap`, at least `floor`, merged."""
        out: dict[int, float] = {}
        for f, p in zip(self.fractions, self.probs):
            k = min(max(round(f * num_steps), floor), num_steps)
            if cap is not None:
                k = max(min(k, cap), min(floor, cap))
            out[k] = out.get(k, 0.0) + p
        return sorted(out.items())

    def mean_steps(self, num_steps: int, cap: int | None = None) -> float:
        return sum(k * p for k, p in self.steps(num_steps, cap))

    def quantile_steps(self, u: float, num_steps: int) -> int:
        """The k at cumulative probability `u` in [0, 1): inverse-CDF sampling with a uniform draw."""
        acc = 0.0
        pairs = self.steps(num_steps)
        for k, p in pairs:
            acc += p
            if u < acc:
                return k
        return pairs[-1][0]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "mean_fraction": round(sum(
            f * p for f, p in zip(self.fractions, self.probs)), 4)}


def srd_tiny_quality(sketch_steps: float, num_steps: int, path: str | Path) -> dict[str, float]:
    """srd-tiny's quality at a switch point, read from its quality table (`step:K` rows at the table's N, and `none`
    at K = N, `small-only` at 0), linearly interpolated at the same fraction of the steps: {"all_acc", "psnr",
    "ssim"}. The quality cost of a cap is this at the capped step against the uncapped one."""
    with open(path) as f:
        table = json.load(f)
    n = table["steps"]
    points: dict[float, dict[str, float]] = {}
    for row in table["rows"]:
        policy = row["policy"]
        if policy == "none":
            k = n
        elif policy == "small-only":
            k = 0
        elif policy.startswith("step:"):
            k = int(policy.split(":")[1])
        else:
            continue
        points[k / n] = {m: float(row[m]) for m in ("all_acc", "psnr", "ssim")}
    xs = sorted(points)
    x = min(max(sketch_steps / num_steps, xs[0]), xs[-1])
    hi = next(i for i, v in enumerate(xs) if v >= x)
    if xs[hi] == x or hi == 0:
        return dict(points[xs[hi]])
    a, b = xs[hi - 1], xs[hi]
    w = (x - a) / (b - a)
    return {m: points[a][m] + w * (points[b][m] - points[a][m]) for m in points[a]}
