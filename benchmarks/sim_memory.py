"""Memory of simulated replicas (issue 13 point 1: "a simulated replica costs at most ~250 MB RSS").

Deploys deployments/sim-wan2.1-h100.yaml as `srserve serve` does, with fixed pools (2 sketch, 1 render, 1
decode), and samples every Serve replica process (its title names the deployment) from /proc: RSS, PSS (shared
pages split among the processes that map them) and anonymous memory (what the process alone holds), idle after
the deploy, then under a bounded closed loop of requests. Also reports whether the replicas imported torch.

    python benchmarks/sim_memory.py        (~2 min here; writes benchmarks/results/sim_memory.json and .md)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import LoadSpec, run_load  # noqa: E402
from serving_compare import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENTS = ("Ingress", "JobStore", "Encode", "Sketch", "Render", "Decode")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--time-factor", type=float, default=0.01, help="the config's own")
    p.add_argument("--out", default="benchmarks/results/sim_memory.json")
    return p.parse_args(argv)


def replica_processes() -> dict[int, str]:
    """pid -> deployment name of every Serve replica process on this machine (title ray::ServeReplica:APP:NAME)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if title.startswith("ray::ServeReplica:"):
            out[int(pid)] = title.split(":")[-1]
    return out


def memory_mb(pid: int) -> dict[str, float] | None:
    """RSS, PSS and anonymous MB of one process (smaps_rollup), None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    fields = {line.split(":")[0]: float(line.split()[1]) / 1024 for line in text.splitlines()[1:] if ":" in line}
    return {"rss": fields.get("Rss", 0.0), "pss": fields.get("Pss", 0.0), "anon": fields.get("Anonymous", 0.0)}


def sample(into: dict[str, dict[int, dict[str, float]]], phase: str) -> None:
    """Keep each replica's largest figures seen in `phase`."""
    seen = into.setdefault(phase, {})
    for pid, name in replica_processes().items():
        now = memory_mb(pid)
        if now is None:
            continue
        best = seen.setdefault(pid, {"deployment": name, "rss": 0.0, "pss": 0.0, "anon": 0.0})
        for k in ("rss", "pss", "anon"):
            best[k] = max(best[k], now[k])


def app_config(model: str, work: Path, time_factor: float) -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "deployments" / "sim-wan2.1-h100.yaml").read_text())
    app = data["applications"][0]
    app.pop("autoscaling_policy")
    args = app["args"]
    for stage, count in (("sketch", 2), ("render", 1), ("decode", 1)):
        args[stage].pop("autoscaling_config")
        args[stage]["num_replicas"] = count
    args.update(model=model, job_store_path=str(work / "jobs.sqlite"), artifacts_url=str(work / "artifacts"))
    return data


def summarise(phases: dict[str, dict[int, dict[str, float]]]) -> list[dict[str, Any]]:
    rows = []
    for name in DEPLOYMENTS:
        row: dict[str, Any] = {"deployment": name}
        for phase, procs in phases.items():
            mine = [p for p in procs.values() if p["deployment"] == name]
            if mine:
                row[phase] = {k: round(max(p[k] for p in mine), 1) for k in ("rss", "pss", "anon")}
        rows.append(row)
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = [f"`benchmarks/sim_memory.py` ({result['date']}, {result['machine']}): deployments/sim-wan2.1-h100.yaml "
             f"with fixed pools (2 sketch, 1 render, 1 decode), time factor {result['time_factor']}, "
             f"{result['requests']} requests {result['concurrency']} at a time. Largest figure per deployment, MB "
             "(RSS / PSS / anonymous, from /proc/PID/smaps_rollup). Replicas that imported torch: "
             f"{result['torch_imported'] or 'none'}.", "",
             "| deployment | idle RSS | idle PSS | idle anon | loaded RSS | loaded PSS | loaded anon |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        idle, loaded = row.get("idle", {}), row.get("loaded", {})
        lines.append(f"| {row['deployment']} | " + " | ".join(str(d.get(k, "-")) for d in (idle, loaded)
                                                              for k in ("rss", "pss", "anon")) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import platform

    import ray
    from ray import serve

    from srserve.serving.runner import deploy
    from srserve.sim.spec import SimSpec, write_sim_checkpoint

    opts = parse_args(argv)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = str(write_sim_checkpoint(work / "model", SimSpec(time_factor=opts.time_factor)))
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 resources={"sketch_pool": 8, "render_pool": 8})
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            deploy(app_config(model, work, opts.time_factor), "127.0.0.1", port, threading.Event(), timeout_s=300)
            phases: dict[str, dict[int, dict[str, float]]] = {}
            time.sleep(3.0)
            sample(phases, "idle")
            stop = threading.Event()

            def sampler() -> None:
                while not stop.wait(0.5):
                    sample(phases, "loaded")

            thread = threading.Thread(target=sampler, daemon=True)
            thread.start()
            spec = LoadSpec(f"http://127.0.0.1:{port}", {"prompt": "a red circle moving right", "seed": 0},
                            count=opts.requests, concurrency=opts.concurrency, poll_s=1.0, time_limit_s=600)
            records = asyncio.run(run_load(spec))
            stop.set()
            thread.join()
            handles = {name: serve.get_deployment_handle(name, "srserve") for name in ("Encode", "Sketch", "Render",
                                                                                       "Decode")}
            torch_in = sorted(n for n, h in handles.items() if h.has_imported.remote("torch").result())
        finally:
            serve.shutdown()
            ray.shutdown()
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "time_factor": opts.time_factor, "requests": opts.requests, "concurrency": opts.concurrency,
              "completed": sum(r.status == "completed" for r in records), "torch_imported": torch_in,
              "rows": summarise(phases)}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=1) + "\n")
    Path(opts.out).with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0 if result["completed"] == opts.requests else 1


if __name__ == "__main__":
    raise SystemExit(main())
