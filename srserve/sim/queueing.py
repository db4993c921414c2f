"""Queueing formulas of the capacity planner: M/M/c (Erlang C) waits per pool and the end-to-end latency quantile
of a request crossing several pools (waits taken as independent). Pure math, no cost table."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence


def erlang_c(servers: int, offered: float) -> float:
    """Probability an arrival waits in M/M/c with `offered` = lam / mu erlangs (1 when unstable)."""
    if offered <= 0:
        return 0.0
    if offered >= servers:
        return 1.0
    b = 1.0
    for k in range(1, servers + 1):
        b = offered * b / (k + offered * b)
    rho = offered / servers
    return b / (1 - rho * (1 - b))


@dataclass(frozen=True)
class Wait:
    """A zero-inflated exponential: 0 with probability 1 - p, else Exp(rate)."""

    p: float
    rate: float


def mmc_wait(servers: int, rate: float, mean_service_s: float) -> Wait | None:
    """The M/M/c waiting time; None when the pool cannot keep up (utilization >= 1)."""
    mu = 1.0 / mean_service_s
    if rate >= servers * mu:
        return None
    return Wait(erlang_c(servers, rate / mu), servers * mu - rate)


def wait_tail(waits: Sequence[Wait], t: float) -> float:
    """P(sum of independent waits > t), exactly (sums of exponentials over every subset that waits)."""
    if t < 0:
        return 1.0
    total = 0.0
    n = len(waits)
    for mask in range(1, 1 << n):
        members = [waits[i] for i in range(n) if mask >> i & 1]
        weight = 1.0
        for i in range(n):
            weight *= waits[i].p if mask >> i & 1 else 1 - waits[i].p
        if weight == 0.0:
            continue
        # distinct rates (nudged apart when equal) so the hypoexponential closed form applies
        rates = [w.rate * (1 + 1e-7 * j) for j, w in enumerate(members)]
        tail = 0.0
        for i, ri in enumerate(rates):
            prod = 1.0
            for j, rj in enumerate(rates):
                if j != i:
                    prod *= rj / (rj - ri)
            tail += math.exp(-ri * t) * prod
        total += weight * min(max(tail, 0.0), 1.0)
    return min(max(total, 0.0), 1.0)


def latency_quantile(services: Sequence[tuple[float, float]], waits: Sequence[Wait], q: float = 0.95) -> float:
    """The q-quantile of service(k) + sum of waits, with (service seconds, probability) pairs over k."""
    def cdf(t: float) -> float:
        return sum(p * (1 - wait_tail(waits, t - s)) for s, p in services)

    lo = min(s for s, _ in services)
    hi = max(s for s, _ in services) + 1.0
    while cdf(hi) < q:
        hi *= 2
        if hi > 1e12:
            return math.inf
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        if cdf(mid) < q:
            lo = mid
        else:
            hi = mid
    return hi


def smallest(pred: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """The smallest c in [lo, hi] with pred(c), for a pred that stays true once true; None if pred(hi) is false."""
    if lo > hi or not pred(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
