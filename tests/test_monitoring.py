"""The monitoring files in deployments/monitoring: the Grafana dashboard may only query srserve series that
srserve/serving/metrics.py defines (with their labels) and metrics that Ray 2.60 exports (an allowlist, itself
checked against Ray's installed source); every srserve metric is on a panel; the local Prometheus config finds
Ray's metrics through Ray's service discovery file. Pure Python and fast (tests/test_prometheus.py runs the
expressions in a real Prometheus)."""
from __future__ import annotations

import json
import re
import runpy
from pathlib import Path

import pytest
import yaml

from srserve.serving.metrics import JOB_SECONDS, METRICS

MONITORING = Path(__file__).resolve().parents[1] / "deployments" / "monitoring"

# Metric names as Ray 2.60 exports them (Prometheus adds _total to counters, _bucket/_sum/_count to histograms):
#   ray/serve/_private/replica.py          serve_deployment_request_counter, serve_deployment_error_counter,
#                                          serve_deployment_processing_latency_ms, serve_replica_processing_queries
#   ray/serve/_private/router.py           serve_deployment_queued_queries, serve_num_ongoing_requests_at_replicas
#   ray/serve/_private/deployment_state.py serve_deployment_replica_healthy, serve_autoscaling_target_replicas
#   ray/serve/_private/autoscaling_state.py serve_autoscaling_desired_replicas
#   ray/serve/_private/request_ingress_metrics.py  serve_num_{http}_requests, serve_num_{http}_error_requests,
#                                          serve_{http}_request_latency_ms, serve_num_ongoing_{http}_requests
#   ray/dashboard/modules/reporter/reporter_agent.py  node_gpus_utilization, node_gram_used, node_gram_available
#   ray_resources (Ray core's per-resource gauge; queried by Ray's own dashboards in
#                  ray/dashboard/modules/metrics/dashboards/default_dashboard_panels.py)
RAY_METRICS = {
    "ray_serve_deployment_request_counter_total",
    "ray_serve_deployment_error_counter_total",
    "ray_serve_deployment_processing_latency_ms_bucket",
    "ray_serve_replica_processing_queries",
    "ray_serve_deployment_queued_queries",
    "ray_serve_num_ongoing_requests_at_replicas",
    "ray_serve_deployment_replica_healthy",
    "ray_serve_autoscaling_target_replicas",
    "ray_serve_autoscaling_desired_replicas",
    "ray_serve_num_http_requests_total",
    "ray_serve_num_http_error_requests_total",
    "ray_serve_http_request_latency_ms_bucket",
    "ray_serve_num_ongoing_http_requests",
    "ray_node_gpus_utilization",
    "ray_node_gram_used",
    "ray_node_gram_available",
    "ray_resources",
}
PROMQL_WORDS = {
    "sum", "avg", "max", "min", "count", "by", "without", "on", "ignoring", "group_left", "group_right", "and",
    "or", "unless", "rate", "irate", "increase", "histogram_quantile", "clamp_min", "clamp_max", "abs", "offset",
    "topk", "bottomk", "quantile", "avg_over_time", "max_over_time", "label_replace", "vector", "scalar",
}
DASHBOARD = MONITORING / "srserve-grafana-dashboard.json"


def _metric_names(expr: str) -> set[str]:
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)                            # strings (label values)
    text = re.sub(r"\{[^}]*\}", "", text)                                    # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                                   # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return {w for w in words if w not in PROMQL_WORDS}


SRSERVE_SERIES = {series: d for d in METRICS.values() for series in d.series()}
# Labels every series has besides its own: Serve's (inside replicas), Prometheus' and KubeRay's PodMonitors'.
AUTO_LABELS = {"application", "deployment", "replica", "instance", "job", "le", "ray_io_cluster", "ray_io_group",
               "NodeAddress", "SessionName"}
SECTIONS = ("Overview", "Stages", "GPUs", "Capacity")


def _panels() -> list[dict]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [child for panel in dashboard["panels"] for child in [panel, *panel.get("panels", [])]]


def _targets() -> list[tuple[str, str]]:
    return [(panel["title"], t["expr"]) for panel in _panels() for t in panel.get("targets", [])]


def _srserve_labels(expr: str) -> list[tuple[str, set[str]]]:
    """(series, labels it is filtered on) for each srserve selector of `expr`, and the grouping labels of
    the aggregation around it."""
    out = []
    for name, matchers in re.findall(r"(ray_srserve_[a-z_]+)\{([^}]*)\}", expr):
        out.append((name, set(re.findall(r"([A-Za-z_]+)\s*(?:=~|!~|!=|=)", re.sub(r'"[^"]*"', '""', matchers)))))
    groups = {g.strip() for by in re.findall(r"\bby\s*\(([^)]*)\)", expr) for g in by.split(",")}
    return [(name, labels | groups) for name, labels in out]


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.99, sum by (le) (rate(ray_serve_deployment_processing_latency_ms_bucket'
            '{application=~"$application",deployment="Sketch"}[$__rate_interval]))) / on() sum(ray_resources)')
    assert _metric_names(expr) == {"ray_serve_deployment_processing_latency_ms_bucket", "ray_resources"}


def test_dashboard_queries_only_defined_srserve_series_and_rays_metrics() -> None:
    targets = _targets()
    assert len(targets) > 30
    for title, expr in targets:
        unknown = _metric_names(expr) - RAY_METRICS - set(SRSERVE_SERIES)
        assert not unknown, f"panel {title!r} queries {unknown}: neither defined in metrics.py nor exported by Ray"


def test_dashboard_filters_srserve_series_on_their_own_labels() -> None:
    for title, expr in _targets():
        for series, labels in _srserve_labels(expr):
            allowed = set(SRSERVE_SERIES[series].labels) | AUTO_LABELS
            assert labels <= allowed, f"panel {title!r}: {series} has no label {labels - allowed}"


def test_every_srserve_metric_is_on_a_panel() -> None:
    used = {name for _, expr in _targets() for name in _metric_names(expr)}
    missing = [d.name for d in METRICS.values() if not set(d.series()) & used]
    assert not missing, f"metrics.py defines {missing}, but no panel shows them"


def test_dashboard_has_the_four_sections_and_the_variables() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert tuple(rows) == SECTIONS
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "application", "stage", "cluster", "slo"} <= set(variables)
    # SLO attainment reads one histogram bucket: every choice must be a job_seconds bound, as Prometheus writes it
    assert all(float(o["value"]) in JOB_SECONDS and o["value"].endswith(".0") for o in variables["slo"]["options"])
    stage_panels = [p for p in _panels() if any('stage=~"$stage"' in t["expr"] for t in p.get("targets", []))]
    assert len(stage_panels) >= 6


def test_dashboard_covers_the_issue_panels() -> None:
    exprs = "\n".join(expr for _, expr in _targets())
    for needle in ("ray_srserve_jobs_created_total", 'histogram_quantile(0.99, sum by (le) (rate('
                   'ray_srserve_job_seconds_bucket', "ray_srserve_admission_refusals_total", 'le="$slo"',
                   "ray_srserve_jobs_in_flight", "ray_srserve_stage_requests_waiting", "ray_srserve_step_seconds",
                   "ray_srserve_job_switch_step_bucket", "ray_srserve_handoff_bytes_bucket",
                   "ray_srserve_gpu_utilization_percent", "ray_srserve_gpu_memory_used_bytes",
                   "ray_srserve_gpu_power_watts", "ray_serve_deployment_replica_healthy",
                   "ray_serve_autoscaling_target_replicas"):
        assert needle in exprs, needle


def test_observability_doc_lists_every_metric() -> None:
    doc = (MONITORING.parents[1] / "docs" / "observability.md").read_text()
    missing = [d.name for d in METRICS.values() if f"`{d.series()[0].removesuffix('_bucket')}`" not in doc]
    assert not missing, f"docs/observability.md does not list {missing}"


def test_dashboard_is_up_to_date_with_its_generator() -> None:
    render = runpy.run_path(str(MONITORING / "build_dashboard.py"))["render"]
    assert DASHBOARD.read_text() == render(), "run python deployments/monitoring/build_dashboard.py"
    ids = [p["id"] for p in _panels()]
    assert len(set(ids)) == len(ids)


def _ray_source_text() -> str:
    ray = pytest.importorskip("ray")
    base = Path(ray.__file__).parent
    files = [*(base / "serve").rglob("*.py"), base / "dashboard" / "modules" / "reporter" / "reporter_agent.py",
             *(base / "dashboard" / "modules" / "metrics" / "dashboards").glob("*.py")]
    return "\n".join(f.read_text(errors="replace") for f in files)


def test_allowlist_is_what_ray_defines() -> None:
    source = _ray_source_text()
    for metric in RAY_METRICS:
        if metric == "ray_resources":  # defined in Ray core (C++); Ray's own dashboards query it
            assert "ray_resources{" in source
            continue
        base = re.sub(r"_(total|bucket|sum|count)$", "", metric.removeprefix("ray_"))
        # literal names, or the protocol-templated ones of request_ingress_metrics.py
        templated = base.replace("_http_", "_{protocol_name}_").replace("serve_http_", "serve_{protocol_name}_")
        assert f'"{base}"' in source or templated in source, f"{metric}: not defined in Ray's source"


def test_local_prometheus_uses_rays_service_discovery_file() -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    files = [f for job in config["scrape_configs"] for sd in job.get("file_sd_configs", []) for f in sd["files"]]
    assert "/tmp/ray/prom_metrics_service_discovery.json" in files
