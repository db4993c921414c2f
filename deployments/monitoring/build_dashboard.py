"""Writes srserve-grafana-dashboard.json: srserve's Grafana dashboard, built on Ray's own metrics only.

    python deployments/monitoring/build_dashboard.py          # rewrite the JSON next to this file
    python deployments/monitoring/build_dashboard.py --check  # exit 1 if the JSON is out of date

One row per Serve deployment of the srserve application (Ingress, Encode, Sketch, Render, Decode) with its request
rate, latency p50/p99, queue, ongoing requests and replicas; an HTTP overview; the GPU pools. Every query names
metrics Ray 2.60 exports (Ray Serve's `ray_serve_*`, Ray's node and resource metrics); tests/test_manifests.py
checks them against an allowlist taken from Ray's source. Filters: `$application` (the Serve application,
default srserve) and `$cluster` (the `ray_io_cluster` label the KubeRay PodMonitors add; matches anything on a
local cluster, where the label is absent).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("srserve-grafana-dashboard.json")
DEPLOYMENTS = ("Ingress", "Encode", "Sketch", "Render", "Decode")
POOLS = "sketch_pool|render_pool"
APP = 'application=~"$application",ray_io_cluster=~"$cluster"'
CLUSTER = 'ray_io_cluster=~"$cluster"'
RATE = "[$__rate_interval]"
# The Ingress also answers the health probes (/readyz from every worker pod's readiness probe, /healthz):
# leave them out of its request rate and latency.
NOT_PROBES = 'route!~"/readyz|/healthz|/-/.*"'

DESCRIPTIONS = {
    "Ingress": "The HTTP API: creates, lists and streams jobs; each replica also drives its jobs through the stages.",
    "Encode": "Text encoder (render pool): prompt embeddings, with an LRU cache per replica.",
    "Sketch": "Large DiT (sketch pool): the high-noise steps [0, k). One request = one video's sketch.",
    "Render": "Small DiT (render pool): the low-noise steps [k, N). One request = one video's render.",
    "Decode": "VAE decode and mp4 encode (render pool), then the artifact write.",
}


class Layout:
    """Hands out panel ids and grid positions, row by row (Grafana's grid is 24 units wide)."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.next_id = 1
        self.y = 0

    def row(self, title: str) -> None:
        self.panels.append({"type": "row", "id": self._id(), "title": title, "collapsed": False, "panels": [],
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}})
        self.y += 1

    def line(self, *panels: dict[str, Any], height: int = 8) -> None:
        width = 24 // len(panels)
        for i, panel in enumerate(panels):
            panel["id"] = self._id()
            panel["gridPos"] = {"h": height, "w": width, "x": i * width, "y": self.y}
            self.panels.append(panel)
        self.y += height

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def timeseries(title: str, targets: list[tuple[str, str]], unit: str = "short", description: str = "",
               stack: bool = False, max_value: float | None = None) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit, "min": 0,
                                "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                                           "showPoints": "never", "spanNulls": True,
                                           "stacking": {"mode": "normal" if stack else "none", "group": "A"}}}
    if max_value is not None:
        defaults["max"] = max_value
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend, "range": True,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for i, (expr, legend) in enumerate(targets)],
    }


def quantile(q: float, selector: str) -> str:
    return (f"histogram_quantile({q}, sum by (le) "
            f"(rate(ray_serve_deployment_processing_latency_ms_bucket{{{selector}}}{RATE})))")


def overview(layout: Layout) -> None:
    http = f"{APP}"
    layout.row("HTTP (Serve proxies)")
    layout.line(
        timeseries("HTTP requests/s by status", [
            (f"sum by (status_code) (rate(ray_serve_num_http_requests_total{{{http},{NOT_PROBES}}}{RATE}))",
             "{{status_code}}")], unit="reqps", stack=True,
            description="All HTTP requests of the application, health probes excluded. 429 = admission refused "
                        "(max_pending_jobs or the Ingress queue), 503 = not ready."),
        timeseries("HTTP latency p50 / p99", [
            (f"histogram_quantile(0.5, sum by (le) (rate(ray_serve_http_request_latency_ms_bucket"
             f"{{{http},{NOT_PROBES}}}{RATE})))", "p50"),
            (f"histogram_quantile(0.99, sum by (le) (rate(ray_serve_http_request_latency_ms_bucket"
             f"{{{http},{NOT_PROBES}}}{RATE})))", "p99")], unit="ms",
            description="End to end at the proxy. Creating a job returns at once; downloads stream the mp4."),
        timeseries("HTTP errors/s", [
            (f"sum by (error_code) (rate(ray_serve_num_http_error_requests_total{{{http}}}{RATE}))",
             "{{error_code}}")], unit="reqps"),
        timeseries("Ongoing HTTP requests per proxy", [
            (f"sum by (node_ip_address) (ray_serve_num_ongoing_http_requests{{{CLUSTER}}})",
             "{{node_ip_address}}")],
            description="Requests in flight at each node's Serve proxy."),
    )


def deployment_row(layout: Layout, name: str) -> None:
    sel = f'{APP},deployment="{name}"'
    req = f"{sel},{NOT_PROBES}" if name == "Ingress" else sel
    layout.row(f"{name}: {DESCRIPTIONS[name]}")
    layout.line(
        timeseries(f"{name} requests/s", [
            (f"sum(rate(ray_serve_deployment_request_counter_total{{{req}}}{RATE}))", "completed"),
            (f"sum(rate(ray_serve_deployment_error_counter_total{{{req}}}{RATE}))", "errors")], unit="reqps",
            description="Requests finished by the replicas per second (for a stage: videos through it)."),
        timeseries(f"{name} latency p50 / p99", [(quantile(0.5, req), "p50"), (quantile(0.99, req), "p99")],
                   unit="ms", description="Time a replica spent on one request. For Sketch and Render this is "
                                          "k and N-k denoising steps of one video: the stage cost c_L*k, c_S*(N-k)."),
        timeseries(f"{name} queue", [
            (f"sum(ray_serve_deployment_queued_queries{{{sel}}})", "queued at handles")],
            description="Requests waiting for a free replica slot (max_ongoing_requests) in the callers' routers. "
                        "A queue that stays up means this stage is the bottleneck: scale this pool."),
        timeseries(f"{name} ongoing requests", [
            (f"sum by (replica) (ray_serve_replica_processing_queries{{{sel}}})", "{{replica}}")], stack=True,
            description="Requests each replica is working on (for Sketch and Render: the videos in its batch)."),
        timeseries(f"{name} replicas", [
            (f"sum(ray_serve_deployment_replica_healthy{{{sel}}})", "healthy"),
            (f"max(ray_serve_autoscaling_target_replicas{{{sel}}})", "autoscaling target"),
            (f"max(ray_serve_autoscaling_desired_replicas{{{sel}}})", "autoscaling decision")],
            description="Healthy replicas against what Serve's autoscaler wants. A target above 'healthy' for "
                        "long: the pool's worker group is at maxReplicas or its pods cannot be scheduled."),
        height=7,
    )


def gpu_rows(layout: Layout) -> None:
    layout.row("GPU pools (Ray node metrics)")
    layout.line(
        timeseries("GPU utilisation per GPU", [
            (f"ray_node_gpus_utilization{{{CLUSTER}}}", "{{ray_io_group}} {{ip}} GPU {{GpuIndex}}")],
            unit="percent", max_value=100,
            description="nvidia-smi utilisation of every GPU, labelled by worker group (the pool) on KubeRay."),
        timeseries("GPU utilisation per pool", [
            (f"avg by (ray_io_group) (ray_node_gpus_utilization{{{CLUSTER}}})", "{{ray_io_group}}")],
            unit="percent", max_value=100,
            description="Mean utilisation of the GPUs of each worker group (needs the ray_io_group label that "
                        "k8s/monitoring's PodMonitors add; on a local cluster use the per-GPU panel)."),
    )
    layout.line(
        timeseries("GPU memory used", [
            (f"sum by (ip, GpuIndex, ray_io_group) (ray_node_gram_used{{{CLUSTER}}}) / sum by (ip, GpuIndex, "
             f"ray_io_group) (ray_node_gram_used{{{CLUSTER}}} + ray_node_gram_available{{{CLUSTER}}})",
             "{{ray_io_group}} {{ip}} GPU {{GpuIndex}}")], unit="percentunit", max_value=1),
        timeseries("Pool units in use", [
            (f'sum by (Name) (ray_resources{{Name=~"{POOLS}",State="USED",{CLUSTER}}})', "{{Name}} used"),
            (f'sum by (Name) (ray_resources{{Name=~"{POOLS}",{CLUSTER}}})', "{{Name}} total")],
            description="Ray's accounting of the pool resources (one unit per GPU): what the replicas reserve "
                        "against what the pool's pods advertise. Used = total with a queue above: the worker "
                        "group needs more pods."),
    )


def dashboard() -> dict[str, Any]:
    layout = Layout()
    overview(layout)
    for name in DEPLOYMENTS:
        deployment_row(layout, name)
    gpu_rows(layout)

    def query_variable(name: str, label: str, query: str, default: str | None, include_all: bool) -> dict:
        current = {"selected": True, "text": default, "value": default} if default else {}
        return {"type": "query", "name": name, "label": label, "datasource": {"type": "prometheus",
                                                                              "uid": "${datasource}"},
                "definition": query, "query": {"query": query, "refId": f"{name}-values"}, "refresh": 2,
                "includeAll": include_all, "allValue": ".*" if include_all else None, "multi": False,
                "current": current, "sort": 1, "hide": 0}

    return {
        "uid": "srserve",
        "title": "srserve: Sketching-Rendering video serving",
        "description": "Per-stage Ray Serve metrics of srserve (Ingress, Encode, Sketch, Render, Decode) and its "
                       "GPU pools. Generated by deployments/monitoring/build_dashboard.py.",
        "tags": ["srserve", "ray", "ray-serve"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-3h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "links": [],
        "annotations": {"list": []},
        "templating": {"list": [
            {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            query_variable("cluster", "Ray cluster", "label_values(ray_serve_deployment_replica_healthy, "
                                                     "ray_io_cluster)", None, True),
            query_variable("application", "Serve application",
                           'label_values(ray_serve_deployment_replica_healthy{ray_io_cluster=~"$cluster"}, '
                           "application)", "srserve", False),
        ]},
        "panels": layout.panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the JSON file is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
