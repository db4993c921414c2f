"""Fair scheduling (issue 11, point 5): how long a default job takes while max-size jobs hold the sketch stage.

    python benchmarks/fairness.py --repeats 3 --baseline be1de64     # on an idle machine
    python benchmarks/fairness.py --quick                            # a smoke run: tiny shapes and counts

The server is `srserve serve` on `deployments/local.yaml` (srd-tiny on CPU, one replica per stage), its job
timeout raised so that neither admission nor the watchdog ends the max-size jobs mid-run. Two phases per server:
  heavy  `--heavy` max-size jobs (256x256, 65 frames, 100 steps, switch none) submitted and running, then one
         default job: its latency (goal: < 40 s; on be1de64 it had not started after 120 s).
  mixed  a bounded mixed load, `--mixed-count` jobs of which `--max-share` max-size, Poisson arrivals at
         `--rate`: mean and p99 latency of the default jobs.
A default job unfinished after `--limit-s` counts at that limit (censored: the table says how many). What is left
is deleted at the end of each phase, and a probe job must complete before the next phase starts. With
`--baseline REV` the same runs against the code of REV (a temporary git worktree first on PYTHONPATH), current
and baseline alternating every repeat. Writes `--out` (JSON) and a markdown table next to it. Loopback only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
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

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("a red circle moving right", "a blue square moving up", "a green triangle moving left",
           "a yellow circle moving down")
TERMINAL = ("completed", "failed", "cancelled")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default="be1de64", help="git revision to compare with ('' for none)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-size", default="256x256")
    p.add_argument("--max-frames", type=int, default=65)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--heavy", type=int, default=4, help="max-size jobs in flight in the heavy phase")
    p.add_argument("--mixed-count", type=int, default=20)
    p.add_argument("--max-share", type=float, default=0.2)
    p.add_argument("--rate", type=float, default=0.2, help="mixed phase arrivals per second (Poisson)")
    p.add_argument("--limit-s", type=float, default=240.0, help="a default job's latency is censored here")
    p.add_argument("--poll-s", type=float, default=0.25)
    p.add_argument("--phases", default="heavy,mixed")
    p.add_argument("--quick", action="store_true", help="smoke run: small 'max' jobs, tiny counts, one repeat")
    p.add_argument("--out", default="benchmarks/results/fairness.json")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.repeats, opts.max_size, opts.max_frames, opts.max_steps = 1, "96x96", 17, 30
        opts.heavy, opts.mixed_count, opts.rate, opts.limit_s = 2, 5, 1.0, 60.0
    return opts


def bodies(opts: argparse.Namespace) -> dict[str, dict[str, Any]]:
    return {"default": {}, "max": {"size": opts.max_size, "num_frames": opts.max_frames,
                                   "num_inference_steps": opts.max_steps, "switch": "none"}}


# --- the server ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(code: Path, workdir: Path) -> tuple[subprocess.Popen, str]:
    config = yaml.safe_load((code / "deployments" / "local.yaml").read_text())  # each version's own config
    args = config["applications"][0]["args"]
    args.update(job_store_path=str(workdir / "jobs.sqlite"), artifacts_url=str(workdir / "artifacts"),
                model=str(ROOT / "srserve" / "tiny" / "bundle" / "srd-tiny"), save_frames_npy=False)
    # Four max-size jobs are ~2,000 s of sketching on one core: neither admission's deadline check nor the
    # watchdog may end them while the default jobs are measured (keys both versions accept).
    args["watchdog"] = dict(args.get("watchdog", {}), job_timeout_s=14400.0, stage_timeout_s=3600.0)
    path = workdir / "local.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(code), RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-c", "import sys; from srserve.cli import main; sys.exit(main())", "serve", str(path),
           "--port", str(port)]
    log = open(workdir / "server.log", "wb")
    proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (workdir / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    stop_server(proc)
    raise TimeoutError("server not ready after 300 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(10)


# --- the client ------------------------------------------------------------------------------------------------
class Client:
    def __init__(self, url: str, opts: argparse.Namespace) -> None:
        self.http = httpx.AsyncClient(base_url=url, timeout=30.0)
        self.opts, self.ids, self.seed = opts, [], 0

    async def submit(self, kind: str) -> dict[str, Any]:
        self.seed += 1
        body = {"prompt": PROMPTS[self.seed % len(PROMPTS)], "seed": self.seed, **bodies(self.opts)[kind]}
        began = time.monotonic()
        response = await self.http.post("/v1/videos", json=body)
        if response.status_code != 200:
            return {"kind": kind, "status": "refused", "http": response.status_code, "error": response.text[:200]}
        self.ids.append(response.json()["id"])
        return {"kind": kind, "id": self.ids[-1], "submitted": began}

    async def status(self, job_id: str) -> str:
        return (await self.http.get(f"/v1/videos/{job_id}")).json().get("status", "?")

    async def finish(self, row: dict[str, Any], limit_s: float) -> dict[str, Any]:
        """The row with its latency (censored at `limit_s`) and final status."""
        if row.get("status") == "refused":
            return row
        while True:
            status = await self.status(row["id"])
            waited = time.monotonic() - row["submitted"]
            if status in TERMINAL or waited >= limit_s:
                return dict(row, status=status, latency_s=min(waited, limit_s), censored=status not in TERMINAL)
            await asyncio.sleep(self.opts.poll_s)

    async def clear(self) -> None:
        """Delete what is left, then wait for a probe job to complete: the stages are free again."""
        for job_id in self.ids:
            await self.http.delete(f"/v1/videos/{job_id}")
        self.ids = []
        await asyncio.sleep(3.0)
        probe = await self.submit("default")
        await self.finish(probe, 600.0)
        self.ids = []

    async def close(self) -> None:
        await self.http.aclose()


async def heavy_phase(client: Client, opts: argparse.Namespace) -> dict[str, Any]:
    heavy = [await client.submit("max") for _ in range(opts.heavy)]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # all of them running (on be1de64: in the sketch batch)
        running = [r.get("status") == "refused" or await client.status(r["id"]) == "in_progress" for r in heavy]
        if all(running):
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(5.0)  # well under way
    job = await client.finish(await client.submit("default"), opts.limit_s)
    await client.clear()
    return {"default": job, "heavy_refused": sum(r.get("status") == "refused" for r in heavy)}


async def mixed_phase(client: Client, opts: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(11)  # the same sequence for every version and repeat
    n_max = round(opts.mixed_count * opts.max_share)
    kinds = ["max"] * n_max + ["default"] * (opts.mixed_count - n_max)
    rng.shuffle(kinds)
    gaps = [rng.expovariate(opts.rate) for _ in kinds]
    waits = []
    for kind, gap in zip(kinds, gaps):
        row = await client.submit(kind)
        if kind == "default":
            waits.append(asyncio.create_task(client.finish(row, opts.limit_s)))
        await asyncio.sleep(gap)
    rows = await asyncio.gather(*waits)
    await client.clear()
    return {"defaults": rows}


def run_once(code: Path, workdir: Path, opts: argparse.Namespace) -> dict[str, Any]:
    proc, url = start_server(code, workdir)
    try:
        async def phases() -> dict[str, Any]:
            client = Client(url, opts)
            try:
                await client.clear()  # warm-up: the first forwards, the prompt cache
                out = {}
                for phase in opts.phases.split(","):
                    out[phase] = await (heavy_phase if phase == "heavy" else mixed_phase)(client, opts)
                return out
            finally:
                await client.close()

        return asyncio.run(phases())
    finally:
        stop_server(proc)


# --- results ---------------------------------------------------------------------------------------------------
def spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered) + 0.5) - 1))]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    heavy = [r["heavy"]["default"] for r in runs if "heavy" in r]
    mixed = [[d for d in r["mixed"]["defaults"] if d.get("status") != "refused"] for r in runs if "mixed" in r]
    latencies = [[d["latency_s"] for d in rows] for rows in mixed if rows]
    return {
        "heavy_default_s": spread([j["latency_s"] for j in heavy if "latency_s" in j]),
        "heavy_censored": sum(bool(j.get("censored")) for j in heavy),
        "mixed_mean_s": spread([statistics.fmean(v) for v in latencies]),
        "mixed_p99_s": spread([p99(v) for v in latencies]),
        "mixed_censored": sum(bool(d.get("censored")) for rows in mixed for d in rows),
        "refused": sum(d.get("status") == "refused" for r in runs for d in r.get("mixed", {}).get("defaults", [])),
    }


def markdown(summary: dict[str, dict[str, Any]], opts: argparse.Namespace) -> str:
    def cell(s: dict[str, float] | None) -> str:
        return "-" if s is None else f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"

    names = list(summary)
    lines = [f"Default-job latency, seconds: median (min-max) over {opts.repeats} repeats; max-size = "
             f"{opts.max_size}x{opts.max_frames}f, {opts.max_steps} steps, switch none; censored at "
             f"{opts.limit_s:.0f} s.", "", "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    rows = (("heavy: default job with %d max-size in flight" % opts.heavy, "heavy_default_s", "heavy_censored"),
            ("mixed: mean of the default jobs", "mixed_mean_s", "mixed_censored"),
            ("mixed: p99 of the default jobs", "mixed_p99_s", None))
    for label, key, censored in rows:
        cells = [cell(summary[n][key]) + (f", {summary[n][censored]} censored" if censored and summary[n][censored]
                                          else "") for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    codes = {"current": ROOT}
    with tempfile.TemporaryDirectory(prefix="srserve-fairness-") as tmp:
        if opts.baseline:
            worktree = Path(tmp) / "baseline"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), opts.baseline],
                           check=True, capture_output=True)
            codes["baseline"] = worktree
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in codes}
        try:
            for repeat in range(opts.repeats):
                order = list(codes) if repeat % 2 == 0 else list(reversed(codes))  # alternate who goes first
                for name in order:
                    workdir = Path(tmp) / f"{name}-{repeat}"
                    workdir.mkdir()
                    runs[name].append(run_once(codes[name], workdir, opts))
                    print(f"{name} repeat {repeat}: {json.dumps(summarize(runs[name][-1:]))}", flush=True)
        finally:
            if opts.baseline:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(codes["baseline"])],
                               capture_output=True)
    summary = {name: summarize(rs) for name, rs in runs.items()}
    table = markdown(summary, opts)
    print(table)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setting": vars(opts), "summary": summary, "runs": runs, "cpus": os.cpu_count(),
                               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))
    out.with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
