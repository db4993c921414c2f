"""A local srserve app under `srserve serve`, Prometheus next to it, and bounded loads that give the dashboard data.

Used by tests/test_observability_e2e.py (every panel's PromQL returns data from a real Prometheus) and by
benchmarks/observability_pictures.py (the main panels drawn from Prometheus' `query_range`). The app runs exactly
as a user starts it locally: `srserve serve CONFIG --metrics-port P` in a child process (a local Ray cluster with
the pool resources the config needs, Ray's metrics agent on loopback), so the test process needs no Ray.

Everything is loopback-only and bounded in time. `LocalApp.kill_replica` SIGKILLs a Serve replica process among
the child's own descendants (a replica loss the driver must retry), never any other process.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = ("completed", "failed", "cancelled")
PROMPTS = ("a red circle moving right", "a blue square moving left", "a green triangle moving up")
SMALL = {"size": "32x32", "num_frames": 9}  # srd-tiny at a shape whose steps take milliseconds on CPU
DASHBOARD = ROOT / "deployments" / "monitoring" / "srserve-grafana-dashboard.json"
# Series only a GPU produces: NVML readings (srserve's sampler) and Ray's own per-node GPU gauge. On CPU the
# panels that query them have no data; the GPU check (benchmarks/gpu/observability.py) evaluates them.
GPU_SERIES = ("ray_srserve_gpu_utilization_percent", "ray_srserve_gpu_memory_used_bytes",
              "ray_srserve_gpu_memory_total_bytes", "ray_srserve_gpu_power_watts",
              "ray_srserve_gpu_temperature_celsius", "ray_node_gpus_utilization")


def needs_gpu(expr: str) -> bool:
    return any(series in expr for series in GPU_SERIES)


def panel_queries(variables: dict[str, str], path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(panel title, PromQL with the dashboard's variables filled in) for every target of the dashboard."""
    top = json.loads(path.read_text())["panels"]
    out = []
    for panel in (child for p in top for child in [p, *p.get("panels", [])]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in variables.items():
                expr = expr.replace(name, value)
            out.append((panel["title"], expr))
    return out


def free_port() -> int:
    from srserve.serving.prom import free_port as port

    return port()


def app_config(work: Path, app: str = "srserve", max_pending_jobs: int = 4,
               render_autoscaling: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Serve config (the `srserve serve CONFIG` format) for srd-tiny on CPU with the local pools: sketch on
    `sketch_pool`, encode/render/decode on `render_pool`, render autoscaled (1..2 replicas), so Serve's autoscaling
    series exist. At render's max_replicas the app needs sketch_pool 1 and render_pool 0.25 + 2 x 0.5 + 0.25 = 1.5,
    i.e. 2 units: `srserve serve` gives the local cluster what `AppArgs.resources_needed()` says."""
    fast = {"graceful_shutdown_timeout_s": 5, "health_check_period_s": 2}
    autoscaling = render_autoscaling or {
        "min_replicas": 1, "max_replicas": 2, "initial_replicas": 1, "target_ongoing_requests": 8,
        "upscale_delay_s": 5, "downscale_delay_s": 60, "metrics_interval_s": 1, "look_back_period_s": 5}
    args = {
        "model": None,
        "job_store_path": str(work / "jobs.sqlite"), "artifacts_url": str(work / "artifacts"),
        "encode": dict(fast), "decode": dict(fast),
        "sketch": dict(fast, max_batch_size=2, progress_interval_s=0.2),
        "render": dict(fast, max_batch_size=2, progress_interval_s=0.2, autoscaling_config=autoscaling),
        "limits": {"max_steps": 400, "max_width": 64, "max_height": 64, "max_frames": 33, "max_prompt_chars": 200},
        "max_pending_jobs": max_pending_jobs, "retry_after_s": 1, "max_retries": 2,
        "watchdog": {"interval_s": 0.5, "lease_s": 3.0, "stage_timeout_s": 120.0, "cancel_grace_s": 2.0},
        # The SLO controller on, so its gauges (the dashboard's "SLO controller" panels) have data; a 60 s target
        # that srd-tiny's jobs never threaten, so no job is capped. A tick every 3 s: the projected p95 (NaN after a
        # tick without creates) stays up for several scrapes.
        "slo": {"p95_target_s": 60.0, "floor_steps": 10, "min_samples": 2, "interval_s": 3.0, "tick_s": 3.0},
    }
    return {"proxy_location": "HeadOnly",
            "applications": [{"name": app, "route_prefix": "/", "import_path": "srserve.serving:build_app",
                              "args": args}]}


class LocalApp:
    """`srserve serve CONFIG` in a child process: `start()` waits for its "ready" line and reads the metrics
    endpoints it prints (`metrics`: host:port list); `stop()` sends SIGTERM (its clean stop) and waits."""

    def __init__(self, config: dict[str, Any], workdir: Path, metrics_report_ms: int = 1000,
                 extra_args: list[str] = ()) -> None:
        self.config, self.workdir = config, Path(workdir)
        self.app = config["applications"][0]["name"]
        self.port, self.metrics_port = free_port(), free_port()
        self.metrics_report_ms, self.extra_args = metrics_report_ms, list(extra_args)
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.metrics: list[str] = []
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 240.0) -> "LocalApp":
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "serve.yaml"
        path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        cmd = [sys.executable, "-m", "srserve.cli", "serve", str(path), "--port", str(self.port),
               "--metrics-port", str(self.metrics_port), *self.extra_args]
        # Ray reads RAY_<system config name> from the environment: srserve's series reach the agent every second.
        env = {**os.environ, "RAY_metrics_report_interval_ms": str(self.metrics_report_ms),
               "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     text=True, env=env, cwd=self.workdir, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(timeout_s) or self.proc.poll() is not None:
            tail = "\n".join(self.lines[-30:])
            self.stop()
            raise RuntimeError(f"srserve serve not ready after {timeout_s:g}s:\n{tail}")
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if line.startswith("srserve: metrics"):
                self.metrics = re.findall(r"http://([^/\s,]+)/metrics", line)
            if line.startswith(f"srserve: {self.app} ready at "):
                self._ready.set()

    def descendants(self) -> list[int]:
        """Pids of the child's process tree (Ray's raylet, workers and replicas)."""
        if self.proc is None:
            return []
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry.name))
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            for child in children.get(pid, []):
                out.append(child)
                todo.append(child)
        return out

    def replica_pids(self, deployment: str) -> list[int]:
        """Pids of this app's replica processes of `deployment` (Ray titles them ray::ServeReplica:APP:NAME)."""
        title = f"ServeReplica:{self.app}:{deployment}"
        pids = []
        for pid in self.descendants():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if title in cmdline:
                pids.append(pid)
        return pids

    def kill_replica(self, deployment: str) -> list[int]:
        pids = self.replica_pids(deployment)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the child and what it started
            self.proc.wait()

    def __enter__(self) -> "LocalApp":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Client:
    """The /v1/videos API over httpx, with the waits the loads need."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=30)

    def post(self, **body: Any) -> httpx.Response:
        return self.http.post("/v1/videos", json={**SMALL, **body})

    def create(self, **body: Any) -> str:
        response = self.post(**body)
        response.raise_for_status()
        return response.json()["id"]

    def job(self, video_id: str) -> dict[str, Any]:
        return self.http.get(f"/v1/jobs/{video_id}").json()

    def delete(self, video_id: str) -> None:
        self.http.delete(f"/v1/videos/{video_id}")

    def wait(self, predicate: Callable[[], Any], timeout_s: float, what: str, every: float = 0.2) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(every)
        raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what}")

    def finished(self, video_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
        return self.wait(lambda: (j := self.job(video_id))["status"] in TERMINAL and j, timeout_s,
                         f"job {video_id} to end")

    def sketching(self, video_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
        return self.wait(lambda: (j := self.job(video_id))["stage"] == "sketch" and j["step"] >= 2 and j,
                         timeout_s, f"job {video_id} to sketch")


def mixed_load(app: LocalApp, max_pending_jobs: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """A few jobs covering what the panels show: completions under four switch policies (a repeated prompt hits
    Encode's cache; two same-shape jobs share a batch), refusals (422 invalid, 429 queue_full), one retry (the
    Sketch replica killed mid-job), then cancellations (DELETE while sketching: the replica that replaced the
    killed one raises them, so Serve's error counter lives on). Returns what happened."""
    client, out = Client(app.url), {"completed": [], "refused": {}, "cancelled": [], "retried": None}
    ids = [client.create(prompt=PROMPTS[0], seed=1, num_inference_steps=12, switch="adaptive"),
           client.create(prompt=PROMPTS[0], seed=2, num_inference_steps=12, switch="step:6"),
           client.create(prompt=PROMPTS[1], seed=3, num_inference_steps=8, switch="small-only"),
           client.create(prompt=PROMPTS[0], seed=4, num_inference_steps=8, switch="none")]
    out["completed"] = [client.finished(i)["status"] for i in ids]
    log(f"completions: {out['completed']}")
    out["refused"]["invalid"] = [client.post(prompt=PROMPTS[0], size="33x33").status_code,
                                 client.http.post("/v1/videos", json={"prompt": ""}).status_code]
    victim = client.create(prompt=PROMPTS[1], seed=20, num_inference_steps=300, switch="none")
    client.sketching(victim)
    killed = app.kill_replica("Sketch")
    job = client.finished(victim, timeout_s=150)
    out["retried"] = {"killed": killed, "status": job["status"], "failures": job["failures"],
                      "history": job["history"]}
    log(f"retry: {out['retried']}")
    long = [client.create(prompt=PROMPTS[2], seed=10 + i, num_inference_steps=400, switch="none")
            for i in range(max_pending_jobs)]
    out["refused"]["queue_full"] = client.post(prompt=PROMPTS[2]).status_code
    client.sketching(long[0])
    for video_id in long:
        client.delete(video_id)
    out["cancelled"] = [client.wait(lambda v=v: (j := client.job(v))["status"] in TERMINAL and j["status"], 60,
                                    "cancellation") for v in long]
    log(f"refused: {out['refused']}, cancelled: {out['cancelled']}")
    return out


def steady_load(app: LocalApp, seconds: float, rate: float, log: Callable[[str], None] = print,
                seed: int = 0) -> dict[str, int]:
    """Open-loop arrivals at `rate` jobs/s for `seconds` (mixed prompts, sizes and policies, some invalid, some
    cancelled), then waits for what is in flight. Returns counts by outcome."""
    import random

    rng, client = random.Random(seed), Client(app.url)
    counts: dict[str, int] = {}
    live: list[tuple[str, float | None]] = []  # (id, cancel at)
    policies = ("adaptive", "adaptive", "step:8", "ratio:0.5", "small-only", "none")
    end = time.monotonic() + seconds
    next_at = time.monotonic()

    def bump(key: str) -> None:
        counts[key] = counts.get(key, 0) + 1

    while time.monotonic() < end or live:
        now = time.monotonic()
        if now < end and now >= next_at:
            next_at = now + rng.expovariate(rate)
            if rng.random() < 0.06:
                bump(f"http_{client.post(prompt='', size='33x33').status_code}")
            else:
                body = {"prompt": rng.choice(PROMPTS), "seed": rng.randrange(1000), "switch": rng.choice(policies),
                        "num_inference_steps": rng.choice((12, 16, 24)),
                        "size": rng.choice(("32x32", "32x32", "64x32"))}
                response = client.post(**body)
                if response.status_code == 200:
                    cancel_at = now + rng.uniform(0.5, 2.0) if rng.random() < 0.08 else None
                    live.append((response.json()["id"], cancel_at))
                else:
                    bump(f"http_{response.status_code}")
        still = []
        for video_id, cancel_at in live:
            if cancel_at is not None and time.monotonic() >= cancel_at:
                client.delete(video_id)
                cancel_at = None
            status = client.job(video_id)["status"]
            if status in TERMINAL:
                bump(status)
            else:
                still.append((video_id, cancel_at))
        live = still
        time.sleep(0.25)
    log(f"steady load: {counts}")
    return counts
