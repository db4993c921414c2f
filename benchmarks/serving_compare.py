"""Serving comparison at equal cluster size, in one run, alternating: large-only vs colocated SR vs disaggregated SR.

    .venv/bin/python benchmarks/serving_compare.py --out benchmarks/results/serving.json

Setups (each W workers; on CPU a worker is one core, 1 torch thread per replica, replicas pinned to their cores):
  large-only        `mode: colocated`, `force_switch: none`: W replicas running every step on the large model
  colocated-sr      `mode: colocated`: W replicas, each holding both models and running the whole request
  disaggregated-sr  srserve: a sketch pool and a render pool (which also runs encode and decode), sized from the
                    stage cost ratio measured in-process at the start of the run (with W = 2: 1 + 1)
One local Ray cluster; each repeat deploys the setups one after the other (the order rotates every repeat), runs
its phases and deletes it before the next: unloaded latency (one request at a time), saturation (closed loop,
`--concurrency` in flight), then open-loop Poisson load at `--levels` fractions of that saturation throughput.
Apps are not left deployed side by side: idle apps on the same two cores slowed the measured one by ~25% (large-only
alone: 0.71 s unloaded, 1.96 req/s; with the other two apps deployed and idle: 0.89 s, 1.5 req/s). Everything is
bounded in count and time; loopback only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import LoadSpec, run_load  # noqa: E402
from serving_metrics import cpu_cores, cpu_snapshot, phase_metrics, spread  # noqa: E402

SETUPS = ("large-only", "colocated-sr", "disaggregated-sr")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model dir or spec (default: the bundled srd-tiny)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=None,
                   help="pin each pool's replicas to its cores (default: on for cpu)")
    p.add_argument("--switch", default="adaptive", help="switch policy of the SR setups")
    p.add_argument("--steps", type=int, default=None, help="default: the model's")
    p.add_argument("--size", default=None, help="WxH (default: the model's)")
    p.add_argument("--frames", type=int, default=None, help="default: the model's")
    p.add_argument("--max-batch-size", type=int, default=4)
    p.add_argument("--batch-wait", type=float, default=0.02)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--unloaded-count", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop requests in flight at saturation")
    p.add_argument("--saturation-count", type=int, default=30)
    p.add_argument("--levels", default="0.5,0.8", help="open-loop loads, fractions of saturation throughput")
    p.add_argument("--level-count", type=int, default=24)
    p.add_argument("--phase-limit", type=float, default=120.0, help="seconds per phase, at most")
    p.add_argument("--time-budget", type=float, default=900.0, help="skip the remaining phases after this")
    p.add_argument("--poll", type=float, default=0.5, help="client polling interval, seconds")
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--out", default="benchmarks/results/serving.json")
    p.add_argument("--records", default=None, help="JSONL of every request (default: next to --out)")
    return p.parse_args(argv)


# --- calibration: per-step and per-stage costs, in-process, one worker's share of the machine ------------------
def calibrate(spec: Any, bodies: list[dict[str, Any]], threads: int, pin: list[int] | None) -> dict:
    """In-process, one thread, pinned to one core: per-step costs, and per-stage seconds of `bodies` (the first
    requests of the saturation phase) with the SR policy and with `none`."""
    import torch

    from srserve.config import GenerationRequest
    from srserve.pipeline.engine import SREngine
    from srserve.serving.messages import dump_state
    from sr_speedup import per_step_seconds

    affinity = os.sched_getaffinity(0) if pin else None
    if pin:
        os.sched_setaffinity(0, pin[:1])
    torch.set_num_threads(threads)
    try:
        engine = SREngine.load(spec)
        body = bodies[0]
        fields = {k: body[k] for k in ("num_inference_steps", "num_frames", "switch") if k in body}
        if "size" in body:
            fields["width"], fields["height"] = map(int, body["size"].split("x"))
        base = engine.resolve(GenerationRequest(prompt=body["prompt"], **fields))
        engine.generate(base)  # warm-up
        state0 = engine.prepare(base, engine.encode(base))
        steps = {role: per_step_seconds(engine, state0, role, steps=5) for role in ("sketch", "render")}
        handed = engine.sketch(state0)  # what the sketch stage hands the render stage
        emb = handed.embeddings
        header, buffers = dump_state(handed.replace(embeddings=None))  # the sketch -> render hop's wire form
        state_bytes = {"wire": len(header) + sum(b.raw().nbytes for b in buffers), "tensors": handed.nbytes(),
                       "latents": handed.latents.numel() * handed.latents.element_size(),
                       "prompt_embeddings": sum(t.numel() * t.element_size() for t in
                                                (emb.prompt_embeds, emb.negative_prompt_embeds) if t is not None)}
        runs: dict[str, list[dict]] = {"sr": [], "none": []}
        for b in bodies:
            for name, switch in (("sr", base.switch), ("none", "none")):
                request = base.model_copy(update={"prompt": b["prompt"], "seed": b["seed"], "switch": switch})
                result = engine.generate(request)
                runs[name].append(dict(result.timings, switch_step=result.switch_step))
    finally:
        if affinity:
            os.sched_setaffinity(0, affinity)  # Ray's processes inherit the driver's affinity
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    return {"steps": base.num_inference_steps, "size": f"{base.width}x{base.height}", "frames": base.num_frames,
            "switch": base.switch, "sketch_step_s": steps["sketch"], "render_step_s": steps["render"],
            "per_step_ratio_r": steps["sketch"] / steps["render"], "in_process": med, "handoff_state": state_bytes}


def pool_split(calibration: dict, workers: int) -> dict[str, Any]:
    """Sketch workers from the stage cost ratio: sketch seconds vs encode + render + decode seconds per request."""
    sr = calibration["in_process"]["sr"]
    sketch = sr["sketch_seconds"]
    rest = sr["encode_seconds"] + sr["render_seconds"] + sr["decode_seconds"]
    share = sketch / (sketch + rest)
    sketch_workers = min(max(round(workers * share), 1), workers - 1)
    return {"sketch_share": share, "sketch_workers": sketch_workers, "render_workers": workers - sketch_workers,
            "sketch_pool_s_per_request": sketch, "render_pool_s_per_request": rest}


# --- the three apps -------------------------------------------------------------------------------------------
def app_args(setup: str, model: Any, workers: int, split: dict, opts: argparse.Namespace, pin: bool,
             work: Path) -> dict[str, Any]:
    cores = list(range(workers))
    gpu = 0.05 if opts.device != "cpu" else 0.0  # a GPU share makes the device visible; pools are Ray resources
    stage = {"torch_threads": opts.threads, "max_batch_size": opts.max_batch_size, "num_gpus": gpu,
             "batch_wait_timeout_s": opts.batch_wait, "graceful_shutdown_timeout_s": 5.0}
    args: dict[str, Any] = {
        "model": model, "job_store_path": str(work / setup / "jobs.sqlite"),
        "artifacts_url": str(work / setup / "artifacts"), "max_pending_jobs": 1000,
        "ingress": {"max_ongoing_requests": 1000, "max_queued_requests": -1},
        "limits": {"max_steps": 1000},
    }
    if setup in ("large-only", "colocated-sr"):
        pool = "large_pool" if setup == "large-only" else "colocated_pool"
        args.update(mode="colocated", colocated=dict(
            stage, num_replicas=workers, pool=pool, pool_amount=1.0, cpu_affinity=cores if pin else None,
            force_switch="none" if setup == "large-only" else None))
        return args
    s, r = split["sketch_workers"], split["render_workers"]
    render_cores = cores[s:] if pin else None
    args.update(
        sketch=dict(stage, num_replicas=s, pool="sketch_pool", pool_amount=1.0,
                    cpu_affinity=cores[:s] if pin else None),
        render=dict(stage, num_replicas=r, pool="render_pool", pool_amount=0.5, cpu_affinity=render_cores),
        encode=dict(stage, num_replicas=1, pool="render_pool", pool_amount=0.25 / r, cpu_affinity=render_cores,
                    max_batch_size=1, max_ongoing_requests=opts.max_batch_size),
        decode=dict(stage, num_replicas=r, pool="render_pool", pool_amount=0.25, cpu_affinity=render_cores,
                    max_batch_size=1, max_ongoing_requests=opts.max_batch_size))
    return args


def pools_of(setup: str, workers: int, split: dict) -> dict[str, dict[str, Any]]:
    if setup == "disaggregated-sr":
        return {"sketch": {"stages": ["sketch"], "workers": split["sketch_workers"]},
                "render": {"stages": ["encode", "render", "decode"], "workers": split["render_workers"]}}
    return {"workers": {"stages": ["encode", "sketch", "render", "decode"], "workers": workers}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slim(row: dict[str, Any]) -> dict[str, Any]:
    job = row.get("job") or {}
    keep = ("id", "created_at", "completed_at", "status", "switch_step", "stages", "error", "attempt")
    return dict(row, job={k: job.get(k) for k in keep if k in job})


async def drain(url: str, rows: list[dict]) -> None:
    """Cancel what a phase left unfinished, so it does not load the next phase."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for row in rows:
            if row["job_id"] and row["status"] not in ("completed", "failed", "cancelled", "refused"):
                await client.delete(f"/v1/videos/{row['job_id']}")


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    import ray
    from ray import serve

    from srserve.pipeline.spec import resolve_model_spec
    from srserve.serving import build_app
    from srserve.tiny import default_model_path
    from srserve.tiny.domain import all_prompts

    started = time.monotonic()
    pin = opts.pin if opts.pin is not None else opts.device == "cpu"
    if pin and len(os.sched_getaffinity(0)) < opts.workers:
        raise SystemExit(f"--pin needs {opts.workers} cores, this process may use {len(os.sched_getaffinity(0))}")
    spec = resolve_model_spec(opts.model or default_model_path())
    if opts.device != "cpu":
        spec = spec.model_copy(update={"device": opts.device})
    prompts = all_prompts()
    random.Random(0).shuffle(prompts)
    body: dict[str, Any] = {"prompt": prompts[0], "switch": opts.switch, "seed": 1000}
    body.update({k: v for k, v in (("num_inference_steps", opts.steps), ("num_frames", opts.frames),
                                   ("size", opts.size)) if v is not None})
    first = LoadSpec("", body, 0, prompts=tuple(prompts), first_index=1000)  # the saturation phase's requests
    calibration = calibrate(spec, [first.body_for(i) for i in range(6)], opts.threads,
                            list(range(opts.workers)) if pin else None)
    split = pool_split(calibration, opts.workers)
    body.update(num_inference_steps=calibration["steps"], num_frames=calibration["frames"],
                size=calibration["size"])
    setups = [s for s in opts.setups.split(",") if s]
    levels = [float(x) for x in opts.levels.split(",") if x]
    work = Path(tempfile.mkdtemp(prefix="srserve-compare-"))
    resources = {"large_pool": opts.workers, "colocated_pool": opts.workers,
                 "sketch_pool": split["sketch_workers"], "render_pool": split["render_workers"]}
    from srserve.serving.serve_env import local_cluster_options  # the mode `srserve serve` runs

    ray.init(address="local", num_cpus=opts.workers, num_gpus=1 if opts.device != "cpu" else 0,
             resources=resources, include_dashboard=False, log_to_driver=False,
             **local_cluster_options())  # a new cluster, never another's
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    runs: list[dict[str, Any]] = []
    deploy_s: dict[str, list[float]] = {}
    unloaded: dict[str, list[float]] = {s: [] for s in setups}
    saturation: dict[str, list[float | None]] = {}
    skipped: list[str] = []
    records_path = Path(opts.records or Path(opts.out).with_name(Path(opts.out).stem + "_records.jsonl"))
    records_path.parent.mkdir(parents=True, exist_ok=True)
    records_file = records_path.open("w")
    model = spec.model_dump()
    try:
        def run_phase(setup: str, phase: str, repeat: int, spec_: LoadSpec, concurrency=None) -> dict:
            cpu_before, began = cpu_snapshot(), time.monotonic()
            rows = [dict(asdict(r), latency=r.latency, server_latency=r.server_latency)
                    for r in asyncio.run(run_load(replace(spec_, url=f"{base}/{setup}")))]
            cpu = cpu_cores(cpu_before, cpu_snapshot(), time.monotonic() - began, os.getpid())
            asyncio.run(drain(f"{base}/{setup}", rows))
            for row in rows:
                records_file.write(json.dumps(dict(slim(row), setup=setup, phase=phase, repeat=repeat)) + "\n")
            metrics = phase_metrics(rows, pools_of(setup, opts.workers, split), concurrency)
            run = {"setup": setup, "phase": phase, "repeat": repeat, "offered_rps": spec_.poisson_rate,
                   "concurrency": spec_.concurrency, "cpu_cores": cpu, **metrics}
            runs.append(run)
            lat = metrics["latency_s"]["p50"]
            print(f"[{time.monotonic() - started:6.0f}s] {setup:17s} {phase:12s} r{repeat} done "
                  f"{metrics['completed']}/{metrics['submitted']} p50 {lat if lat is None else round(lat, 3)}s "
                  f"tput {metrics.get('throughput_rps')}", flush=True)
            return run

        common = dict(time_limit_s=opts.phase_limit, poll_s=opts.poll, prompts=tuple(prompts))
        for repeat in range(opts.repeats):
            for setup in setups[repeat % len(setups):] + setups[:repeat % len(setups)]:  # rotate the order
                if time.monotonic() - started > opts.time_budget:
                    skipped.append(f"{setup}/r{repeat}")
                    continue
                began = time.monotonic()
                args = app_args(setup, model, opts.workers, split, opts, pin, work / f"r{repeat}")
                serve.run(build_app(args), name=setup, route_prefix=f"/{setup}")
                deploy_s.setdefault(setup, []).append(time.monotonic() - began)
                warm = LoadSpec(f"{base}/{setup}", body, opts.max_batch_size, concurrency=opts.max_batch_size,
                                first_index=10_000, **common)
                asyncio.run(run_load(warm))
                run = run_phase(setup, "unloaded", repeat, LoadSpec(base, body, opts.unloaded_count, concurrency=1,
                                                                    first_index=0, **common))
                unloaded[setup] += [run["latency_s"]["p50"]] if run["latency_s"]["p50"] else []
                run = run_phase(setup, "saturation", repeat,
                                LoadSpec(base, body, opts.saturation_count, concurrency=opts.concurrency,
                                         first_index=1000, **common), opts.concurrency)
                rate = run.get("throughput_rps")
                saturation.setdefault(setup, []).append(rate)
                for index, fraction in enumerate(levels):  # open loop at fractions of this saturation throughput
                    if not rate or time.monotonic() - started > opts.time_budget:
                        skipped.append(f"{setup}/load-{fraction:g}/r{repeat}")
                        continue
                    run_phase(setup, f"load-{fraction:g}", repeat,
                              LoadSpec(base, body, opts.level_count, poisson_rate=fraction * rate, seed=repeat,
                                       first_index=2000 + 1000 * index, **common))
                serve.delete(setup)  # an idle app on the same cores slows the measured one (see --help)
    finally:
        records_file.close()
        serve.shutdown()
        ray.shutdown()
    slos = add_slo_attainment(runs, unloaded)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(opts.device),
        "versions": versions(), "model": spec.name, "device": opts.device, "workers": opts.workers,
        "threads_per_replica": opts.threads, "pinned": pin, "request": body | {"prompt": "72 prompts, cycled"},
        "options": {k: v for k, v in vars(opts).items() if k not in ("out", "records")},
        "calibration": calibration, "pool_split": split, "deploy_seconds": deploy_s,
        "unloaded_p50_s": unloaded, "slo_s": slos, "saturation_rps": saturation, "skipped": skipped,
        "runs": runs, "summary": summarize(runs), "records": str(records_path),
        "wall_seconds": time.monotonic() - started,
    }
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {opts.out} ({result['wall_seconds']:.0f}s)")
    return 0


def add_slo_attainment(runs: list[dict[str, Any]], unloaded: dict[str, list[float]]) -> dict[str, Any]:
    """SLOs from the unloaded medians of the whole run, then each phase's attainment: the share of its submitted
    requests that completed within the SLO (refused, failed and unfinished ones are misses)."""
    median = {k: statistics.median(v) for k, v in unloaded.items() if v}
    common = 2 * median["large-only"] if "large-only" in median else None
    for run in runs:
        own = 2 * median[run["setup"]] if run["setup"] in median else None
        run["slo_attainment"] = {
            name: None if slo is None else sum(x <= slo for x in run["latencies"]) / max(1, run["submitted"])
            for name, slo in (("2x_large_only_unloaded", common), ("2x_own_unloaded", own))}
    return {"2x_large_only_unloaded": common, "2x_own_unloaded": {k: 2 * v for k, v in median.items()}}


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """min / median / max over repeats of the headline numbers, per setup and phase."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    keys = {"p50": ("latency_s", "p50"), "p90": ("latency_s", "p90"), "p99": ("latency_s", "p99"),
            "throughput_rps": ("throughput_rps",), "offered_rps": ("offered_rps",),
            "slo_common": ("slo_attainment", "2x_large_only_unloaded"),
            "slo_own": ("slo_attainment", "2x_own_unloaded"),
            "handoff_bytes": ("handoff", "bytes"), "handoff_s": ("handoff", "seconds"),
            "render_handoff_bytes": ("handoff", "render_bytes"), "render_handoff_s": ("handoff", "render_seconds"),
            "render_serialize_s": ("handoff", "render_serialize_s"),
            "render_transit_s": ("handoff", "render_transit_s"),
            "render_deserialize_s": ("handoff", "render_deserialize_s"),
            "render_embeddings_s": ("handoff", "render_embeddings_s"), "arrival_rps": ("arrival_rps",),
            "handoff_fraction": ("handoff_fraction_of_latency_p50",)}
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["setup"], run["phase"]), []).append(run)
    for (setup, phase), rs in groups.items():
        entry: dict[str, Any] = {}
        for name, path in keys.items():
            entry[name] = spread(dig(r, path) for r in rs)
        pools = {p for r in rs for p in (r.get("busy_fraction") or {})}
        entry["busy_fraction"] = {p: spread((r.get("busy_fraction") or {}).get(p) for r in rs) for p in sorted(pools)}
        ks = [k for r in rs for k in r.get("switch_steps", []) if k is not None]
        entry["switch_steps"] = {"mean": statistics.mean(ks), "median": statistics.median(ks)} if ks else None
        out.setdefault(setup, {})[phase] = entry
    return out


def dig(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def machine(device: str) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"node": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory, 1),
            "device": torch.cuda.get_device_name() if device != "cpu" else "cpu"}


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "ray", "srserve"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    raise SystemExit(main())
