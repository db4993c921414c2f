"""Fixtures for tests against a real Prometheus (Debian's `prometheus` package; `make setup` installs it as root).

    from prom import prometheus, prometheus_binary  # noqa: F401  (pytest finds fixtures imported into a module)

    def test_x(prometheus):
        server = prometheus(targets=["127.0.0.1:8080"])   # started on a free loopback port, stopped after the test
        server.wait_for('up{job="ray"} == 1')

Without the binary the tests that use them skip, naming the package to install.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterator

import pytest

from srserve.serving.prom import MISSING_PROMETHEUS, PrometheusServer, scrape_config

DASHBOARD = Path(__file__).resolve().parents[1] / "deployments" / "monitoring" / "srserve-grafana-dashboard.json"
# What Grafana would put in for the dashboard's variables, on a local cluster.
VARIABLES = {"$__rate_interval": "1m", "$application": "srserve", "$cluster": ".*", "$stage": ".*", "$slo": "60.0"}


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if not path:
        pytest.skip(MISSING_PROMETHEUS)
    return path


@pytest.fixture()
def prometheus(prometheus_binary: str, tmp_path: Path) -> Iterator[Callable[..., PrometheusServer]]:
    """A factory: `prometheus(targets=[...], sd_files=[...], interval_s=1.0)` -> a started PrometheusServer."""
    started: list[PrometheusServer] = []

    def start(targets: list[str] | None = None, sd_files: list[str] | None = None,
              interval_s: float = 1.0) -> PrometheusServer:
        workdir = tmp_path / f"prometheus-{len(started)}"
        server = PrometheusServer(scrape_config(targets, sd_files, interval_s), workdir=workdir,
                                  binary=prometheus_binary)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def dashboard_queries(path: Path = DASHBOARD, variables: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(panel title, PromQL with the variables filled in) for every target of the dashboard (`variables`
    override `VARIABLES`)."""
    panels = json.loads(path.read_text())["panels"]
    values = {**VARIABLES, **(variables or {})}
    out = []
    for panel in (child for p in panels for child in [p, *p.get("panels", [])]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in values.items():
                expr = expr.replace(name, value)
            out.append((panel["title"], expr))
    return out
