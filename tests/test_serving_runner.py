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


def listening_addresses(root_pid: int) -> dict[str, set[str]]:
    """Local addresses (hex, as /proc writes them) of the TCP sockets listening in `root_pid` and its descendants,
    each with the names of the processes that hold one (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    pids, todo = set(), [root_pid]
    while todo:
        pid = todo.pop()
        pids.add(pid)
        todo.extend(children.get(pid, []))
    inodes: dict[str, str] = {}
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = fd.readlink().as_posix()
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[target[8:-1]] = name
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                found.setdefault(cols[1], set()).add(inodes[cols[9]])
    return found


def is_loopback(hex_address: str) -> bool:
    host = hex_address.split(":")[0]
    if len(host) == 8:  # IPv4, little-endian: 127.x.x.x
        return host.endswith("7F")
    # IPv6 ::1, or an IPv4-mapped ::ffff:127.x.x.x
    return host == "00000000000000000000000001000000" or (host[:24] == "0000000000000000FFFF0000"
                                                           and host[24:].endswith("7F"))


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
        # Issue 11 point 9: Ray (GCS, raylet, workers, replicas' gRPC) and its metrics listen on loopback only.
        listening = listening_addresses(proc.pid)
        assert len(listening) > 5 and all(is_loopback(a) for a in listening), sorted(listening)
        # Serve's throughput mode (srserve/serving/serve_env.py): HAProxy, not a Python proxy, holds the HTTP port.
        holders = set().union(*(names for address, names in listening.items() if address.endswith(f":{port:04X}")))
        assert holders == {"haproxy"}, listening
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


def test_serve_main_refuses_an_open_server_on_a_public_host(tmp_path, capsys):
    from srserve.serving.runner import serve_main

    config = tmp_path / "open.yaml"
    app = {"name": "srserve", "import_path": "srserve.serving:build_app", "args": {}}
    config.write_text(yaml.safe_dump({"applications": [app]}))
    assert serve_main([str(config), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "without API keys" in err and "open_access: true" in err and "api_keys_file" in err


def test_serve_main_refuses_a_missing_or_malformed_keys_file(tmp_path, capsys):
    from srserve.serving.runner import serve_main

    keys = tmp_path / "keys"
    app = {"name": "srserve", "import_path": "srserve.serving:build_app", "args": {"auth": {"api_keys_file": str(keys)}}}
    config = tmp_path / "keyed.yaml"
    config.write_text(yaml.safe_dump({"applications": [app]}))
    assert serve_main([str(config)]) == 2
    assert "auth.api_keys_file: cannot read the keys file" in capsys.readouterr().err
    keys.write_text("alice:sk-one\nalice:sk-two\n")  # a duplicate name, on line 2
    assert serve_main([str(config)]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "sk-two" not in err and "sk-one" not in err
