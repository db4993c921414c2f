"""The capacity planner (`srserve plan`): pool sizes, throughput, expected p95 and $ per video of large-only,
colocated SR and disaggregated SR for a model pair, a GPU type per pool, an arrival rate and an SLO.

    srserve plan --sketch-gpu h100 --render-gpu l40s --rate 0.2 --slo 300
    srserve plan --sketch-gpu h100 --render-gpu l4 --rate 1 --slo 240 --resolution 720p --json

The queueing model, per pool of c identical GPUs serving one request at a time (batch 1):
  * service time of a request = what its stages cost on that GPU (the cost table), given its switch step k (drawn
    from the switch distribution, scaled to N): sketch k x t_large, render (N - k) x t_small, + encode and decode on
    whichever pool holds them; colocated: all of it on one GPU;
  * waiting time: M/M/c (Erlang C) at the pool's mean service time, P(W > t) = C(c, a) exp(-(c mu - lam) t);
  * end to end: sum of the pools' service times for the same k, plus their waits taken as independent (a Jackson
    network approximation); p95 solved from that distribution.
The sizing picks, per setup, the cheapest pools whose p95 meets the SLO. Throughput is the sized fleet's saturation
rate, min over pools of c / E[service]. This is the M/M/c approximation; video service times vary less than
exponential, so it overstates waits a little (an M/D/c would understate them).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from srserve.sim.costs import CostError, CostTable, Resolution, default_table
from srserve.sim.queueing import Wait, erlang_c, latency_quantile, mmc_wait, smallest, wait_tail  # noqa: F401
from srserve.sim.switching import SwitchDistribution

LARGE, SMALL, TEXT, VAE = "wan2.1-t2v-14b", "wan2.1-t2v-1.3b", "umt5-xxl", "wan-vae"
UNMET_UTILIZATION = 0.8  # how a setup that cannot meet the SLO is sized (to show its cost and p95)


@dataclass(frozen=True)
class PlanRequest:
    rate: float  # requests per second
    slo_p95_s: float
    sketch_gpu: str = "h100"
    render_gpu: str = "h100"
    colocated_gpu: str | None = None  # default: sketch_gpu
    sketch_model: str = LARGE
    render_model: str = SMALL
    resolution: Resolution = "480p"
    num_steps: int = 50
    switch_cap: int | None = None  # an SLO controller's cap on sketch steps
    max_gpus: int = 2048


@dataclass
class Pool:
    name: str
    gpu: str
    roles: tuple[str, ...]
    replicas: int
    mean_service_s: float
    price_per_hour: float
    utilization: float = 0.0


@dataclass
class SetupPlan:
    setup: str
    feasible: bool
    pools: list[Pool] = field(default_factory=list)
    gpus: int = 0
    throughput_rps: float = 0.0  # saturation rate of the sized fleet
    p95_s: float | None = None  # at the offered rate
    unloaded_s: float | None = None  # mean latency with no queueing
    cost_per_hour: float = 0.0
    dollars_per_video: float | None = None  # at the offered rate
    dollars_per_video_saturated: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- setups ------------------------------------------------------------------------------------------------------
class Planner:
    def __init__(self, request: PlanRequest, table: CostTable | None = None,
                 switch: SwitchDistribution | None = None) -> None:
        self.req = request
        self.table = table or default_table()
        self.switch = switch or SwitchDistribution.load()
        if request.rate <= 0 or request.slo_p95_s <= 0:
            raise ValueError("rate and slo must be > 0")
        self.ks = self.switch.steps(request.num_steps, cap=request.switch_cap)

    # per-role costs
    def _step(self, model: str, gpu: str) -> float:
        return self.table.step_seconds(model, gpu, self.req.resolution)

    def _enc(self, gpu: str) -> float:
        return self.table.text_encode_seconds(gpu)

    def _dec(self, gpu: str) -> float:
        return self.table.vae_decode_seconds(gpu, self.req.resolution)

    def plan_all(self) -> list[SetupPlan]:
        r = self.req
        co = r.colocated_gpu or r.sketch_gpu
        plans = [self.large_only(co), self.colocated_sr(co), self.disaggregated(r.sketch_gpu, r.render_gpu)]
        if r.render_gpu != r.sketch_gpu:
            plans.append(self.disaggregated(r.sketch_gpu, r.sketch_gpu, name="disaggregated-sr (same GPU)"))
        return plans

    def large_only(self, gpu: str) -> SetupPlan:
        n = self.req.num_steps
        service = self._enc(gpu) + n * self._step(self.req.sketch_model, gpu) + self._dec(gpu)
        models = [self.req.sketch_model, TEXT, VAE]
        return self._single("large-only", gpu, models, [(service, 1.0)], ("encode", "sketch", "decode"))

    def colocated_sr(self, gpu: str) -> SetupPlan:
        n, tl, ts = self.req.num_steps, self._step(self.req.sketch_model, gpu), self._step(self.req.render_model, gpu)
        fixed = self._enc(gpu) + self._dec(gpu)
        services = [(fixed + k * tl + (n - k) * ts, p) for k, p in self.ks]
        models = [self.req.sketch_model, self.req.render_model, TEXT, VAE]
        return self._single("colocated-sr", gpu, models, services, ("encode", "sketch", "render", "decode"))

    def _single(self, name: str, gpu: str, models: list[str], services: list[tuple[float, float]],
                roles: tuple[str, ...]) -> SetupPlan:
        if not self.table.fits(models, gpu, self.req.resolution, processes=1):
            need = self.table.need_gb(models, self.req.resolution, processes=1)
            return SetupPlan(name, False, note=f"{'+'.join(models)} need {need:.1f} GB: more than a {gpu} holds")
        mean = sum(s * p for s, p in services)
        price = self.table.price(gpu)
        lo = max(1, math.floor(self.req.rate * mean) + 1)
        if lo > self.req.max_gpus:
            return SetupPlan(name, False, note=f"no stable size within {self.req.max_gpus} GPUs")

        def p95_at(c: int) -> float:
            return latency_quantile(services, [mmc_wait(c, self.req.rate, mean)])

        c = smallest(lambda c: p95_at(c) <= self.req.slo_p95_s, lo, self.req.max_gpus)
        if c is not None:
            return self._finish(SetupPlan(name, True, [Pool(name, gpu, roles, c, mean, price)], p95_s=p95_at(c),
                                          unloaded_s=mean))
        c = max(lo, math.ceil(self.req.rate * mean / UNMET_UTILIZATION))
        why = "SLO below the unloaded p95: unreachable" if latency_quantile(services, []) > self.req.slo_p95_s \
            else f"SLO not met within {self.req.max_gpus} GPUs"
        return self._finish(SetupPlan(name, False, [Pool(name, gpu, roles, c, mean, price)], p95_s=p95_at(c),
                                      unloaded_s=mean, note=f"{why} (sized to {UNMET_UTILIZATION:.0%} utilization)"))

    def disaggregated(self, sketch_gpu: str, render_gpu: str, name: str = "disaggregated-sr") -> SetupPlan:
        r = self.req
        tl, ts = self._step(r.sketch_model, sketch_gpu), self._step(r.render_model, render_gpu)
        if not self.table.fits(r.sketch_model, sketch_gpu, r.resolution):
            need = self.table.need_gb(r.sketch_model, r.resolution)
            return SetupPlan(name, False, note=f"{r.sketch_model} needs {need:.1f} GB: more than a {sketch_gpu} holds")
        enc, dec = self._enc(render_gpu), self._dec(render_gpu)
        layouts = [((r.render_model, TEXT, VAE), ("render", "encode", "decode"), False),
                   ((r.render_model, VAE), ("render", "decode"), True)]
        for models, roles, own_encode in layouts:
            if self.table.fits(list(models), render_gpu, r.resolution):
                break
        else:
            return SetupPlan(name, False, note=f"{r.render_model} + VAE do not fit a {render_gpu}")
        # per-k service of each pool; the encode pool (when apart) costs the same for every k
        pools: list[tuple[str, str, tuple[str, ...], Callable[[int], float]]] = [
            ("sketch", sketch_gpu, ("sketch",), lambda k: k * tl),
            ("render", render_gpu, roles, lambda k: (r.num_steps - k) * ts + dec + (0.0 if own_encode else enc)),
        ]
        if own_encode:
            pools.insert(0, ("encode", render_gpu, ("encode",), lambda k: enc))
        means = [sum(f(k) * p for k, p in self.ks) for _, _, _, f in pools]
        prices = [self.table.price(g) for _, g, _, _ in pools]
        services = [(sum(f(k) for _, _, _, f in pools), p) for k, p in self.ks]
        mins = [max(1, math.floor(r.rate * m) + 1) if m > 0 else 1 for m in means]
        best: tuple[float, list[int], float] | None = None
        unloaded_p95 = latency_quantile(services, [])

        def p95_at(sizes: Sequence[int]) -> float:
            return latency_quantile(services, [mmc_wait(c, r.rate, m) for c, m in zip(sizes, means)])

        # every pool but the last over a range; the last pool's size is the smallest that meets the SLO
        ranges = [range(lo, min(r.max_gpus, 3 * lo + 8) + 1) for lo in mins[:-1]]
        if unloaded_p95 <= r.slo_p95_s:
            for head in _product(ranges):
                cost_head = sum(c * pr for c, pr in zip(head, prices))
                if best is not None and cost_head + mins[-1] * prices[-1] >= best[0]:
                    continue
                c_last = smallest(lambda c, head=head: p95_at([*head, c]) <= r.slo_p95_s, mins[-1],
                                  r.max_gpus - sum(head))
                if c_last is not None:
                    cost = cost_head + c_last * prices[-1]
                    if best is None or cost < best[0]:
                        best = (cost, [*head, c_last], p95_at([*head, c_last]))
        plan_pools = [Pool(n, g, ro, 0, m, pr) for (n, g, ro, _), m, pr in zip(pools, means, prices)]
        if best is None:
            sizes = [max(lo, math.ceil(r.rate * m / UNMET_UTILIZATION)) for lo, m in zip(mins, means)]
            for pool, c in zip(plan_pools, sizes):
                pool.replicas = c
            why = "SLO below the unloaded p95: unreachable" if unloaded_p95 > r.slo_p95_s else \
                f"SLO not met within {r.max_gpus} GPUs"
            return self._finish(SetupPlan(name, False, plan_pools, p95_s=p95_at(sizes), unloaded_s=_mean(services),
                                          note=f"{why} (sized to {UNMET_UTILIZATION:.0%} utilization)"))
        for pool, c in zip(plan_pools, best[1]):
            pool.replicas = c
        note = "encode on its own pool: the render GPU cannot hold the text encoder too" if own_encode else ""
        return self._finish(SetupPlan(name, True, plan_pools, p95_s=best[2], unloaded_s=_mean(services), note=note))

    def _finish(self, plan: SetupPlan) -> SetupPlan:
        plan.gpus = sum(p.replicas for p in plan.pools)
        plan.cost_per_hour = sum(p.replicas * p.price_per_hour for p in plan.pools)
        for p in plan.pools:
            p.utilization = round(self.req.rate * p.mean_service_s / p.replicas, 4)
        plan.throughput_rps = min(p.replicas / p.mean_service_s for p in plan.pools) if plan.pools else 0.0
        plan.dollars_per_video = plan.cost_per_hour / (self.req.rate * 3600)
        if plan.throughput_rps:
            plan.dollars_per_video_saturated = plan.cost_per_hour / (plan.throughput_rps * 3600)
        return plan


def best_whole_gpu_split(gpus: int, sketch_s: float, render_s: float,
                         colocated_s: float | None = None) -> tuple[dict[str, int], float]:
    """(pool sizes, requests/s) of the split of `gpus` whole GPUs into a sketch pool and a render pool (each
    charged its mean seconds per request) with the highest pool-bound throughput, min(s / sketch_s, r / render_s).
    With `colocated_s` (a whole request on one GPU holding both models), also `flex` GPUs that run whole requests
    beside the pools: + f / colocated_s. Whole GPUs cannot follow a stage ratio such as 5.7 : 2.3; a flex GPU takes
    up the remainder. Ties go to fewer flex GPUs."""
    if gpus < 2:
        raise ValueError(f"a sketch and a render pool need at least 2 GPUs, got {gpus}")
    best: tuple[dict[str, int], float] | None = None
    for flex in range(0, gpus - 1 if colocated_s else 1):
        for sketch in range(1, gpus - flex):
            render = gpus - flex - sketch
            rate = min(sketch / sketch_s, render / render_s) + (flex / colocated_s if flex else 0.0)
            if best is None or rate > best[1] * (1 + 1e-9):
                best = ({"sketch": sketch, "render": render, **({"flex": flex} if flex else {})}, rate)
    return best


def _mean(services: Sequence[tuple[float, float]]) -> float:
    return sum(s * p for s, p in services)


def _product(ranges: list[range]):
    if not ranges:
        yield []
        return
    for first in ranges[0]:
        for rest in _product(ranges[1:]):
            yield [first, *rest]


# --- the command line --------------------------------------------------------------------------------------------
def _resolution(text: str) -> Resolution:
    if text in ("480p", "720p"):
        return text
    try:
        frames, size = text.split("@") if "@" in text else ("81", text)
        width, height = size.lower().split("x")
        return int(frames), int(height), int(width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--resolution: 480p, 720p or [FRAMES@]WIDTHxHEIGHT, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pair", default=f"{LARGE},{SMALL}", help="sketch,render models (default: %(default)s)")
    p.add_argument("--sketch-gpu", default="h100", help="GPU type of the sketch pool (and large-only)")
    p.add_argument("--render-gpu", default=None, help="GPU type of the render pool (default: --sketch-gpu)")
    p.add_argument("--colocated-gpu", default=None, help="GPU type of colocated / large-only (default: --sketch-gpu)")
    p.add_argument("--rate", type=float, required=True, help="arrival rate, requests per second")
    p.add_argument("--slo", type=float, required=True, help="p95 end-to-end latency target, seconds")
    p.add_argument("--resolution", type=_resolution, default="480p", help="480p, 720p or [FRAMES@]WIDTHxHEIGHT")
    p.add_argument("--steps", type=int, default=50, help="denoising steps N")
    p.add_argument("--switch", default=None, help="switch distribution: srd-tiny-adaptive (default), "
                                                  "srd-tiny-quality-mean, or a fraction of N (e.g. 0.3)")
    p.add_argument("--switch-cap", type=int, default=None, help="cap on sketch steps (an SLO controller's)")
    p.add_argument("--max-gpus", type=int, default=2048)
    p.add_argument("--costs", default=None, help="cost table JSON (default: the shipped one)")
    p.add_argument("--measured", default=None, help="GPU measurements JSON (default: benchmarks/results/gpu/...)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    try:
        sketch_model, render_model = (m.strip() for m in args.pair.split(","))
        if args.costs or args.measured:
            from srserve.sim.costs import DEFAULT_MEASURED

            table = CostTable.load(args.costs, args.measured or DEFAULT_MEASURED)
        else:
            table = default_table()
        switch = SwitchDistribution.load(args.switch) if args.switch is None or not _is_number(args.switch) \
            else SwitchDistribution.fixed(float(args.switch))
        req = PlanRequest(rate=args.rate, slo_p95_s=args.slo, sketch_gpu=table.gpu(args.sketch_gpu),
                          render_gpu=table.gpu(args.render_gpu or args.sketch_gpu),
                          colocated_gpu=table.gpu(args.colocated_gpu) if args.colocated_gpu else None,
                          sketch_model=table.model(sketch_model), render_model=table.model(render_model),
                          resolution=args.resolution, num_steps=args.steps, switch_cap=args.switch_cap,
                          max_gpus=args.max_gpus)
        planner = Planner(req, table, switch)
        plans = planner.plan_all()
    except (CostError, ValueError) as err:
        print(f"srserve plan: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"request": asdict(req), "switch": switch.describe(),
                          "mean_switch_step": planner.switch.mean_steps(req.num_steps, req.switch_cap),
                          "queueing_model": "M/M/c (Erlang C) per pool, independent waits",
                          "measured_devices": table.measured_devices,
                          "plans": [p.to_dict() for p in plans]}, indent=1))
        return 0
    print(format_plans(req, planner, plans))
    return 0


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def format_plans(req: PlanRequest, planner: Planner, plans: list[SetupPlan]) -> str:
    res = req.resolution if isinstance(req.resolution, str) else "{}@{}x{}".format(
        req.resolution[0], req.resolution[2], req.resolution[1])
    k = planner.switch.mean_steps(req.num_steps, req.switch_cap)
    measured = planner.table.measured_devices
    cap = "" if req.switch_cap is None else f", cap {req.switch_cap}"
    lines = [(f"srserve plan: {req.sketch_model} -> {req.render_model}, {res}, {req.num_steps} steps, switch "
              f"{planner.switch.name} (mean k {k:.1f}{cap}), {req.rate:g} requests/s, SLO p95 {req.slo_p95_s:g} s"),
             ("queueing: M/M/c (Erlang C) per pool; costs: srserve/sim/costs.json"
              + (f" + measured on {', '.join(measured.values())}" if measured else "")),
             "",
             (f"{'setup':<30} {'pools':<52} {'GPUs':>5} {'max req/s':>9} {'p95 s':>8} {'unloaded':>8} {'$/h':>9} "
              f"{'$/video':>8}")]
    for p in plans:
        pools = " + ".join(f"{x.replicas} {x.gpu} ({'/'.join(x.roles)}, {x.utilization:.0%})" for x in p.pools) \
            or "-"
        p95 = "-" if p.p95_s is None else f"{p.p95_s:.1f}"
        unloaded = "-" if p.unloaded_s is None else f"{p.unloaded_s:.1f}"
        dollars = "-" if p.dollars_per_video is None else f"{p.dollars_per_video:.3f}"
        name = p.setup + ("" if p.feasible else " (!)")
        lines.append(f"{name:<30} {pools:<52} {p.gpus:>5} {p.throughput_rps:>9.3f} {p95:>8} {unloaded:>8} "
                     f"{p.cost_per_hour:>9.2f} {dollars:>8}")
        if p.note:
            lines.append(f"{'':<30} {p.note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="srserve plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
