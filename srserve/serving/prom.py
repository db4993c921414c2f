"""Prometheus pieces outside Ray's metrics agent.

- `serve_metrics(port)`: `srserve generate --metrics-port` serves this process's srserve metrics with
  prometheus-client (no Ray, so no metrics agent to export them).
- `parse_exposition(text)`: the samples of a /metrics page, via prometheus-client's parser (tests).
- `PrometheusServer`: a real Prometheus (the `prometheus` binary, Debian's package) on loopback, in its own
  directory, with a scrape config for Ray's metrics agents; `query(expr)` goes through its HTTP API. Used by
  `srserve serve --prometheus` and by the tests.
"""
from __future__ import annotations

import ctypes
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MISSING_PROMETHEUS = ("the `prometheus` binary is not on PATH: install Debian's `prometheus` package "
                      "(apt-get install --no-install-recommends prometheus; `make setup` does it as root) or a "
                      "release from https://prometheus.io/download/")


def serve_metrics(port: int, host: str = "127.0.0.1", gpu_pool: str | None = "local") -> str:
    """Serve this process's srserve metrics (prometheus backend) at http://host:port/metrics, and sample its GPUs
    under `gpu_pool` (None: no sampler); returns the URL. The server is a daemon thread: it ends with the process."""
    from prometheus_client import start_http_server

    from srserve.serving import metrics
    from srserve.serving.gpu import start_gpu_sampler

    metrics.configure("prometheus")
    start_http_server(port, addr=host, registry=metrics.registry())
    if gpu_pool is not None:
        start_gpu_sampler(gpu_pool)
    return f"http://{host}:{port}/metrics"


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_exposition(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition (names as stored: _total, _bucket, ...)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [Sample(s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(text) for s in family.samples]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def scrape_config(targets: list[str] | None = None, sd_files: list[str] | None = None,
                  interval_s: float = 5.0) -> dict[str, Any]:
    """A Prometheus config with one `ray` job: static `host:port` targets and/or Ray's service-discovery files
    (/tmp/ray/prom_metrics_service_discovery.json, written when Ray's dashboard runs)."""
    job: dict[str, Any] = {"job_name": "ray", "scrape_interval": f"{interval_s:g}s",
                           "scrape_timeout": f"{min(interval_s, 10.0):g}s"}
    if targets:
        job["static_configs"] = [{"targets": list(targets)}]
    if sd_files:
        job["file_sd_configs"] = [{"files": list(sd_files), "refresh_interval": f"{interval_s:g}s"}]
    return {"global": {"scrape_interval": f"{interval_s:g}s", "evaluation_interval": f"{interval_s:g}s"},
            "scrape_configs": [job]}


class PrometheusError(RuntimeError):
    pass


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies, so a killed `srserve serve` leaves no Prometheus.
    (prctl is looked up beforehand: the child of a threaded parent should do as little as possible.)"""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class PrometheusServer:
    """`with PrometheusServer(config) as prom: prom.query("up")`. Listens on host:port (a free port by default);
    keeps its TSDB under `workdir` (a temporary directory, removed at stop, by default)."""

    def __init__(self, config: dict[str, Any], host: str = "127.0.0.1", port: int | None = None,
                 workdir: str | Path | None = None, binary: str | None = None) -> None:
        self.binary = binary or shutil.which("prometheus")
        if not self.binary:
            raise PrometheusError(MISSING_PROMETHEUS)
        self.config, self.host, self.port = config, host, port or free_port(host)
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="srserve-prometheus-")
        self.workdir = Path(workdir or self._tmp.name)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> PrometheusServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config, sort_keys=False))
        log = (self.workdir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address={self.host}:{self.port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise PrometheusError(f"prometheus not ready after {timeout_s:g}s: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a successful answer, PrometheusError otherwise."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as err:  # 400/422: a bad expression; the body says why
            body = json.loads(err.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query: the result vector (or scalar, as a one-item list)."""
        data = self.api("query", query=expr)
        return data["result"] if data["resultType"] in ("vector", "matrix") else [{"value": data["result"]}]

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[dict[str, Any]]:
        """A range query (what a Grafana panel runs): one `{"metric", "values": [[t, "v"], ...]}` per series."""
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step_s:g}")["result"]

    def wait_for(self, expr: str, timeout_s: float = 30.0, interval_s: float = 0.5) -> list[dict[str, Any]]:
        """Poll `expr` until it returns something; PrometheusError (with the targets' state) on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                targets = [(t["scrapeUrl"], t["health"], t.get("lastError"))
                           for t in self.api("targets")["activeTargets"]]
                raise PrometheusError(f"{expr!r} still empty after {timeout_s:g}s; targets: {targets}")
            time.sleep(interval_s)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> PrometheusServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
