"""Simulated GPU pools at cluster scale (issue 13 point 6a): on equal GPUs (8, 16, 24 simulated H100s), large-only
vs colocated SR vs disaggregated SR at the planner's split; saturation throughput and p50/p95/p99 at 50% and 80%
of each setup's own saturation, against what `srserve plan`'s model predicts for the same pools.

The whole serving stack runs (Ingress, JobStore, Encode/Sketch/Render/Decode or Colocated replicas, handles, the
object store with real-size states); replicas load no weights and sleep the cost table's seconds x --time-factor.
Figures are reported in simulated seconds (real / time factor), so the control plane's real cost shows up
amplified by 1 / time factor: at 0.05, 10 ms of real overhead is 0.2 simulated seconds.

    python benchmarks/pools_sim.py --out benchmarks/results/pools_sim.json     (~16 min here)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import LoadSpec, run_load  # noqa: E402
from serving_compare import drain, free_port, machine, slim, versions  # noqa: E402
from serving_metrics import percentile, phase_metrics  # noqa: E402

SETUPS = ("large-only", "colocated-sr", "disaggregated-sr", "disaggregated-flex-sr")
DISAGGREGATED = ("disaggregated-sr", "disaggregated-flex-sr")


def write_result(path: str, fields: dict[str, Any], started: float) -> dict[str, Any]:
    """A benchmark's JSON: when and where it ran, its fields, its wall time (from `started`, time.monotonic())."""
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine("cpu"),
              "versions": versions(), **fields, "wall_seconds": time.monotonic() - started}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path} ({result['wall_seconds']:.0f}s)")
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="8,16,24", help="simulated GPUs per setup")
    p.add_argument("--gpu", default="h100")
    p.add_argument("--time-factor", type=float, default=0.05, help="real seconds per simulated second")
    p.add_argument("--levels", default="0.5,0.8", help="open-loop loads, fractions of each setup's saturation")
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--stage-queue", type=int, default=2, help="max_ongoing_requests of Sketch and Render replicas "
                   "(batch 1): requests a replica holds; the rest wait in the caller's router for the first free one")
    p.add_argument("--concurrency-factor", type=float, default=2.0, help="closed-loop clients per GPU at saturation")
    p.add_argument("--poll-s", type=float, default=2.0, help="seconds between a client's polls of its job (real): "
                   "latencies are the job records' (created -> completed), and polling at 4 Hz from 36 clients "
                   "was seen to saturate this 2-core machine's CPU")
    p.add_argument("--saturation-only", action="store_true")
    p.add_argument("--slo-factor", type=float, default=0.0, help="SR setups: deploy with the SLO controller on, "
                   "its p95 target this x the unloaded p50 of --saturation-from's run (needs it; 0: off)")
    p.add_argument("--floor-steps", type=int, default=10, help="the controller's quality floor, of 50 steps")
    p.add_argument("--saturation-from", default=None, help="take each setup's saturation throughput from this "
                   "earlier output instead of measuring it (e.g. to rerun the load levels with the controller)")
    p.add_argument("--out", default="benchmarks/results/pools_sim.json")
    opts = p.parse_args(argv)
    if opts.slo_factor and not opts.saturation_from:
        p.error("--slo-factor needs --saturation-from (the run whose unloaded p50 sets the target)")
    return opts


def planned_pools(gpus: int, gpu: str) -> dict[str, Any]:
    """Per setup: pool sizes and mean service seconds (simulated) from the planner's model; disaggregated at the
    split of `gpus` that maximises its pool-bound throughput (the render pool is charged encode and decode)."""
    from srserve.sim.costs import default_table
    from srserve.sim.plan import Planner, PlanRequest, best_whole_gpu_split
    from srserve.sim.switching import SwitchDistribution

    table = default_table()
    planner = Planner(PlanRequest(rate=0.01, slo_p95_s=1e6, sketch_gpu=gpu, render_gpu=gpu), table,
                      SwitchDistribution.load())
    out: dict[str, Any] = {}
    for name, plan in (("large-only", planner.large_only(gpu)), ("colocated-sr", planner.colocated_sr(gpu))):
        mean = plan.pools[0].mean_service_s
        out[name] = {"pools": {"workers": gpus}, "mean_s": {"workers": mean}, "bound_rps": gpus / mean}
    pools = planner.disaggregated(gpu, gpu).pools
    means = {p.name: p.mean_service_s for p in pools}
    sizes, bound = best_whole_gpu_split(gpus, means["sketch"], means["render"])
    out["disaggregated-sr"] = {"pools": sizes, "mean_s": means, "bound_rps": bound}
    # with flex GPUs (Colocated replicas beside the pools) where the whole-GPU split leaves a remainder
    sizes, bound = best_whole_gpu_split(gpus, means["sketch"], means["render"], out["colocated-sr"]["mean_s"]["workers"])
    if sizes.get("flex"):
        out["disaggregated-flex-sr"] = {"pools": sizes, "mean_s": {**means, "flex": out["colocated-sr"]["mean_s"][
            "workers"]}, "bound_rps": bound}
    return out


def app_args(setup: str, model: str, pools: dict[str, int], work: Path, stage_queue: int,
             slo: dict[str, Any] | None = None) -> dict[str, Any]:
    stage = {"max_batch_size": 1, "graceful_shutdown_timeout_s": 2.0, "progress_interval_s": 1.0}
    args: dict[str, Any] = {
        "model": model, "job_store_path": str(work / "jobs.sqlite"), "artifacts_url": str(work / "artifacts"),
        "max_pending_jobs": 2000, "ingress": {"max_ongoing_requests": 2000, "max_queued_requests": -1},
        "admission": {"check_deadline": False}, "watchdog": {"checkpoint_stages": False}, "slo": slo,
    }
    if setup not in DISAGGREGATED:
        args.update(mode="colocated", colocated=dict(stage, num_replicas=pools["workers"], pool="colocated_pool",
                                                     force_switch="none" if setup == "large-only" else None))
        return args
    if pools.get("flex"):  # flex GPUs hold both models: whole jobs, one at a time, beside the pools
        args["flex"] = dict(stage, num_replicas=pools["flex"], pool="colocated_pool", max_ongoing_requests=1)
    r = pools["render"]
    # Encode and Decode ride on the render GPUs (fractions of them); the planner charges their time to that pool.
    queue = {"max_ongoing_requests": stage_queue}
    args.update(sketch=dict(stage, **queue, num_replicas=pools["sketch"], pool="sketch_pool"),
                render=dict(stage, **queue, num_replicas=r, pool="render_pool", pool_amount=0.5),
                encode=dict(stage, num_replicas=1, pool="render_pool", pool_amount=0.25 / r),
                decode=dict(stage, num_replicas=max(1, math.ceil(r / 4)), pool="render_pool",
                            pool_amount=0.25 * r / max(1, math.ceil(r / 4))))
    return args


def pool_stages(setup: str, pools: dict[str, int]) -> dict[str, dict[str, Any]]:
    """The stages each pool's GPUs run (serving_metrics.busy_fraction): colocated replicas record all four."""
    if setup not in DISAGGREGATED:
        return {"workers": {"stages": ["encode", "sketch", "render", "decode"], "workers": pools["workers"]}}
    # (a flex replica's sketch and render steps count toward these pools' busy fractions: job records name the
    # stage, not which deployment ran it)
    return {"sketch": {"stages": ["sketch"], "workers": pools["sketch"]},
            "render": {"stages": ["render"], "workers": pools["render"]}}


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def slo_args(target_sim_s: float, floor_steps: int, tf: float) -> dict[str, Any]:
    """The SLO controller's args for a p95 target in simulated seconds: its clock is the wall's, so the target and
    its delays (a move per simulated minute, a 10-minute window) are the simulated ones x the time factor."""
    return {"p95_target_s": target_sim_s * tf, "floor_steps": floor_steps, "step": 2, "interval_s": 60 * tf,
            "window_s": 600 * tf, "min_samples": 8, "tick_s": min(1.0, 20 * tf)}


def controller(unloaded_p50_sim: float, opts: argparse.Namespace) -> dict[str, Any]:
    """The controller's args for a target of --slo-factor x the unloaded p50."""
    return slo_args(opts.slo_factor * unloaded_p50_sim, opts.floor_steps, opts.time_factor)


def measure(spec: LoadSpec, setup: str, pools: dict[str, int], concurrency: int | None = None) -> dict[str, Any]:
    """One load phase against the app at `spec.url`, waited out, and its figures (serving_metrics.phase_metrics)."""
    records = [dict(asdict(r), latency=r.latency, server_latency=r.server_latency)
               for r in asyncio.run(run_load(spec))]
    asyncio.run(drain(spec.url, records))
    return phase_metrics([slim(r) for r in records], pool_stages(setup, pools), concurrency)


def sim_stats(metrics: dict[str, Any], tf: float) -> dict[str, Any]:
    """A phase's figures in simulated units."""
    lat = metrics["latencies"]
    tput = metrics.get("throughput_rps")
    return {"completed": metrics["completed"], "submitted": metrics["submitted"], "failed": metrics["failed"],
            "busy_fraction": metrics.get("busy_fraction"),
            "mean_switch_step": mean([k for k in metrics.get("switch_steps", []) if k is not None]),
            "throughput_per_sim_hour": tput * tf * 3600 if tput else None,
            "latency_sim_s": {q: (percentile(lat, v) / tf if lat else None)
                              for q, v in (("p50", 50), ("p95", 95), ("p99", 99))},
            "arrival_per_sim_hour": metrics["arrival_rps"] * tf * 3600 if metrics.get("arrival_rps") else None}


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    import ray
    from ray import serve

    from srserve.serving import build_app
    from srserve.sim.spec import SimSpec, write_sim_checkpoint

    started, tf = time.monotonic(), opts.time_factor
    sizes = [int(x) for x in opts.sizes.split(",")]
    setups = [s for s in opts.setups.split(",") if s]
    work = Path(tempfile.mkdtemp(prefix="srserve-pools-"))
    model = str(write_sim_checkpoint(work / "model", SimSpec(sketch_gpu=opts.gpu, render_gpu=opts.gpu,
                                                             time_factor=tf)))
    top = max(sizes)
    from srserve.serving.serve_env import local_cluster_options  # the mode `srserve serve` runs

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             resources={"colocated_pool": top, "sketch_pool": top, "render_pool": top},
             **local_cluster_options())
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    body = {"prompt": "a red circle moving right", "seed": 0}
    rows_out: list[dict[str, Any]] = []
    earlier = {(r["gpus"], r["setup"]): r for r in json.loads(Path(opts.saturation_from).read_text())["rows"]} \
        if opts.saturation_from else {}
    try:
        for gpus in sizes:
            plans = planned_pools(gpus, opts.gpu)
            for setup in setups:
                plan = plans.get(setup)
                if plan is None:  # no flex GPU in the best split of this size: the same as disaggregated-sr
                    continue
                name = f"{setup}-{gpus}"
                # With the controller: deployed with it from the start (no rolling update before the load levels),
                # its target from the earlier run's unloaded p50.
                before = earlier.get((gpus, setup), {}).get("unloaded", {}).get("latency_sim_s", {}).get("p50")
                slo = controller(before, opts) if opts.slo_factor and setup != "large-only" and before else None
                deploy_began = time.monotonic()
                serve.run(build_app(app_args(setup, model, plan["pools"], work / name, opts.stage_queue, slo)),
                          name=name, route_prefix=f"/{name}")
                url, row = f"{base}/{name}", {"gpus": gpus, "setup": setup, "plan": plan,
                                              "deploy_s": time.monotonic() - deploy_began}
                if slo:
                    row["slo"] = {**slo, "p95_target_sim_s": slo["p95_target_s"] / tf}

                def phase(spec: LoadSpec, concurrency: int | None = None) -> dict[str, Any]:
                    return measure(replace(spec, poll_s=opts.poll_s), setup, plan["pools"], concurrency)

                if not opts.saturation_only:
                    row["unloaded"] = sim_stats(phase(LoadSpec(url, body, 3, concurrency=1, time_limit_s=120)), tf)
                conc = max(4, math.ceil(opts.concurrency_factor * gpus))
                if earlier:
                    row["saturation"] = {**earlier[(gpus, setup)]["saturation"], "from": opts.saturation_from}
                    # Not measured: a replica's first requests cost real seconds (hundreds simulated) that the
                    # saturation phase would otherwise have absorbed before the load levels.
                    row["warmup"] = sim_stats(phase(LoadSpec(url, body, 2 * gpus, concurrency=conc,
                                                             time_limit_s=300), conc), tf)
                else:
                    row["saturation"] = sim_stats(phase(LoadSpec(url, body, 3 * gpus + 2 * conc, concurrency=conc,
                                                                 time_limit_s=300), conc), tf)
                sat_h = row["saturation"]["throughput_per_sim_hour"]
                rate = sat_h / 3600 / tf if sat_h else None
                for level in (float(x) for x in opts.levels.split(",") if not opts.saturation_only):
                    if rate:
                        row[f"load-{level:g}"] = sim_stats(phase(LoadSpec(
                            url, body, 2 * gpus, poisson_rate=level * rate, seed=gpus, time_limit_s=300)), tf)
                serve.delete(name)
                rows_out.append(row)
                sat = row["saturation"]["throughput_per_sim_hour"]
                print(f"[{time.monotonic() - started:5.0f}s] {name:22s} pools {plan['pools']} saturation "
                      f"{sat and round(sat, 1)}/sim-h (plan {plan['bound_rps'] * 3600:.1f}) unloaded p50 "
                      f"{row.get('unloaded', {}).get('latency_sim_s', {}).get('p50')} busy "
                      f"{row['saturation']['busy_fraction']}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    write_result(opts.out, {
        "gpu": opts.gpu, "time_factor": tf, "request": "defaults of the sim model: 81 frames 832x480, 50 steps, "
        "switch adaptive (srd-tiny-adaptive switch steps scaled to 50)", "stage_queue": opts.stage_queue,
        "slo_factor": opts.slo_factor, "floor_steps": opts.floor_steps, "concurrency_factor": opts.concurrency_factor,
        "poll_s": opts.poll_s, "rows": rows_out}, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
