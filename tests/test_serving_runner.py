"""`srserve serve CONFIG`: starts a local cluster with the pools, serves, prints the URL and where its metrics are
(on loopback), with `--prometheus` runs Prometheus scraping them, stops on SIGTERM."""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from srserve.serving.prom import PrometheusServer

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_main_runs_the_local_config_and_stops_on_sigterm(tmp_path):
    config = yaml.safe_load(Path("deployments/local.yaml").read_text())
    args = config["applications"][0]["args"]
    args.update(job_store_path=str(tmp_path / "jobs.sqlite"), artifacts_url=str(tmp_path / "artifacts"))
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    code = "import sys; from srserve.serving.runner import serve_main; sys.exit(serve_main(sys.argv[1:]))"
    # With the prometheus binary (Debian's package; `make setup` installs it as root), also check --prometheus.
    prom_port = free_port() if shutil.which("prometheus") else None
    extra = ["--prometheus", "--prometheus-port", str(prom_port)] if prom_port else []
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), "--host", "127.0.0.1", "--port", str(port),
                             "--num-cpus", "2", *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline, lines = time.monotonic() + 300, []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if "ready at" in line:
                break
        assert f"http://127.0.0.1:{port}/v1" in "".join(lines), lines
        metrics_line = next(line for line in lines if line.startswith("srserve: metrics"))
        assert "at http://127.0.0.1:" in metrics_line and metrics_line.rstrip().endswith("/metrics")  # loopback
        if prom_port:
            assert f"Prometheus at http://127.0.0.1:{prom_port}" in "".join(lines), lines
            prometheus = PrometheusServer({}, port=prom_port)  # a client of the one srserve started
            expected, deadline = {"Ingress", "Encode", "Sketch", "Render", "Decode", "JobStore"}, time.monotonic() + 60
            while (seen := {r["metric"]["deployment"] for r in prometheus.query(
                    'ray_serve_deployment_replica_healthy{application="srserve"} == 1')}) < expected:
                assert time.monotonic() < deadline, f"Prometheus sees healthy replicas of {seen} only"
                time.sleep(1)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            assert http.get("/healthz").json() == {"status": "ok"}
            video = http.post("/v1/videos", json={"prompt": "a red circle moving right",
                                                  "num_inference_steps": 4}).json()
            deadline = time.monotonic() + 120
            while (status := http.get(f"/v1/videos/{video['id']}").json()["status"]) not in ("completed", "failed"):
                assert time.monotonic() < deadline, "the job did not finish"
                time.sleep(0.2)
            assert status == "completed"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        assert "stopping" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_main_refuses_a_bad_config(tmp_path, capsys):
    from srserve.serving.runner import serve_main

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"applications": [{"import_path": "srserve.serving:build_app",
                                                     "args": {"sketch": {"num_replicas": 0}}}]}))
    assert serve_main([str(bad)]) == 2
    assert "num_replicas" in capsys.readouterr().err
    assert serve_main([str(tmp_path / "missing.yaml")]) == 2
