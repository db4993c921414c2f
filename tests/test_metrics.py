"""srserve/serving/metrics.py outside Ray: the definitions, the typed API on the prometheus-client backend (read
back through exposition text), bounded labels, and that metrics never fail their caller. Fast, no Ray."""
from __future__ import annotations

import re
import sys
import urllib.request

import pytest
from prometheus_client import generate_latest

from srserve.serving import metrics, metrics_backend
from srserve.serving.metrics import METRICS, SECONDS, JobMetrics, StageMetrics, StoreMetrics
from srserve.serving.prom import free_port, parse_exposition, serve_metrics

BOUNDED = {"stage", "role", "model", "policy", "status", "reason", "op", "hop", "phase", "outcome", "pool", "gpu"}


@pytest.fixture()
def prom():
    metrics.configure("prometheus", application="test-app")
    yield lambda: parse_exposition(generate_latest(metrics.registry()).decode())
    metrics.configure("auto")


def _value(samples, name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_definitions_are_bounded_and_named_srserve() -> None:
    for d in METRICS.values():
        assert re.fullmatch(r"srserve_[a-z_]+", d.name) and d.kind in ("counter", "gauge", "histogram")
        assert set(d.labels) <= BOUNDED, d.name
        if d.kind == "histogram":
            assert list(d.buckets) == sorted(d.buckets) and d.buckets[0] > 0
    assert SECONDS[0] == 0.001 and SECONDS[-1] == 600.0
    assert METRICS["srserve_step_seconds"].series() == (
        "ray_srserve_step_seconds_bucket", "ray_srserve_step_seconds_sum", "ray_srserve_step_seconds_count")
    assert METRICS["srserve_jobs_created"].series() == ("ray_srserve_jobs_created_total",)


def test_stage_metrics(prom) -> None:
    sm = StageMetrics("sketch", "srd-tiny")
    sm.set_load(in_flight=3, waiting=2)
    sm.observe_step(0.25, batch_size=3)
    with sm.step(batch_size=1, role="render"):
        pass
    sm.observe_stage(4.0)
    sm.observe_handoff("encode", {"bytes": 2e6, "serialize_s": 0.001, "transit_s": 0.02, "deserialize_s": 0.003})
    sm.observe_handoff("encode", None)  # no hop crossed: nothing recorded
    sm.cache_hit()
    samples = prom()
    assert _value(samples, "ray_srserve_stage_requests_in_flight", stage="sketch", application="test-app") == 3
    assert _value(samples, "ray_srserve_stage_requests_waiting", stage="sketch") == 2
    assert _value(samples, "ray_srserve_step_seconds_count", role="sketch") == 1
    assert _value(samples, "ray_srserve_step_seconds_bucket", role="sketch", le="0.25") == 1
    assert _value(samples, "ray_srserve_step_seconds_bucket", role="sketch", le="0.1") == 0
    assert _value(samples, "ray_srserve_stage_batch_size_bucket", role="render", le="1.0") == 1
    assert _value(samples, "ray_srserve_stage_seconds_count", outcome="ok") == 1
    assert _value(samples, "ray_srserve_handoff_bytes_count", hop="encode->sketch") == 1
    assert _value(samples, "ray_srserve_handoff_seconds_count", hop="encode->sketch", phase="transit") == 1
    assert _value(samples, "ray_srserve_prompt_cache_hits_total", stage="sketch") == 1


def test_job_and_store_metrics(prom) -> None:
    jm = JobMetrics("srd-tiny")
    jm.created("adaptive:0.02:min=3")
    jm.created("step:5")
    jm.refused("queue_full")
    jm.refused("job 1234 is too big")  # free text never becomes a label
    jm.started("adaptive", 0.5)
    jm.first_progress("adaptive", 1.5)
    jm.retried(TimeoutError("stage stalled"))
    jm.ended("completed", policy="adaptive", seconds=42.0, switch_step=0)
    jm.ended("failed", RuntimeError("x"), policy="ratio:0.5", seconds=7.0)
    jm.ended("cancelled", policy="none")
    jm.set_in_flight(4)
    with pytest.raises(ValueError):
        with StoreMetrics().timed("create"):
            raise ValueError("boom")
    StoreMetrics().observe("not-an-op", 0.01)
    samples = prom()
    assert _value(samples, "ray_srserve_jobs_created_total", policy="adaptive") == 1
    assert _value(samples, "ray_srserve_jobs_created_total", policy="step") == 1
    assert _value(samples, "ray_srserve_admission_refusals_total", reason="other") == 1
    assert _value(samples, "ray_srserve_job_retries_total", reason="timeout") == 1
    assert _value(samples, "ray_srserve_jobs_ended_total", status="completed", reason="none") == 1
    assert _value(samples, "ray_srserve_jobs_ended_total", status="failed", reason="error") == 1
    assert _value(samples, "ray_srserve_jobs_ended_total", status="cancelled", reason="cancelled") == 1
    assert _value(samples, "ray_srserve_job_seconds_bucket", status="completed", le="60.0") == 1
    assert _value(samples, "ray_srserve_job_switch_step_bucket", policy="adaptive", le="0.5") == 1
    assert _value(samples, "ray_srserve_jobs_in_flight") == 4
    assert _value(samples, "ray_srserve_store_op_seconds_count", op="create", status="error") == 1
    assert _value(samples, "ray_srserve_store_op_seconds_count", op="other", status="ok") == 1
    for s in samples:  # only declared labels, whatever the callers passed
        d = METRICS[re.sub(r"^ray_|_(total|bucket|sum|count|created)$", "", s.name)]
        assert set(s.labels) <= {*d.labels, "application", "le"}, s


def test_bounded_label_helpers() -> None:
    assert metrics.policy_kind("Adaptive:0.01:max=12") == "adaptive"
    assert metrics.policy_kind("small-only") == "small-only"
    assert metrics.policy_kind(None) == metrics.policy_kind("weird") == "other"
    assert StageMetrics("ingress", "m").stage == "other"

    class Wrapped(Exception):
        def __init__(self, cause: BaseException) -> None:
            super().__init__("wrapped")
            self.cause = cause  # how Ray's RayTaskError carries the user's exception

    class JobCancelled(RuntimeError):
        pass

    assert metrics.failure_reason(Wrapped(MemoryError())) == "oom"
    assert metrics.failure_reason(JobCancelled()) == "cancelled"
    assert metrics.failure_reason("TimeoutError: no heartbeat for 60 s") == "timeout"
    assert metrics.failure_reason("lease_expired") == "lease_expired"
    assert metrics.failure_reason("KeyError: 'x'") == "error"
    assert metrics.failure_reason(None) == "none"


def test_metrics_never_fail_the_caller(caplog) -> None:
    class Broken(metrics_backend._Backend):
        def make(self, d):
            raise RuntimeError("no backend")

    metrics_backend._backend = Broken()
    metrics_backend._recorders.clear()
    try:
        StageMetrics("render", "m").observe_step(0.1, 1)
        StageMetrics("render", "m").observe_step(0.1, 1)
        assert sum("disabled" in r.getMessage() for r in caplog.records) == 2  # once per metric (two metrics)
        with pytest.raises(KeyError):
            metrics.record("srserve_not_defined", 1, {})
    finally:
        metrics.configure("auto")
    metrics.configure("none")
    JobMetrics("m").created("none")  # records nothing, raises nothing
    metrics.configure("auto")
    ray = sys.modules.get("ray")
    in_ray = ray is not None and ray.is_initialized()  # a session fixture of another test module may have started it
    assert metrics.backend_name() == ("ray" if in_ray else "prometheus")


def test_serve_metrics_exposes_the_registry_over_http() -> None:
    port = free_port()
    try:
        url = serve_metrics(port)
        StageMetrics("decode", "m").observe_stage(1.0)
        with urllib.request.urlopen(url, timeout=10) as resp:
            samples = parse_exposition(resp.read().decode())
        assert _value(samples, "ray_srserve_stage_seconds_count", stage="decode") == 1
        assert _value(samples, "ray_srserve_gpu_sampler_up", pool="local") == 0  # no NVML on this machine
    finally:
        metrics.configure("auto")


def test_load_parts_handoff_embeddings_and_completion(prom) -> None:
    sm = StageMetrics("colocated", "srd-tiny")
    sm.set_load(2, 1, part="sketch")
    sm.set_load(1, 0, part="render")  # a Colocated replica's roles add up
    sm.observe_handoff("sketch", {"bytes": 5e5, "serialize_s": 0.001, "transit_s": 0.01, "deserialize_s": 0.002,
                                  "embeddings_bytes": 3e6, "embeddings_s": 0.02}, "render")
    jm = JobMetrics("srd-tiny")
    reports = [{"kind": "start", "stage": "encode", "at": 100.5}, {"kind": "end", "stage": "encode", "at": 101.0},
               {"kind": "start", "stage": "sketch", "at": 101.2},
               {"kind": "end", "stage": "sketch", "at": 104.0, "info": {"first_step_at": 101.7}},
               {"kind": "end", "stage": "render", "at": 106.0, "info": {"first_step_at": 104.3}}]
    jm.completed("step:4", 100.0, {"reports": reports, "switch_step": 4})
    samples = prom()
    assert _value(samples, "ray_srserve_stage_requests_in_flight", stage="colocated") == 3
    assert _value(samples, "ray_srserve_stage_requests_waiting", stage="colocated") == 1
    assert _value(samples, "ray_srserve_handoff_bytes_count", hop="sketch->render") == 1
    assert _value(samples, "ray_srserve_handoff_bytes_bucket", hop="encode->render:embeddings", le="3e+06") == 1
    assert _value(samples, "ray_srserve_handoff_seconds_count", hop="encode->render:embeddings", phase="fetch") == 1
    assert _value(samples, "ray_srserve_job_queue_seconds_bucket", policy="step", le="0.5") == 1  # 100 -> 100.5
    assert _value(samples, "ray_srserve_job_queue_seconds_bucket", policy="step", le="0.25") == 0
    assert _value(samples, "ray_srserve_job_first_progress_seconds_bucket", policy="step", le="2.5") == 1  # 1.7 s
    assert _value(samples, "ray_srserve_job_first_progress_seconds_bucket", policy="step", le="1.0") == 0
    assert _value(samples, "ray_srserve_jobs_ended_total", status="completed", reason="none") == 1
    assert _value(samples, "ray_srserve_job_switch_step_bucket", policy="step", le="4.0") == 1


def test_refusal_reasons() -> None:
    assert metrics.refusal_reason(429, "queue_full") == "queue_full"
    assert metrics.refusal_reason(429, "quota") == "quota"
    assert metrics.refusal_reason(422, "invalid_value") == metrics.refusal_reason(400, "invalid_body") == "invalid"
    assert metrics.refusal_reason(503) == "not_ready" and metrics.refusal_reason(413) == "too_large"
    assert metrics.refusal_reason(500, "boom") == "other"


def test_generate_with_metrics_port_exports_its_steps(tmp_path, capsys) -> None:
    """`srserve generate --metrics-port`: an in-process run's steps, stage and job, scraped over HTTP."""
    import urllib.request

    from srserve.cli import main
    from srserve.serving.prom import free_port, parse_exposition

    port = free_port()
    try:
        assert main(["generate", "a red circle moving right", "--steps", "4", "--frames", "9", "--size", "32x32",
                     "--switch", "step:1", "--out", str(tmp_path / "v.npy"), "--metrics-port", str(port)]) == 0
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        metrics.configure("auto")
    samples = parse_exposition(text)
    steps = {s.labels["role"]: s.value for s in samples if s.name == "ray_srserve_step_seconds_count"}
    assert steps == {"sketch": 1.0, "render": 3.0}
    ended = [s for s in samples if s.name == "ray_srserve_jobs_ended_total" and s.labels["status"] == "completed"]
    assert ended and ended[0].value == 1.0
    latency = [s for s in samples if s.name == "ray_srserve_job_seconds_count"]
    assert latency and latency[0].labels["policy"] == "step" and latency[0].value == 1.0
