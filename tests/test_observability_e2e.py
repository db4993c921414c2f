"""Issue 10's proof against a real Prometheus: under a small bounded load, every PromQL expression of every panel
of the Grafana dashboard returns data.

`srserve serve` runs the app in a child process (a local Ray cluster: pools sketch_pool 1 and render_pool 2, the
latter for render autoscaled to max_replicas 2; Ray's metrics agent on loopback, reporting every second), exactly
as a user starts it; a real Prometheus (Debian's package, tests/prom.py) scrapes the endpoint it prints. The load
(benchmarks/observed_app.py `mixed_load`) completes jobs under four switch policies, repeats a prompt (cache
hits), is refused (422 invalid, 429 queue_full), cancels jobs while they sketch and loses the Sketch replica
mid-job (a retry). Then each panel's expression, with the dashboard's variables filled in as Grafana would for
this app, goes through Prometheus' HTTP API as the range query a panel runs (over the load, 1 m rate windows) and
must return at least one sample with a number (not NaN): a panel that queries a metric or a label value the app
never exports fails. (A range, not an instant at the end: Ray's agent drops the series of a dead replica, and
Serve's own gauges, e.g. ongoing HTTP requests, exist only while set.)

GPU panels are exempt here (no GPU, so the sampler reports only `ray_srserve_gpu_sampler_up 0`, which the "GPU
samplers" panel shows and this test checks); the GPU check (benchmarks/gpu/run.sh, benchmarks/gpu/observability.py)
runs the app on a GPU and requires every srserve_gpu_* series, and, where Prometheus is installed there, evaluates
these exempt panels the same way.
"""
from __future__ import annotations

import json
import math
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from prom import dashboard_queries, prometheus, prometheus_binary  # noqa: F401  (fixtures)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from observed_app import LocalApp, app_config, mixed_load, needs_gpu  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

APP = "srserve-obs"
MAX_PENDING = 4
# Grafana's values for this app (its $__rate_interval at a 1 s scrape interval and a few minutes' range is smaller).
VARIABLES = {"$__rate_interval": "1m", "$application": APP, "$cluster": ".*", "$stage": ".*", "$slo": "60.0"}


def has_data(result: list[dict]) -> bool:
    """At least one sample whose value is a number (histogram_quantile of nothing is NaN)."""
    return any(not math.isnan(float(v)) for r in result for _, v in r.get("values", ()))


def empty_panels(server, queries: list[tuple[str, str]], start: float) -> list[tuple[str, str]]:
    """The queries whose range query over [start, now] has no number."""
    end = time.time()
    return [(title, expr) for title, expr in queries if not has_data(server.query_range(expr, start, end, 2.0))]


def transition_lines(job_id: str, since: float) -> list[dict]:
    """The stage-transition JSON lines of `job_id` in the replica logs of Ray sessions begun since `since`."""
    out = []
    for session in Path("/tmp/ray").glob("session_2*"):
        if session.stat().st_mtime < since:
            continue
        for log in (session / "logs" / "serve").glob("replica_*.log"):
            for line in log.read_text(errors="replace").splitlines():
                if job_id in line and '"stage_transition"' in line:
                    out.append(json.loads(line[line.index("{"):line.rindex("}") + 1]))
    return out


def test_every_dashboard_panel_has_data_under_load(prometheus, tmp_path):  # noqa: F811
    began = time.monotonic()
    started_at = time.time()
    config = app_config(tmp_path / "app", app=APP, max_pending_jobs=MAX_PENDING)
    with LocalApp(config, tmp_path / "app") as app:
        # `srserve serve` says where its metrics are (issue 10 point 6)
        assert app.metrics == [f"127.0.0.1:{app.metrics_port}"], app.lines
        server = prometheus(targets=app.metrics, interval_s=1.0)
        load_began = time.time()
        load = mixed_load(app, MAX_PENDING, log=lambda line: None)
        assert load["completed"] == ["completed"] * 4, load
        assert load["refused"] == {"invalid": [422, 422], "queue_full": 429}, load
        assert load["cancelled"] == ["cancelled"] * MAX_PENDING, load
        assert load["retried"]["killed"] and load["retried"]["failures"] >= 1, load
        ended = 4 + MAX_PENDING + 1
        server.wait_for(f'sum(ray_srserve_jobs_ended_total{{application="{APP}"}}) >= {ended}', timeout_s=30)

        queries = dashboard_queries(variables=VARIABLES)
        assert len(queries) > 30
        gpu = [(t, e) for t, e in queries if needs_gpu(e)]
        checked = [(t, e) for t, e in queries if not needs_gpu(e)]
        assert {t for t, _ in gpu} == {"GPU utilisation per pool", "GPU utilisation per GPU", "GPU memory used per pool",
                                       "GPU power per pool", "GPU temperature (hottest per pool)",
                                       "Ray node GPU utilisation (cross-check)"}
        for _, expr in gpu:  # valid PromQL all the same (PrometheusError otherwise)
            server.query(expr)
        deadline = time.monotonic() + 30  # Serve's own series (autoscaling, resources) may lag a report or two
        while (empty := empty_panels(server, checked, load_began)) and time.monotonic() < deadline:
            time.sleep(2)
        assert not empty, "panels without data:\n" + "\n".join(f"  {t}: {e}" for t, e in empty)

        # The check can fail: a metric, or a label value, that the app never exports returns nothing.
        never = [("a metric never exported", f'sum(rate(ray_srserve_never_total{{application="{APP}"}}[1m]))'),
                 ("a label value never exported",
                  f'sum(ray_srserve_jobs_ended_total{{application="{APP}",reason="no_such_reason"}})')]
        assert empty_panels(server, never, load_began) == never
        # Gauges that stay put are still there when idle (Ray's agent drops a series not set for two report
        # intervals; metrics_backend sets srserve's gauges again every half interval).
        assert server.query(f'ray_srserve_jobs_in_flight{{application="{APP}"}} == 0')
        # Without a GPU the sampler is off, says so, and records nothing else.
        up = server.query(f'ray_srserve_gpu_sampler_up{{application="{APP}"}}')
        assert up and {r["metric"]["pool"] for r in up} >= {"sketch_pool", "render_pool"}
        assert all(float(r["value"][1]) == 0 for r in up)
        assert not server.query('{__name__=~"ray_srserve_gpu_(utilization|memory|power|temperature).*"}')

    # One JSON line per stage transition, with the job id and replica; no prompt (log_prompts is off).
    db = sqlite3.connect(str(tmp_path / "app" / "jobs.sqlite"))
    completed = [row[0] for row in db.execute("SELECT id FROM jobs WHERE status = 'completed'")]
    assert len(completed) >= 4
    for job_id in completed[:2]:
        lines = transition_lines(job_id, started_at)
        seen = {(line["stage"], line["outcome"]) for line in lines}
        assert {("encode", "started"), ("encode", "ok"), ("decode", "started"), ("decode", "ok")} <= seen, lines
        assert all(line["job_id"] == job_id and line["replica"] and "prompt" not in line for line in lines)
    assert time.monotonic() - began < 240
