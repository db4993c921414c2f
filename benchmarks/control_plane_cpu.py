"""Control-plane CPU per request: what the JobStore and Ingress replicas spend on each video job.

The setting of issue 14: `deployments/local.yaml` (srd-tiny on CPU, one replica per stage), N default requests
sent C at a time, each client polling its job once a second. CPU seconds are read from /proc (utime + stime) of
every process before and after the load; the JobStore and Ingress replicas' share is divided by the requests
(*raw*). Every Ray Serve replica also burns CPU when idle (Ray's core worker, Serve's metrics and health loops:
~10-20 ms per second per replica here), whatever srserve does; that floor is measured on the same server for
`--idle-s` seconds before the load, and *marginal* = raw minus floor x load duration / requests, the CPU the
requests themselves cost. Both are reported.

With `--baseline REF`, the same load also runs against the code of git commit REF (checked out into a temporary
worktree and put first on PYTHONPATH, so the server and its Ray workers import it), alternating current and
baseline for each repeat, so the two figures come from one run on the same machine.

    python benchmarks/control_plane_cpu.py --repeats 3 --baseline 8b74458 --out benchmarks/results/control_plane_cpu.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_metrics import cpu_cores, cpu_role, cpu_snapshot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("a red circle moving right", "a blue square moving up", "a green triangle moving left",
           "a yellow circle moving down")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_job(client: httpx.AsyncClient, url: str, body: dict[str, Any], poll_s: float) -> dict[str, Any]:
    created = (await client.post(f"{url}/v1/videos", json=body)).json()
    while True:
        await asyncio.sleep(poll_s)
        video = (await client.get(f"{url}/v1/videos/{created['id']}")).json()
        if video["status"] in ("completed", "failed"):
            return video


async def load(url: str, count: int, concurrency: int, poll_s: float) -> list[dict[str, Any]]:
    queue = list(range(count))
    results: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=60.0) as client:
        async def worker() -> None:
            while queue:
                i = queue.pop(0)
                results.append(await one_job(client, url, {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i}, poll_s))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError("server not ready")


PROFILED = ("replica Ingress", "replica JobStore")


def start_profilers(out: Path) -> list[subprocess.Popen]:
    """py-spy on the Ingress and JobStore replicas: collapsed stacks of the thread holding the GIL (Python CPU),
    one file each. py-spy's sampling slows them: a profiled run's CPU figures are not clean."""
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for pid, (command_line, _) in cpu_snapshot().items():
        role = cpu_role(command_line, pid, os.getpid())
        if role in PROFILED:
            spy = ["py-spy", "record", "--gil", "--pid", str(pid), "--format", "raw", "--rate", "200",
                   "--output", str(out / f"{role.split()[-1]}.txt")]
            procs.append(subprocess.Popen(spy, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1.0)  # attached before the load starts
    return procs


def stop_profilers(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    for proc in procs:
        proc.wait(60)


def run_once(code: Path, workdir: Path, opts: argparse.Namespace) -> dict[str, Any]:
    """Start `srserve serve` on the local config with the code at `code`, run the load, return CPU per request."""
    port = free_port()
    # Each code's own local config: an older AppArgs refuses fields added since.
    config = yaml.safe_load((code / "deployments" / "local.yaml").read_text())
    args = config["applications"][0]["args"]
    args["job_store_path"] = str(workdir / "jobs.sqlite")
    args["artifacts_url"] = str(workdir / "artifacts")
    args["model"] = str(ROOT / "srserve" / "tiny" / "bundle" / "srd-tiny")
    config_path = workdir / "local.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONPATH=str(code), RAY_USAGE_STATS_ENABLED="0")
    cmd = [sys.executable, "-c", "import sys; from srserve.cli import main; sys.exit(main())",
           "serve", str(config_path), "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        asyncio.run(load(url, 2, 2, opts.poll_s))  # warm up (first forward passes, caches)
        time.sleep(2.0)
        idle_before, idle_began = cpu_snapshot(), time.monotonic()
        time.sleep(opts.idle_s)
        idle = cpu_cores(idle_before, cpu_snapshot(), time.monotonic() - idle_began, os.getpid())
        profilers = start_profilers(Path(opts.profile) / workdir.name) if opts.profile else []
        before, began = cpu_snapshot(), time.monotonic()
        results = asyncio.run(load(url, opts.requests, opts.concurrency, opts.poll_s))
        seconds = time.monotonic() - began
        after = cpu_snapshot()
        stop_profilers(profilers)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
    cores = cpu_cores(before, after, seconds, os.getpid())
    per_request_ms = {role: 1000 * c * seconds / opts.requests for role, c in cores.items()}
    floor_ms = {role: 1000 * idle.get(role, 0.0) * seconds / opts.requests for role in per_request_ms}
    out = {"completed": sum(r["status"] == "completed" for r in results), "seconds": seconds,
           "per_request_ms": per_request_ms, "idle_ms_per_s": {r: 1000 * c for r, c in idle.items()}}
    for key, role in (("jobstore", "replica JobStore"), ("ingress", "replica Ingress")):
        out[f"{key}_ms"] = per_request_ms.get(role, 0.0)
        out[f"{key}_marginal_ms"] = per_request_ms.get(role, 0.0) - floor_ms.get(role, 0.0)
    out["control_plane_ms"] = out["jobstore_ms"] + out["ingress_ms"]
    out["control_plane_marginal_ms"] = out["jobstore_marginal_ms"] + out["ingress_marginal_ms"]
    return out


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--poll-s", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--idle-s", type=float, default=10.0, help="seconds of idle floor measured before the load")
    parser.add_argument("--baseline", default=None, help="git commit to measure alongside (e.g. 8b74458)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", default=None, help="directory: py-spy the Ingress and JobStore replicas during "
                        "the load (collapsed stacks; py-spy on PATH); the CPU figures of such a run are not clean")
    opts = parser.parse_args(argv)
    codes = {"current": ROOT}
    with tempfile.TemporaryDirectory(prefix="srserve-cpcpu-") as tmp:
        if opts.baseline:
            worktree = Path(tmp) / "baseline"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), opts.baseline],
                           check=True, capture_output=True)
            codes["baseline"] = worktree
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in codes}
        try:
            for repeat in range(opts.repeats):
                for name, code in codes.items():
                    workdir = Path(tmp) / f"{name}-{repeat}"
                    workdir.mkdir()
                    result = run_once(code, workdir, opts)
                    runs[name].append(result)
                    print(f"{name} repeat {repeat}: JobStore {result['jobstore_ms']:.1f} ms + Ingress "
                          f"{result['ingress_ms']:.1f} ms per request raw, {result['control_plane_marginal_ms']:.1f} "
                          f"ms marginal ({result['completed']}/{opts.requests} completed in "
                          f"{result['seconds']:.1f} s)", flush=True)
        finally:
            if opts.baseline:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(codes["baseline"])],
                               capture_output=True)
    keys = ("jobstore_ms", "ingress_ms", "control_plane_ms", "jobstore_marginal_ms", "ingress_marginal_ms",
            "control_plane_marginal_ms")
    summary = {name: {key: spread([r[key] for r in rs]) for key in keys} for name, rs in runs.items()}
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip()
    out = {"setting": {**vars(opts), "commit": commit or None}, "summary": summary, "runs": runs,
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "cpus": os.cpu_count()}
    print(json.dumps(summary, indent=1))
    if opts.out:
        Path(opts.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
