"""Against a real Prometheus: every dashboard expression is valid PromQL, and Prometheus scrapes the metrics a Ray
actor and a Serve replica record, through `ray.util.metrics` and through srserve's metrics module, under the names the
dashboards query (`MetricDef.series()`). The Ray cluster runs in a child process, so this test neither needs nor
disturbs a Ray session of the test process."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from prom import dashboard_queries, prometheus, prometheus_binary  # noqa: F401  (fixtures)

from srserve.serving.metrics import METRICS
from srserve.serving.prom import PrometheusError, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

# The child: a one-node Ray cluster whose metrics agent listens on loopback at a given port, and one actor that
# records metrics; it prints "ready" and lives until its stdin closes.
CHILD = """
import socket
import sys
import ray
from srserve.serving.serve_env import local_cluster_options

ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, _metrics_export_port=int(sys.argv[1]),
         _system_config={"metrics_report_interval_ms": 500}, **local_cluster_options())

@ray.remote(num_cpus=0)
class Emitter:
    def emit(self):
        from ray.util.metrics import Counter
        from srserve.serving import metrics

        self.probe = Counter("srserve_probe", "A probe.", tag_keys=("stage",))
        self.probe.inc(1.0, {"stage": "sketch"})
        stage = metrics.StageMetrics("sketch", "tiny")
        stage.observe_step(0.02, 2, "sketch")
        stage.set_load(2, 1)
        metrics.JobMetrics("tiny").ended("completed", policy="adaptive:0.01", seconds=3.0, switch_step=4)
        return metrics.backend_name()

emitter = Emitter.remote()
backend = ray.get(emitter.emit.remote())
if "--serve" in sys.argv:  # the same through a Serve replica, where Ray adds application/deployment/replica
    from ray import serve

    with socket.socket() as s:  # HTTP on loopback: with HAProxy on, Serve's default host is every interface
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Probe:
        def __call__(self):
            from srserve.serving import metrics

            metrics.StageMetrics("decode", "tiny").observe_stage(0.5)
            return metrics.backend_name()

    handle = serve.run(Probe.bind(), name="probe", route_prefix=None)
    backend += "," + handle.remote().result()
print("ready", backend, flush=True)
sys.stdin.read()
ray.shutdown()
"""
RECORDED = ("srserve_step_seconds", "srserve_stage_batch_size", "srserve_stage_requests_in_flight",
            "srserve_stage_requests_waiting", "srserve_jobs_ended", "srserve_job_seconds", "srserve_job_switch_step")


def test_every_dashboard_expression_is_valid_promql(prometheus):  # noqa: F811
    server = prometheus()
    queries = dashboard_queries()
    assert len(queries) > 30
    for title, expr in queries:
        try:
            server.query(expr)
        except PrometheusError as err:
            pytest.fail(f"panel {title!r}: {err}")


def test_prometheus_scrapes_metrics_recorded_in_a_ray_actor(prometheus):  # noqa: F811
    port = free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # node IP loopback: the agent binds loopback
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(port), "--serve"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        began = time.monotonic()
        line = child.stdout.readline()
        assert line.split() == ["ready", "ray,ray"], f"child said {line!r} (exit {child.poll()})"
        server = prometheus(targets=[f"127.0.0.1:{port}"], interval_s=1.0)
        probe = server.wait_for('ray_srserve_probe_total{stage="sketch"}', timeout_s=45)
        assert float(probe[0]["value"][1]) == 1.0
        for name in RECORDED:
            for series in METRICS[name].series():
                assert server.wait_for(series, timeout_s=10), series
        step = server.query('ray_srserve_step_seconds_count{stage="sketch",role="sketch",model="tiny"}')
        assert float(step[0]["value"][1]) == 1.0
        ended = server.query('ray_srserve_jobs_ended_total{status="completed",reason="none"}')
        assert ended and float(ended[0]["value"][1]) == 1.0
        switch = server.query('ray_srserve_job_switch_step_bucket{policy="adaptive",le="4.0"}')
        assert float(switch[0]["value"][1]) == 1.0
        replica = server.wait_for('ray_srserve_stage_seconds_count{application="probe",deployment="Probe",'
                                  'stage="decode",outcome="ok"}', timeout_s=20)
        assert replica[0]["metric"]["replica"]
        assert time.monotonic() - began < 90
    finally:
        if child.poll() is None:
            child.stdin.close()
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
