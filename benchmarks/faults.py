"""Fault table: kill -9 replicas under a bounded load on a local server, and count what became of the jobs.

A local Ray cluster (loopback) runs the app of deployments/local.yaml (srd-tiny, CPU, simulated pools; its paths
moved to a temporary folder). Per case, a bounded open-loop load is submitted; once a job is in the case's stage
(or, for the job store and the ingress, once jobs are in flight) the case's replicas are killed with SIGKILL
(pid from the replica itself). Then the API is polled and a new job is submitted until one completes. Per case:
accepted / refused / completed / failed / cancelled / retried / resumed (retried without rerunning the sketch) /
lost (accepted, not finished by the case deadline or gone) / API seconds unanswered / seconds to recover (the
kill to the API answering again and a job submitted after the kill completing).

    python benchmarks/faults.py --cases render,ingress --jobs 4         # a smoke run
    python benchmarks/faults.py                                         # the full table (each case, then all)
Writes benchmarks/results/faults.json and faults.md (--out). Also prices a checkpoint on srd-tiny in-process.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
APP = "srserve-faults"
CASES = {"sketch": ["Sketch"], "render": ["Render"], "decode": ["Decode"], "store": ["JobStore"],
         "ingress": ["Ingress"], "all": ["Sketch", "Render", "Decode", "JobStore", "Ingress"]}
IN_STAGE = {"sketch": "sketch", "render": "render", "decode": "render"}  # kill once a job is there (decode: next)
BODY = {"prompt": "a red circle moving right", "size": "32x32", "num_frames": 9}
TERMINAL = ("completed", "failed", "cancelled")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "deployments/local.yaml"))
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--jobs", type=int, default=8, help="jobs submitted per case")
    p.add_argument("--rate", type=float, default=1.0, help="jobs per second")
    p.add_argument("--steps", type=int, default=100, help="denoising steps of each job (switch adaptive)")
    p.add_argument("--ingress-replicas", type=int, default=2)
    p.add_argument("--lease-s", type=float, default=None, help="watchdog.lease_s (default: the config's)")
    p.add_argument("--case-timeout", type=float, default=180.0, help="seconds for a case's jobs to finish")
    p.add_argument("--num-cpus", type=float, default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    p.add_argument("--no-checkpoints", action="store_true", help="watchdog.checkpoint_stages: false")
    return p.parse_args(argv)


def app_args(opts: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import yaml

    app = yaml.safe_load(Path(opts.config).read_text())["applications"][0]
    args = dict(app.get("args") or {})
    args.update(job_store_path=str(tmp / "jobs.sqlite"), artifacts_url=str(tmp / "artifacts"))
    args["ingress"] = {**args.get("ingress", {}), "num_replicas": opts.ingress_replicas}
    watchdog = dict(args.get("watchdog", {}))
    if opts.lease_s is not None:
        watchdog["lease_s"] = opts.lease_s
    watchdog["checkpoint_stages"] = not opts.no_checkpoints
    args["watchdog"] = watchdog
    return args


def start_server(args: dict[str, Any], num_cpus: float | None) -> str:
    import ray
    from ray import serve

    from srserve.serving import build_app
    from srserve.serving.runner import loopback_node, pool_resources
    from srserve.serving.serve_env import local_cluster_options  # the mode `srserve serve` runs

    resources = pool_resources({"applications": [{"import_path": "srserve.serving:build_app", "args": args}]})
    with loopback_node(True):  # the node's IP is loopback: every listener can bind it
        ray.init(address="local", num_cpus=num_cpus, resources=resources, include_dashboard=False,
                 log_to_driver=False, **local_cluster_options(loopback=True))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=APP, route_prefix="/")
    return f"http://127.0.0.1:{port}"


def replicas(deployment: str) -> list[Any]:
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))
    return [ray.get_actor(n, namespace="serve") for n in names]


def kill(deployments: list[str]) -> list[int]:
    """SIGKILL one replica process of each deployment (the pid asked of the replica itself)."""
    import ray

    pids = []
    for name in deployments:
        actor = replicas(name)[0]
        pids.append(ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=10))
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


def healthy(timeout: float = 180.0) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        deployments = serve.status().applications[APP].deployments
        if all(str(getattr(d.status, "value", d.status)) == "HEALTHY" for d in deployments.values()):
            return
        time.sleep(0.5)
    raise RuntimeError("the app did not become healthy")


class Poller(threading.Thread):
    """GET /v1/videos every 0.1 s (2 s bound); remembers when the API did not answer 200."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop, self.answers = url, threading.Event(), []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=2.0) as client:
            while not self.stop.is_set():
                began = time.time()
                try:
                    status = client.get("/v1/videos", params={"limit": 1}).status_code
                except httpx.HTTPError:
                    status = 0
                self.answers.append((began, status))
                time.sleep(0.1)

    def down_s(self, since: float) -> float:
        """From `since` to the first 200 after the last failure (0 when none failed)."""
        failures = [t for t, s in self.answers if t >= since and s != 200]
        if not failures:
            return 0.0
        after = [t for t, s in self.answers if t > failures[-1] and s == 200]
        return (after[0] if after else failures[-1]) - since


def create(client: httpx.Client, body: dict[str, Any]) -> tuple[int, str | None]:
    try:
        response = client.post("/v1/videos", json=body)
    except httpx.HTTPError:
        return 0, None
    return response.status_code, response.json()["id"] if response.status_code == 200 else None


def job(client: httpx.Client, video_id: str) -> dict[str, Any] | None:
    try:
        response = client.get(f"/v1/jobs/{video_id}")
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else {"status": "gone"} if response.status_code == 404 \
        else None


def run_case(url: str, case: str, opts: argparse.Namespace) -> dict[str, Any]:
    healthy()
    client = httpx.Client(base_url=url, timeout=10.0)
    body = {**BODY, "num_inference_steps": opts.steps}
    ids, statuses, killed_at, pids = [], [], None, []
    poller = Poller(url)
    poller.start()
    began = time.time()
    for i in range(opts.jobs):
        status, video_id = create(client, {**body, "seed": 1000 + i})
        statuses.append(status)
        if video_id:
            ids.append(video_id)
        if killed_at is None and ready_to_kill(client, case, ids, time.time() - began):
            killed_at, pids = time.time(), kill(CASES[case])
        time.sleep(1.0 / opts.rate)
    while killed_at is None and time.time() - began < 60:
        if ready_to_kill(client, case, ids, time.time() - began):
            killed_at, pids = time.time(), kill(CASES[case])
        time.sleep(0.05)
    if killed_at is None:
        killed_at, pids = time.time(), kill(CASES[case])
    recover_s = probe_recovery(client, body, killed_at, opts.case_timeout)
    records = wait_all(client, ids, killed_at + opts.case_timeout)
    poller.stop.set()
    poller.join(5)
    return summarize(case, statuses, records, poller, killed_at, recover_s, pids)


def ready_to_kill(client: httpx.Client, case: str, ids: list[str], elapsed: float) -> bool:
    """A job in the case's stage (the stage cases); jobs in flight for a while (store, ingress, all)."""
    stage = IN_STAGE.get(case)
    if stage is None:
        return len(ids) >= 2 and elapsed > 2.0
    return any((j := job(client, v)) and j.get("stage") == stage for v in ids[-3:])


def probe_recovery(client: httpx.Client, body: dict[str, Any], killed_at: float, timeout: float) -> float | None:
    """Seconds from the kill until a job submitted after it completed (None: none did in `timeout`)."""
    deadline = killed_at + timeout
    while time.time() < deadline:
        status, video_id = create(client, {**body, "seed": 7, "num_inference_steps": 10})
        if video_id is None:
            time.sleep(0.5)
            continue
        while time.time() < deadline:
            record = job(client, video_id)
            if record and record.get("status") == "completed":
                return time.time() - killed_at
            if record and record.get("status") in ("failed", "cancelled", "gone"):
                break
            time.sleep(0.2)
    return None


def wait_all(client: httpx.Client, ids: list[str], deadline: float) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    while time.time() < deadline:
        for video_id in ids:
            if records.get(video_id, {}).get("status") not in (*TERMINAL, "gone"):
                records[video_id] = job(client, video_id) or records.get(video_id, {})
        if all(r.get("status") in (*TERMINAL, "gone") for r in records.values()) and len(records) == len(ids):
            break
        time.sleep(0.5)
    return records


def summarize(case: str, statuses: list[int], records: dict[str, dict[str, Any]], poller: Poller,
              killed_at: float, recover_s: float | None, pids: list[int]) -> dict[str, Any]:
    jobs = list(records.values())
    retried = [j for j in jobs if j.get("failures", 0) >= 1]
    resumed = [j for j in retried if "sketch" in j.get("stages", {}) and
               j["stages"]["sketch"]["attempt"] < j.get("attempt", 0)]
    api = [s for t, s in poller.answers if t >= killed_at]
    return {
        "case": case, "killed": CASES[case], "pids": pids,
        "accepted": sum(s == 200 for s in statuses), "refused": sum(s != 200 for s in statuses),
        "completed": sum(j.get("status") == "completed" for j in jobs),
        "failed": sum(j.get("status") == "failed" for j in jobs),
        "cancelled": sum(j.get("status") == "cancelled" for j in jobs),
        "retried": len(retried), "resumed": len(resumed),
        "lost": sum(j.get("status") not in TERMINAL for j in jobs),
        "api_unanswered_s": round(poller.down_s(killed_at), 2),
        "api_errors": {str(s): api.count(s) for s in sorted(set(api)) if s != 200},
        "recover_s": None if recover_s is None else round(recover_s, 2),
        "failure_codes": sorted({(j.get("error") or {}).get("code") for j in jobs if j.get("status") == "failed"}),
    }


def checkpoint_cost(tmp: Path) -> dict[str, Any]:
    """What a checkpoint costs on srd-tiny at its default request, in-process: bytes, write and read seconds,
    against the stage's own seconds (one run; a rough figure, not a benchmark)."""
    import torch

    from srserve.config import GenerationRequest
    from srserve.pipeline.engine import SREngine
    from srserve.pipeline.spec import resolve_model_spec
    from srserve.serving.artifacts import ArtifactStore
    from srserve.tiny import default_model_path

    torch.set_num_threads(1)
    engine = SREngine.load(resolve_model_spec(default_model_path()))
    request = engine.resolve(GenerationRequest(prompt=BODY["prompt"], seed=0))
    state = engine.prepare(request, engine.encode(request))
    store, out = ArtifactStore(str(tmp / "cost")), {"request": request.model_dump(mode="json")}
    for role, run in (("sketch", engine.sketch), ("render", engine.render)):
        began = time.perf_counter()
        state = run(state)
        stage_s = time.perf_counter() - began
        handed = state.for_decode() if state.done else state.replace(embeddings=None)
        writes, reads = [], []
        for _ in range(3):  # the median of three (the first also makes the folder)
            began = time.perf_counter()
            size = store.put_checkpoint("job", role, handed)
            writes.append(time.perf_counter() - began)
            began = time.perf_counter()
            store.load_checkpoint("job", role)
            reads.append(time.perf_counter() - began)
        write_s, read_s = sorted(writes)[1], sorted(reads)[1]
        out[role] = {"stage_s": round(stage_s, 4), "bytes": size, "write_s": round(write_s, 5),
                     "read_s": round(read_s, 5), "write_fraction": round(write_s / stage_s, 5)}
    return out


def write_table(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "faults.json").write_text(json.dumps(result, indent=2) + "\n")
    cols = ["case", "accepted", "completed", "retried", "resumed", "failed", "lost", "api_unanswered_s",
            "recover_s", "api_errors"]
    lines = [f"# Fault table ({result['setup']})", "", "| " + " | ".join(cols) + " |",
             "|" + "---|" * len(cols)]
    for row in result["cases"]:
        lines.append("| " + " | ".join(str(row.get(c)) for c in cols) + " |")
    lines += ["", "retried: jobs with a failed attempt; resumed: retried ones whose sketch did not run again; lost: "
              "accepted, not finished by the case deadline; api_unanswered_s: from the kill to the first 200 after "
              "the last failed or unanswered (2 s) poll of GET /v1/videos; recover_s: from the kill to a job "
              "submitted after it completing.", "", "Checkpoint cost (srd-tiny, default request, in-process): "
              + json.dumps({k: v for k, v in result["checkpoint_cost"].items() if k != "request"})]
    (out / "faults.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    cases = [c for c in opts.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        print(f"faults: unknown cases {sorted(unknown)}", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    with tempfile.TemporaryDirectory(prefix="srserve-faults-") as tmp:
        args = app_args(opts, Path(tmp))
        cost = checkpoint_cost(Path(tmp))
        url = start_server(args, opts.num_cpus)
        rows = []
        try:
            for case in cases:
                rows.append(run_case(url, case, opts))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    setup = (f"{opts.jobs} jobs per case at {opts.rate}/s, {opts.steps} steps, {BODY['size']}, ingress x"
             f"{opts.ingress_replicas}, lease {args['watchdog'].get('lease_s', 'default')} s, checkpoints "
             f"{'off' if opts.no_checkpoints else 'on'}")
    write_table({"setup": setup, "args": args, "cases": rows, "checkpoint_cost": cost}, Path(opts.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
