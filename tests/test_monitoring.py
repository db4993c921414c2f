"""The monitoring files in deployments/monitoring: the Grafana dashboard may only query metrics that Ray 2.60
exports (an allowlist, itself checked against Ray's installed source), and the local Prometheus config finds
Ray's metrics through Ray's service discovery file. Pure Python and fast."""
from __future__ import annotations

import json
import re
import runpy
from pathlib import Path

import pytest
import yaml

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


def _targets() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for child in [panel, *panel.get("panels", [])]:
            out.extend((child["title"], t["expr"]) for t in child.get("targets", []))
    return out


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.99, sum by (le) (rate(ray_serve_deployment_processing_latency_ms_bucket'
            '{application=~"$application",deployment="Sketch"}[$__rate_interval]))) / on() sum(ray_resources)')
    assert _metric_names(expr) == {"ray_serve_deployment_processing_latency_ms_bucket", "ray_resources"}


def test_dashboard_queries_only_metrics_ray_exports() -> None:
    targets = _targets()
    assert len(targets) > 20
    for title, expr in targets:
        unknown = _metric_names(expr) - RAY_METRICS
        assert not unknown, f"panel {title!r} queries {unknown}, not in the allowlist of Ray 2.60 metrics"


def test_dashboard_covers_every_stage() -> None:
    exprs = [expr for _, expr in _targets()]
    for deployment in ("Ingress", "Encode", "Sketch", "Render", "Decode"):
        mine = [e for e in exprs if f'deployment="{deployment}"' in e]
        for metric in ("ray_serve_deployment_request_counter_total", "ray_serve_deployment_queued_queries",
                       "ray_serve_replica_processing_queries", "ray_serve_deployment_replica_healthy"):
            assert any(metric in e for e in mine), f"{deployment}: no panel on {metric}"
        for q in ("0.5", "0.99"):
            assert any(f"histogram_quantile({q}," in e and "processing_latency_ms_bucket" in e for e in mine)
    assert any("ray_node_gpus_utilization" in e for e in exprs)
    assert any("ray_serve_num_ongoing_http_requests" in e for e in exprs)


def test_dashboard_is_up_to_date_with_its_generator() -> None:
    render = runpy.run_path(str(MONITORING / "build_dashboard.py"))["render"]
    assert DASHBOARD.read_text() == render(), "run python deployments/monitoring/build_dashboard.py"
    uids = {p["id"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    assert len(uids) == len(json.loads(DASHBOARD.read_text())["panels"])


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
