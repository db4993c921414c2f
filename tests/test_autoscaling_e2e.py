"""On real compute (issue 13 point 8): `srserve serve` with srd-tiny on local pools and the application-level
stage-ratio policy takes the sketch stage from 1 to 2 replicas under a bounded load step, and back to 1 once the
load is gone. Bounded: at most ~40 jobs of 12 steps, every wait has a deadline, the server is stopped at the end."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from test_serving_runner import free_port

ROOT = Path(__file__).resolve().parents[1]


def sketch_replicas(server_pid: int) -> int:
    """Live Sketch replica processes under the server's process (Ray names each replica's process after it)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,stat=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 3) for line in out.splitlines() if len(line.split(None, 3)) == 4]
    parent = {int(pid): int(ppid) for pid, ppid, _, _ in rows}

    def under_server(pid: int) -> bool:
        while pid > 1:
            if pid == server_pid:
                return True
            pid = parent.get(pid, 1)
        return False

    return sum(1 for pid, _, stat, args in rows if "ray::ServeReplica:srserve:Sketch" in args
               and stat[0] not in "ZX" and under_server(int(pid)))


def config(tmp_path: Path) -> Path:
    data = yaml.safe_load((ROOT / "deployments" / "local.yaml").read_text())
    app = data["applications"][0]
    app["autoscaling_policy"] = {
        "policy_function": "srserve.control.autoscale:StageRatioPolicy",
        # quick on purpose: a test's load step lasts seconds, not the minutes a GPU deployment waits
        "policy_kwargs": {"concurrency": {"sketch": 4}, "upscale_delay_s": 1.0, "downscale_delay_s": 4.0,
                          "cooldown_s": 1.0, "drain_horizon_s": 5.0}}
    args = app["args"]
    args["sketch"].pop("num_replicas", None)
    args["sketch"]["autoscaling_config"] = {
        "min_replicas": 1, "initial_replicas": 1, "max_replicas": 2, "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0, "metrics_interval_s": 0.5, "look_back_period_s": 2.0}
    args.update(job_store_path=str(tmp_path / "jobs.sqlite"), artifacts_url=str(tmp_path / "artifacts"),
                save_frames_npy=False, max_pending_jobs=64)
    path = tmp_path / "autoscale.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.skipif(shutil.which("ps") is None, reason="needs ps to count replica processes")
def test_the_policy_adds_a_sketch_replica_under_load_and_removes_it_after(tmp_path):
    port = free_port()
    code = "import sys; from srserve.serving.runner import serve_main; sys.exit(serve_main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, str(config(tmp_path)), "--port", str(port),
                             "--num-cpus", "2"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while "ready at" not in (line := proc.stdout.readline()):
            assert line or proc.poll() is None, "srserve serve exited before it was ready"
            assert time.monotonic() < deadline, "not ready in 300 s"
        assert sketch_replicas(proc.pid) == 1
        body = {"prompt": "a red circle moving right", "num_inference_steps": 12, "switch": "step:10"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            jobs, most, deadline = [], 1, time.monotonic() + 120
            while most < 2 and time.monotonic() < deadline and len(jobs) < 40:  # the load step
                unfinished = [j for j in jobs if http.get(f"/v1/videos/{j}").json()["status"]
                              in ("queued", "in_progress")]
                for _ in range(max(0, 12 - len(unfinished))):
                    jobs.append(http.post("/v1/videos", json=body).json()["id"])
                most = max(most, sketch_replicas(proc.pid))
                time.sleep(0.5)
            assert most == 2, f"the sketch stage did not grow under {len(jobs)} jobs"
            deadline = time.monotonic() + 180
            statuses = {}
            while len(statuses) < len(jobs):  # the load ends: every job finishes
                assert time.monotonic() < deadline, f"jobs left: {len(jobs) - len(statuses)}"
                for j in jobs:
                    if j not in statuses and (s := http.get(f"/v1/videos/{j}").json()["status"]) in (
                            "completed", "failed"):
                        statuses[j] = s
                time.sleep(0.5)
            assert set(statuses.values()) == {"completed"}
        deadline = time.monotonic() + 90
        while sketch_replicas(proc.pid) > 1:
            assert time.monotonic() < deadline, "the sketch stage did not shrink back to 1 replica"
            time.sleep(0.5)
        time.sleep(3)  # and stays there: min_replicas
        assert sketch_replicas(proc.pid) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
