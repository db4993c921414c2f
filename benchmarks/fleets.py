"""Mixed fleets (issue 13 point 6b): $ per video at equal p95, disaggregated SR with the render pool on another GPU
type against the cheapest colocated-SR fleet the same cost table allows.

Two parts, both written to benchmarks/results/fleets.json:
  * the planner (srserve/sim/plan.py) over every GPU of the cost table: per arrival rate, the cheapest fleet that
    meets the p95 SLO for colocated SR (each GPU that holds both models) and for disaggregated SR (each sketch x
    render GPU pair), the ratio of their $ per video, and the render-GPU price at which the mixed fleet would cost
    0.8x the best colocated one (None: not even at price 0, the sketch pool alone costs more);
  * the simulation (the real serving stack on simulated GPUs, as benchmarks/pools_sim.py) of the best colocated and
    the best mixed fleet at one rate: measured p95 and throughput, $ per video = fleet $/h / videos per hour.

    python benchmarks/fleets.py                          (~6 min here; --no-sim: the planner part, 1 s)
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time

from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pools_sim import app_args, measure, sim_stats, write_result  # noqa: E402
from serving_compare import free_port  # noqa: E402

from srserve.sim.costs import CostTable, default_table  # noqa: E402
from srserve.sim.plan import Planner, PlanRequest, SetupPlan  # noqa: E402

GOAL_RATIO = 0.8


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="0.05,0.2,1", help="arrival rates, requests per second")
    p.add_argument("--slo", type=float, default=400.0, help="p95 end-to-end seconds every fleet is sized to")
    p.add_argument("--sketch-gpus", default="h100,h200,a100-80g", help="GPU types that may hold the sketch pool")
    p.add_argument("--sim-rate", type=float, default=0.05, help="the rate the simulated fleets run at")
    p.add_argument("--sim-requests", type=int, default=60)
    p.add_argument("--time-factor", type=float, default=0.05)
    p.add_argument("--stage-queue", type=int, default=2, help="max_ongoing_requests of Sketch and Render")
    p.add_argument("--no-sim", action="store_true")
    p.add_argument("--out", default="benchmarks/results/fleets.json")
    return p.parse_args(argv)


def summary(plan: SetupPlan) -> dict[str, Any]:
    return {"setup": plan.setup, "feasible": plan.feasible, "gpus": plan.gpus, "p95_s": plan.p95_s,
            "cost_per_hour": plan.cost_per_hour, "dollars_per_video": plan.dollars_per_video,
            "pools": {p.name: {"gpu": p.gpu, "replicas": p.replicas, "roles": list(p.roles)} for p in plan.pools},
            "note": plan.note}


def with_price(table: CostTable, gpu: str, price: float) -> CostTable:
    data = copy.deepcopy(table.data)
    data["gpus"][gpu]["price_per_hour"]["value"] = price
    return CostTable(data)


def best_colocated(rate: float, slo: float, table: CostTable) -> SetupPlan | None:
    plans = [Planner(PlanRequest(rate, slo, colocated_gpu=g), table).colocated_sr(g) for g in table.gpus]
    plans = [p for p in plans if p.feasible]
    return min(plans, key=lambda p: p.dollars_per_video) if plans else None


def disaggregated(rate: float, slo: float, sketch: str, render: str, table: CostTable) -> SetupPlan:
    return Planner(PlanRequest(rate, slo, sketch_gpu=sketch, render_gpu=render), table).disaggregated(sketch, render)


def break_even_price(rate: float, slo: float, sketch: str, render: str, table: CostTable,
                     target: float) -> float | None:
    """The render GPU's price per hour at which the mixed fleet's $ per video is `target` (None: above it even at
    price 0). The fleet is re-sized at each price (a cheaper render GPU can mean a bigger render pool)."""
    def cost(price: float) -> float:
        plan = disaggregated(rate, slo, sketch, render, with_price(table, render, price))
        return plan.dollars_per_video if plan.feasible else float("inf")

    if cost(0.0) > target:
        return None
    lo, hi = 0.0, table.price(render)
    if cost(hi) <= target:
        return hi
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= target else (lo, mid)
    return lo


def planner_part(opts: argparse.Namespace, table: CostTable) -> dict[str, Any]:
    gpus = table.gpus
    per_flop = {g: table.price(g) / (table.bf16_tflops(g) / 1000) for g in gpus}
    rows = []
    for rate in (float(x) for x in opts.rates.split(",")):
        colocated = best_colocated(rate, opts.slo, table)
        mixed = []
        for sketch in opts.sketch_gpus.split(","):
            for render in gpus:
                plan = disaggregated(rate, opts.slo, sketch, render, table)
                entry = {"sketch_gpu": sketch, "render_gpu": render, "render_list_price": table.price(render),
                         **summary(plan)}
                if plan.feasible and colocated is not None:
                    entry["ratio_to_best_colocated"] = plan.dollars_per_video / colocated.dollars_per_video
                    entry["break_even_render_price"] = None if sketch == render else break_even_price(
                        rate, opts.slo, sketch, render, table, GOAL_RATIO * colocated.dollars_per_video)
                mixed.append(entry)
        feasible = [m for m in mixed if m["feasible"] and m["sketch_gpu"] != m["render_gpu"]]
        best = min(feasible, key=lambda m: m["dollars_per_video"]) if feasible else None
        rows.append({"rate": rate, "best_colocated": colocated and summary(colocated), "disaggregated": mixed,
                     "best_mixed": best, "goal_met": bool(best and best.get("ratio_to_best_colocated", 9) <=
                                                          GOAL_RATIO)})
    return {"slo_p95_s": opts.slo, "price_per_dense_pflop_hour": per_flop, "rows": rows}


def sim_part(opts: argparse.Namespace, planned: dict[str, Any], table: CostTable) -> list[dict[str, Any]]:
    """The best colocated and the best mixed fleet at --sim-rate, on the serving stack with simulated GPUs."""
    import ray
    from ray import serve

    from loadgen import LoadSpec
    from srserve.serving import build_app
    from srserve.sim.spec import SimSpec, write_sim_checkpoint

    row = next(r for r in planned["rows"] if r["rate"] == opts.sim_rate) if any(
        r["rate"] == opts.sim_rate for r in planned["rows"]) else None
    if row is None:
        co = best_colocated(opts.sim_rate, opts.slo, table)
        row = {"best_colocated": co and summary(co), "best_mixed": None}
    fleets = []
    if row["best_colocated"]:
        gpu = row["best_colocated"]["pools"]["colocated-sr"]["gpu"]
        fleets.append(("colocated-sr", gpu, gpu, {"workers": row["best_colocated"]["gpus"]}, row["best_colocated"]))
    if row["best_mixed"]:
        m = row["best_mixed"]
        if "encode" in m["pools"]:
            print("the best mixed fleet has an encode pool of its own: simulated with encode on the render pool")
        fleets.append(("disaggregated-sr", m["sketch_gpu"], m["render_gpu"],
                       {"sketch": m["pools"]["sketch"]["replicas"], "render": m["pools"]["render"]["replicas"]}, m))
    work = Path(tempfile.mkdtemp(prefix="srserve-fleets-"))
    top = max(max(p.values()) for _, _, _, p, _ in fleets)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             resources={"colocated_pool": top, "sketch_pool": top, "render_pool": top})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    body, out = {"prompt": "a red circle moving right", "seed": 0}, []
    try:
        for setup, sketch_gpu, render_gpu, pools, plan in fleets:
            name = f"{setup}-{sketch_gpu}-{render_gpu}"
            model = str(write_sim_checkpoint(work / f"model-{name}", SimSpec(
                sketch_gpu=sketch_gpu, render_gpu=render_gpu, time_factor=opts.time_factor)))
            serve.run(build_app(app_args(setup, model, pools, work / name, opts.stage_queue)), name=name,
                      route_prefix=f"/{name}")
            spec = LoadSpec(f"http://127.0.0.1:{port}/{name}", body, opts.sim_requests,
                            poisson_rate=opts.sim_rate / opts.time_factor, seed=1, time_limit_s=600, poll_s=2.0)
            stats = sim_stats(measure(spec, setup, pools), opts.time_factor)
            served = stats["arrival_per_sim_hour"]  # open loop, stable: what it served is what arrived
            measured = {**stats, "dollars_per_video": plan["cost_per_hour"] / served if served else None}
            out.append({"fleet": name, "pools": pools, "plan": plan, "measured": measured})
            serve.delete(name)
            print(f"{name}: pools {pools} p95 {stats['latency_sim_s']['p95']:.0f} sim-s (plan {plan['p95_s']:.0f}), "
                  f"$/video {measured['dollars_per_video']:.3f} (plan {plan['dollars_per_video']:.3f})", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    started, table = time.monotonic(), default_table()
    planned = planner_part(opts, table)
    for row in planned["rows"]:
        co, best = row["best_colocated"], row["best_mixed"]
        print(f"rate {row['rate']:g}/s: best colocated {co and (co['gpus'], co['pools'])} ${co and co['dollars_per_video']:.3f}"
              f"; best mixed {best and (best['sketch_gpu'], best['render_gpu'], best['gpus'])} "
              f"${best and best['dollars_per_video']:.3f} ratio {best and best.get('ratio_to_best_colocated'):.3f}")
    write_result(opts.out, {"goal_ratio": GOAL_RATIO, "planner": planned, "time_factor": opts.time_factor,
                            "stage_queue": opts.stage_queue,
                            "simulated": [] if opts.no_sim else sim_part(opts, planned, table)}, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
