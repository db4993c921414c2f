"""A load step on simulated H100 pools (issue 13 point 6c): 1x -> 2x -> 1x over 30 simulated minutes, against
fixed pools, the stage-ratio autoscaling policy alone, and autoscaling with the SLO-driven switch cap.

The app is deployments/sim-wan2.1-h100.yaml (the real serving stack on simulated GPUs, deployed as `srserve serve`
does, so the application's autoscaling_policy applies) at time factor --time-factor, with the sketch pool held to
--sketch-max GPUs (a budget): at 2x the adaptive switch needs more sketch GPUs than that, so only an earlier switch
holds the SLO. Sampled every second: RUNNING replicas per stage (serve.status()); per job: created/completed, the
cap it was created under and the switch step it got (the job records). SLO attainment per phase; the quality cost
of the caps used, read from srd-tiny's quality table (benchmarks/results/srd-tiny-quality.json) at the switch
steps the jobs got, scaled to its 30 steps.

    python benchmarks/load_step.py      (~9 min here; writes benchmarks/results/load_step.json and load_step.png)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import LoadSpec, run_load  # noqa: E402
from pools_sim import slo_args, write_result  # noqa: E402
from serving_compare import free_port  # noqa: E402
from serving_metrics import percentile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETUPS = ("fixed", "autoscale", "autoscale+slo")
STAGES = {"Sketch": "sketch", "Render": "render", "Decode": "decode"}
BUNDLE_TIME_FACTOR = 0.01  # the admission prices of the shipped config are real seconds at this factor
QUALITY = ROOT / "benchmarks" / "results" / "srd-tiny-quality.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--time-factor", type=float, default=0.05, help="real seconds per simulated second")
    p.add_argument("--base-rate", type=float, default=0.04, help="1x, requests per simulated second")
    p.add_argument("--phase-s", type=float, default=600.0, help="simulated seconds of each of 1x, 2x, 1x")
    p.add_argument("--warmup-s", type=float, default=300.0, help="simulated seconds of 1x before the first phase, "
                   "not counted: the autoscaled pools settle from their idle minimum (Serve deploys them idle)")
    p.add_argument("--stats-window-s", type=float, default=300.0, help="simulated seconds of starts behind the "
                   "arrival rate the replicas report to the policy")
    p.add_argument("--slo", type=float, default=300.0, help="p95 end-to-end target, simulated seconds")
    p.add_argument("--floor-steps", type=int, default=10, help="the controller's quality floor (of 50 steps)")
    p.add_argument("--sketch-fixed", type=int, default=5, help="fixed pools: sketch GPUs (render: --render-fixed)")
    p.add_argument("--render-fixed", type=int, default=2)
    p.add_argument("--sketch-max", type=int, default=7, help="autoscaling: most sketch GPUs")
    p.add_argument("--render-max", type=int, default=4)
    p.add_argument("--target-utilization", type=float, default=0.6, help="autoscaling: the policy's target busy "
                   "fraction (the config's 0.8 held 1x's p95 over a 300 s SLO in a first run: M/G/c queueing at "
                   "4-5 sketch GPUs needs more headroom)")
    p.add_argument("--out", default="benchmarks/results/load_step.json")
    p.add_argument("--plot", default="benchmarks/results/load_step.png")
    return p.parse_args(argv)


def app_config(setup: str, opts: argparse.Namespace, model: str, work: Path) -> dict[str, Any]:
    """deployments/sim-wan2.1-h100.yaml made into `setup` at this run's time factor."""
    data = yaml.safe_load((ROOT / "deployments" / "sim-wan2.1-h100.yaml").read_text())
    app = data["applications"][0]
    args, tf = app["args"], opts.time_factor
    scale = tf / BUNDLE_TIME_FACTOR
    args["admission"] = {k: (v * scale if k.endswith("_s") or "_s_per_" in k else v)
                         for k, v in args["admission"].items()}
    args.update(model=model, job_store_path=str(work / "jobs.sqlite"), artifacts_url=str(work / "artifacts"),
                max_pending_jobs=1000)
    args["ingress"] = {"num_replicas": 1, "max_ongoing_requests": 1000, "max_queued_requests": -1}
    args["watchdog"] = {**args["watchdog"], "stage_timeout_s": 600.0, "job_timeout_s": 3600.0}
    queue = {"max_ongoing_requests": 2}  # Sketch/Render hold one more than they run: the rest wait for a free one
    if setup == "fixed":
        app.pop("autoscaling_policy")
        for stage, count in (("sketch", opts.sketch_fixed), ("render", opts.render_fixed), ("decode", 1)):
            args[stage].pop("autoscaling_config")
            args[stage]["num_replicas"] = count
    else:
        app["autoscaling_policy"]["policy_kwargs"]["target_utilization"] = opts.target_utilization
        for stage, (initial, top) in (("sketch", (opts.sketch_fixed, opts.sketch_max)),
                                      ("render", (opts.render_fixed, opts.render_max)), ("decode", (1, 2))):
            args[stage]["autoscaling_config"].update(min_replicas=1, initial_replicas=initial, max_replicas=top)
            args[stage]["stats_window_s"] = opts.stats_window_s * tf
    for stage in ("sketch", "render"):
        args[stage].update(queue)
    if setup == "autoscale+slo":
        args["slo"] = slo_args(opts.slo, opts.floor_steps, tf)
    return data


def sample_replicas(app: str, stop: threading.Event, out: list[dict[str, Any]], began: float) -> None:
    from ray import serve

    while not stop.wait(1.0):
        try:
            deployments = serve.status().applications[app].deployments
        except Exception:  # noqa: BLE001 - a missed sample is only a gap in the plot
            continue
        row: dict[str, Any] = {"t": time.time() - began}
        for name, stage in STAGES.items():
            states = getattr(deployments.get(name), "replica_states", None) or {}
            row[stage] = sum(n for state, n in states.items() if str(state).endswith("RUNNING"))
        out.append(row)


def quality_at(steps_of_50: float, rows: list[dict[str, Any]]) -> float | None:
    """srd-tiny's worst attribute accuracy at a fixed switch after this many of 50 steps (its table is at 30
    steps: step:K rows, interpolated linearly; none = 30, small-only = 0)."""
    points = sorted((r["large_steps_mean"], min(r["color_acc"], r["shape_acc"], r["motion_acc"])) for r in rows
                    if r["policy"].startswith("step:") or r["policy"] in ("none", "small-only"))
    if not points:
        return None
    k = steps_of_50 * 30 / 50
    for (k0, q0), (k1, q1) in zip(points, points[1:]):
        if k0 <= k <= k1:
            return q0 + (q1 - q0) * (k - k0) / (k1 - k0) if k1 > k0 else q0
    return points[-1][1] if k > points[-1][0] else points[0][1]


def summarise(records: list[dict[str, Any]], replicas: list[dict[str, Any]], opts: argparse.Namespace,
              began: float, quality_rows: list[dict[str, Any]]) -> dict[str, Any]:
    tf, bounds = opts.time_factor, [opts.warmup_s + opts.phase_s * i for i in range(4)]
    done = [r for r in records if r["status"] == "completed" and r["job"].get("completed_at")]
    jobs = [{"created": (r["job"]["created_at"] - began) / tf,
             "latency": (r["job"]["completed_at"] - r["job"]["created_at"]) / tf,
             "switch_cap": r["job"].get("switch_cap"), "switch_step": r["job"].get("switch_step")} for r in done]
    phases = []
    for name, lo, hi in zip(("1x", "2x", "1x again"), bounds, bounds[1:]):
        inside = [j for j in jobs if lo <= j["created"] < hi]
        lat = [j["latency"] for j in inside]
        ks = [j["switch_step"] for j in inside if j["switch_step"] is not None]
        phases.append({"phase": name, "jobs": len(inside),
                       "p95_sim_s": percentile(lat, 95) if lat else None,
                       "slo_attainment": sum(x <= opts.slo for x in lat) / len(lat) if lat else None,
                       "mean_switch_step": sum(ks) / len(ks) if ks else None,
                       "capped_jobs": sum(j["switch_cap"] is not None for j in inside)})
    ks = [j["switch_step"] for j in jobs if j["switch_step"] is not None]
    counted = [row for row in replicas if row["t"] / tf >= opts.warmup_s]  # 1 s samples, warm-up left out
    gpu_s = {s: sum(row[s] for row in counted) * 1.0 / tf for s in ("sketch", "render")}
    q = [quality_at(k, quality_rows) for k in ks]
    q = [x for x in q if x is not None]
    reference = quality_at(opts.adaptive_mean_k, quality_rows) if quality_rows else None
    return {"submitted": len(records), "completed": len(done), "phases": phases,
            "p95_sim_s": percentile([j["latency"] for j in jobs], 95) if jobs else None,
            "slo_attainment": sum(j["latency"] <= opts.slo for j in jobs) / len(jobs) if jobs else None,
            "gpu_sim_hours": {s: v / 3600 for s, v in gpu_s.items()},
            "quality_worst_attribute_mean": sum(q) / len(q) if q else None,
            "quality_at_uncapped_adaptive": reference,
            "jobs": jobs, "replicas": [{**r, "t": r["t"] / tf} for r in replicas]}


def run_setup(setup: str, opts: argparse.Namespace, model: str, work: Path, port: int,
              quality_rows: list[dict[str, Any]]) -> dict[str, Any]:
    from ray import serve

    from srserve.serving.runner import deploy

    config = app_config(setup, opts, model, work / setup)
    app = config["applications"][0]
    app["name"] = setup
    app["route_prefix"] = f"/{setup}"
    deploy(config, "127.0.0.1", port, threading.Event(), timeout_s=300)
    tf = opts.time_factor
    steps = ((opts.warmup_s * tf, opts.base_rate / tf),
             *((opts.phase_s * tf, opts.base_rate * m / tf) for m in (1.0, 2.0, 1.0)))
    spec = LoadSpec(f"http://127.0.0.1:{port}/{setup}", {"prompt": "a red circle moving right", "seed": 0},
                    count=100000, rate_steps=steps, poll_s=2.0,
                    time_limit_s=(opts.warmup_s + 3 * opts.phase_s) * tf + 600)
    replicas: list[dict[str, Any]] = []
    stop, began = threading.Event(), time.time()
    sampler = threading.Thread(target=sample_replicas, args=(setup, stop, replicas, began), daemon=True)
    sampler.start()
    try:
        records = [dict(asdict(r)) for r in asyncio.run(run_load(spec))]
    finally:
        stop.set()
        sampler.join()
        serve.delete(setup)
    result = summarise(records, replicas, opts, began, quality_rows)
    print(f"{setup}: " + "; ".join(f"{p['phase']} p95 {p['p95_sim_s'] and round(p['p95_sim_s'])} sim-s, SLO "
                                   f"{p['slo_attainment'] and round(100 * p['slo_attainment'])}%, k "
                                   f"{p['mean_switch_step'] and round(p['mean_switch_step'], 1)}"
                                   for p in result["phases"]), flush=True)
    return result


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    opts = result["options"]
    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    for setup, r in result["setups"].items():
        t = [x["t"] / 60 for x in r["replicas"]]
        axes[0].step(t, [x["sketch"] for x in r["replicas"]], where="post", label=f"{setup}")
        axes[1].step(t, [x["render"] for x in r["replicas"]], where="post", label=f"{setup}")
        jobs = sorted(r["jobs"], key=lambda j: j["created"])
        axes[2].plot([j["created"] / 60 for j in jobs], [j["switch_step"] for j in jobs], ".", ms=3,
                     label=f"{setup}: switch step")
        capped = [j for j in jobs if j["switch_cap"] is not None]
        if capped:
            axes[2].step([j["created"] / 60 for j in capped], [j["switch_cap"] for j in capped], where="post",
                         label=f"{setup}: cap")
        axes[3].plot([j["created"] / 60 for j in jobs], [j["latency"] for j in jobs], ".", ms=3, label=setup)
    axes[3].axhline(opts["slo"], color="k", ls="--", lw=1, label="SLO (p95)")
    load = axes[0].twinx()
    phase, w = opts["phase_s"] / 60, opts.get("warmup_s", 0.0) / 60
    load.step([0, w + phase, w + 2 * phase, w + 3 * phase], [1, 2, 1, 1], where="post", color="grey", ls=":", lw=1)
    for ax in axes:
        ax.axvspan(0, w, color="grey", alpha=0.1)  # warm-up at 1x, not counted
    load.set_ylabel("offered load (x)")
    axes[0].set_ylabel("sketch replicas")
    axes[1].set_ylabel("render replicas")
    axes[2].set_ylabel("sketch steps (of 50)")
    axes[3].set_ylabel("end-to-end s (sim)")
    axes[3].set_xlabel("simulated minutes (job created)")
    for ax in axes:
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    fig.suptitle("Load step 1x -> 2x -> 1x on simulated H100 pools", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    import ray
    from ray import serve

    from srserve.sim.spec import SimSpec, write_sim_checkpoint
    from srserve.sim.switching import SwitchDistribution

    opts.adaptive_mean_k = SwitchDistribution.load().mean_steps(50, None)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="srserve-load-step-"))
    model = str(write_sim_checkpoint(work / "model", SimSpec(time_factor=opts.time_factor)))
    quality_rows = json.loads(QUALITY.read_text())["rows"] if QUALITY.exists() else []
    from srserve.serving.serve_env import local_cluster_options  # the mode `srserve serve` runs

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             resources={"sketch_pool": max(opts.sketch_max, opts.sketch_fixed),
                        "render_pool": max(opts.render_max, opts.render_fixed) + 2},
             **local_cluster_options())
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    setups: dict[str, Any] = {}
    try:
        for setup in (s for s in opts.setups.split(",") if s):
            setups[setup] = run_setup(setup, opts, model, work, port, quality_rows)
    finally:
        serve.shutdown()
        ray.shutdown()
    options = {k: v for k, v in vars(opts).items() if k not in ("out", "plot")}
    result = write_result(opts.out, {"options": options, "setups": setups}, started)
    plot(result, opts.plot)
    print(f"wrote {opts.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
