"""Writes srserve-grafana-dashboard.json: srserve's Grafana dashboard, import-ready, from this one source.

    python deployments/monitoring/build_dashboard.py          # rewrite the JSON next to this file
    python deployments/monitoring/build_dashboard.py --check  # exit 1 if the JSON is out of date

Four sections: Overview (request rate, job latency p50/p95/p99, failures and refusals by reason, SLO attainment,
jobs in flight), Stages (waiting, in flight, batch size, step and stage latency, switch steps, handoffs, prompt
cache, job store), GPUs (utilisation, memory, power per pool) and Capacity (running vs target replicas per stage,
from Ray Serve's own series, and the SLO controller's switch cap and p95s). srserve's series are those
srserve/serving/metrics.py defines, as Ray exports them (`ray_srserve_*`); Ray's are on the allowlist of tests/test_monitoring.py. Variables: `$datasource`, `$cluster`
(the `ray_io_cluster` label KubeRay's PodMonitors add; absent, and so matched, locally), `$application`,
`$stage` (multi-value; it also selects Ray Serve's deployments of the same name) and `$slo` (seconds, one of the
job-latency bucket bounds).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("srserve-grafana-dashboard.json")
APP = 'application=~"$application",ray_io_cluster=~"$cluster"'
STAGE = f'{APP},stage=~"$stage"'
DEPLOY = f'{APP},deployment=~"(?i)$stage"'  # Serve's deployments are the stages, capitalised
CLUSTER = 'ray_io_cluster=~"$cluster"'
RATE = "[$__rate_interval]"
# The Ingress also answers the health probes (/readyz from every worker pod's readiness probe, /healthz).
NOT_PROBES = 'route!~"/readyz|/healthz|/-/.*"'
# Bounds of the job_seconds buckets, written as Prometheus writes `le`.
SLO_CHOICES = ("10.0", "20.0", "30.0", "60.0", "120.0", "300.0", "600.0", "1200.0", "1800.0", "3600.0")
SECTIONS = ("Overview", "Stages", "GPUs", "Capacity")
PER_GPU = "max by (pool, instance, gpu)"  # replicas sharing a GPU report it once each


class Layout:
    """Hands out panel ids and grid positions, row by row (Grafana's grid is 24 units wide)."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.next_id, self.y = 1, 0

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
    source = {"type": "prometheus", "uid": "${datasource}"}
    return {"type": "timeseries", "title": title, "description": description, "datasource": source,
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
            "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend, "range": True,
                         "datasource": source} for i, (expr, legend) in enumerate(targets)]}


def q(quantile: float, metric: str, selector: str, by: str = "") -> str:
    """histogram_quantile over a srserve or Ray histogram (`metric` without `_bucket`)."""
    group = f"le, {by}" if by else "le"
    return f"histogram_quantile({quantile}, sum by ({group}) (rate({metric}_bucket{{{selector}}}{RATE})))"


def quantiles(metric: str, selector: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.95)) -> list:
    prefix = "".join(f"{{{{{label.strip()}}}}} " for label in by.split(",")) if by else ""
    return [(q(x, metric, selector, by), f"{prefix}p{round(x * 100)}") for x in qs]


def overview(layout: Layout) -> None:
    layout.row("Overview")
    layout.line(
        timeseries("Jobs / s", [
            (f"sum(rate(ray_srserve_jobs_created_total{{{APP}}}{RATE}))", "created"),
            (f"sum by (status) (rate(ray_srserve_jobs_ended_total{{{APP}}}{RATE}))", "{{status}}")],
            unit="reqps", description="Jobs admitted, and jobs ended by status."),
        timeseries("Job latency p50 / p95 / p99", quantiles("ray_srserve_job_seconds", f'{APP},status="completed"',
                                                            qs=(0.5, 0.95, 0.99)),
                   unit="s", description="Created to completed, queueing included."),
        timeseries("Failures, refusals and retries / s by reason", [
            (f'sum by (reason) (rate(ray_srserve_jobs_ended_total{{{APP},status!="completed"}}{RATE}))',
             "failed: {{reason}}"),
            (f"sum by (reason) (rate(ray_srserve_admission_refusals_total{{{APP}}}{RATE}))", "refused: {{reason}}"),
            (f"sum by (reason) (rate(ray_srserve_job_retries_total{{{APP}}}{RATE}))", "retried: {{reason}}")],
            unit="reqps", description="Refused: 429/503 at admission (queue_full, quota, deadline, not_ready...)."),
        timeseries("SLO attainment (completed within $slo s)", [
            (f'sum(rate(ray_srserve_job_seconds_bucket{{{APP},status="completed",le="$slo"}}{RATE})) / '
             f"sum(rate(ray_srserve_job_seconds_count{{{APP}}}{RATE}))", "within SLO")],
            unit="percentunit", max_value=1, description="Share of ended jobs that completed within $slo seconds "
                                                         "(failed and cancelled ones count as misses)."),
    )
    layout.line(
        timeseries("Jobs in flight", [
            (f"sum(ray_srserve_jobs_in_flight{{{APP}}})", "jobs"),
            (f"sum(ray_srserve_flex_jobs_in_flight{{{APP}}})", "of them on flex replicas"),
            (f"sum(ray_serve_num_ongoing_http_requests{{{CLUSTER}}})", "HTTP requests at the proxies")]),
        timeseries("Queue wait and time to first progress", [
            *quantiles("ray_srserve_job_queue_seconds", APP),
            *[(e, f"first progress {leg}") for e, leg in quantiles("ray_srserve_job_first_progress_seconds", APP)]],
            unit="s", description="Created to first stage start (queue), and to the first denoising step done."),
        timeseries("HTTP requests / s by status", [
            (f"sum by (status_code) (rate(ray_serve_num_http_requests_total{{{APP},{NOT_PROBES}}}{RATE}))",
             "{{status_code}}")], unit="reqps", stack=True, description="Serve's proxies; health probes excluded."),
        timeseries("HTTP latency p50 / p95 / p99", quantiles("ray_serve_http_request_latency_ms",
                                                             f"{APP},{NOT_PROBES}", qs=(0.5, 0.95, 0.99)),
                   unit="ms", description="At the proxy: creating a job returns at once; downloads stream."),
    )


def stages(layout: Layout) -> None:
    layout.row("Stages")
    layout.line(
        timeseries("Waiting to join a batch", [
            (f"sum by (stage) (ray_srserve_stage_requests_waiting{{{STAGE}}})", "{{stage}}")],
            description="Received by a replica, not yet in its batch: up for long = scale this stage."),
        timeseries("In flight (in a batch)", [
            (f"sum by (stage) (ray_srserve_stage_requests_in_flight{{{STAGE}}})", "{{stage}}")], stack=True),
        timeseries("Batch size", quantiles("ray_srserve_stage_batch_size", STAGE, "stage"),
                   description="Requests per forward pass."),
        timeseries("Switch step k by policy", quantiles("ray_srserve_job_switch_step", APP, "policy",
                                                        qs=(0.1, 0.5, 0.9)),
                   description="Sketch steps before the render model takes over (0: small-only)."),
    )
    layout.line(
        timeseries("Step latency by role", quantiles("ray_srserve_step_seconds", STAGE, "stage, role"), unit="s",
                   description="One forward pass of the batch: c_L per sketch step, c_S per render step."),
        timeseries("Stage latency", quantiles("ray_srserve_stage_seconds", f'{STAGE},outcome="ok"', "stage"),
                   unit="s", description="One request through the stage: k c_L (sketch), (N-k) c_S (render)."),
        timeseries("Handoff bytes per hop", quantiles("ray_srserve_handoff_bytes", APP, "hop"), unit="bytes"),
        timeseries("Handoff seconds per hop and phase (p95)", [
            (q(0.95, "ray_srserve_handoff_seconds", APP, "hop, phase"), "{{hop}} {{phase}}")], unit="s",
            description="serialize (sender), transit (object store, and the wait for a replica), deserialize."),
    )
    layout.line(
        timeseries("Prompt-cache hit ratio", [
            (f"sum(rate(ray_srserve_prompt_cache_hits_total{{{STAGE}}}{RATE})) / "
             f"(sum(rate(ray_srserve_prompt_cache_hits_total{{{STAGE}}}{RATE})) + "
             f"sum(rate(ray_srserve_prompt_cache_misses_total{{{STAGE}}}{RATE})))", "hits")],
            unit="percentunit", max_value=1),
        timeseries("Job-store operation latency (p95)", [
            (q(0.95, "ray_srserve_store_op_seconds", APP, "op"), "{{op}}")], unit="s"),
        height=7,
    )


def gpus(layout: Layout) -> None:
    layout.row("GPUs")
    util = f"{PER_GPU} (ray_srserve_gpu_utilization_percent{{{APP}}})"
    layout.line(
        timeseries("GPU utilisation per pool", [(f"avg by (pool) ({util})", "{{pool}}")], unit="percent",
                   max_value=100, description="NVML, sampled by each replica for the GPUs it was given."),
        timeseries("GPU utilisation per GPU", [(util, "{{pool}} {{instance}} gpu {{gpu}}")], unit="percent",
                   max_value=100),
        timeseries("GPU memory used per pool", [
            (f"sum by (pool) ({PER_GPU} (ray_srserve_gpu_memory_used_bytes{{{APP}}})) / sum by (pool) "
             f"({PER_GPU} (ray_srserve_gpu_memory_total_bytes{{{APP}}}))", "{{pool}}")],
            unit="percentunit", max_value=1),
        timeseries("GPU power per pool", [
            (f"sum by (pool) ({PER_GPU} (ray_srserve_gpu_power_watts{{{APP}}}))", "{{pool}}")], unit="watt"),
    )
    layout.line(
        timeseries("GPU temperature (hottest per pool)", [
            (f"max by (pool) (ray_srserve_gpu_temperature_celsius{{{APP}}})", "{{pool}}")], unit="celsius"),
        timeseries("GPU samplers", [
            (f"sum by (pool) (ray_srserve_gpu_sampler_up{{{APP}}})", "{{pool}} running"),
            (f"count by (pool) (ray_srserve_gpu_sampler_up{{{APP}}})", "{{pool}} replicas")],
            description="Replicas whose NVML sampler runs, of all that reported (0 running: no NVML, e.g. CPU)."),
        timeseries("Ray node GPU utilisation (cross-check)", [
            (f"ray_node_gpus_utilization{{{CLUSTER}}}", "{{ray_io_group}} {{ip}} GPU {{GpuIndex}}")],
            unit="percent", max_value=100, description="Ray's own per-node NVML reading, every GPU of the node."),
        height=7,
    )


def capacity(layout: Layout) -> None:
    layout.row("Capacity")
    layout.line(
        timeseries("Replicas: running vs target", [
            (f"sum by (deployment) (ray_serve_deployment_replica_healthy{{{DEPLOY}}})", "{{deployment}} running"),
            (f"max by (deployment) (ray_serve_autoscaling_target_replicas{{{DEPLOY}}})", "{{deployment}} target"),
            (f"max by (deployment) (ray_serve_autoscaling_desired_replicas{{{DEPLOY}}})",
             "{{deployment}} decision")],
            description="Target above running for long: the pool's worker group is at maxReplicas or its pods "
                        "cannot be scheduled. Target and decision exist for autoscaled deployments only."),
        timeseries("Ongoing and queued requests", [
            (f"sum by (deployment) (ray_serve_replica_processing_queries{{{DEPLOY}}})", "{{deployment}} ongoing"),
            (f"sum by (deployment) (ray_serve_deployment_queued_queries{{{DEPLOY}}})", "{{deployment}} queued")],
            description="Queued: waiting in the callers' routers for a free replica slot (max_ongoing_requests)."),
        timeseries("Requests / s per deployment", [
            (f"sum by (deployment) (rate(ray_serve_deployment_request_counter_total{{{DEPLOY},{NOT_PROBES}}}"
             f"{RATE}))", "{{deployment}}"),
            (f"sum by (deployment) (rate(ray_serve_deployment_error_counter_total{{{DEPLOY}}}{RATE}))",
             "{{deployment}} errors")], unit="reqps"),
    )
    layout.line(
        timeseries("Serve processing latency p95 per deployment", [
            (q(0.95, "ray_serve_deployment_processing_latency_ms", f"{DEPLOY},{NOT_PROBES}", "deployment"),
             "{{deployment}}")], unit="ms"),
        timeseries("Pool units in use", [
            (f'sum by (Name) (ray_resources{{Name=~".*_pool",State="USED",{CLUSTER}}})', "{{Name}} used"),
            (f'sum by (Name) (ray_resources{{Name=~".*_pool",{CLUSTER}}})', "{{Name}} total")],
            description="Ray's accounting of the pool resources (one unit per GPU): used = total with a queue "
                        "above means the worker group needs more pods."),
        height=7,
    )
    # The SLO controller (AppArgs.slo): each ingress replica exports its own state, so max over replicas.
    layout.line(
        timeseries("SLO controller: switch cap", [
            (f"max by (model) (ray_srserve_switch_cap_steps{{{APP}}})", "{{model}} cap (sketch steps)"),
            (f"max by (model) (ray_srserve_slo_threatened{{{APP}}})", "{{model}} threatened")],
            description="Sketch steps new jobs are capped at (-1: no cap), and 1 while the p95 threatens the SLO. "
                        "A client's fixed switch is never capped."),
        timeseries("SLO controller: observed vs projected p95", [
            (f"max by (model) (ray_srserve_slo_observed_latency_seconds{{{APP}}})", "{{model}} observed p95"),
            (f"max by (model) (ray_srserve_slo_projected_latency_seconds{{{APP}}})", "{{model}} projected p95")],
            unit="s", description="Observed: completed jobs since the cap last moved; projected: admission's "
                                  "estimate for the jobs created since the last tick."),
        height=7,
    )


def variable(name: str, label: str, query: str, default: str | None, include_all: bool, multi: bool = False
             ) -> dict[str, Any]:
    if multi:  # Grafana's form for a multi-value variable set to All
        current: dict[str, Any] = {"selected": True, "text": ["All"], "value": ["$__all"]}
    else:
        current = {"selected": True, "text": default, "value": default} if default else {}
    return {"type": "query", "name": name, "label": label, "datasource": {"type": "prometheus",
                                                                          "uid": "${datasource}"},
            "definition": query, "query": {"query": query, "refId": f"{name}-values"}, "refresh": 2,
            "includeAll": include_all, "allValue": ".*" if include_all else None, "multi": multi,
            "current": current, "sort": 1, "hide": 0}


def dashboard() -> dict[str, Any]:
    layout = Layout()
    for section in (overview, stages, gpus, capacity):
        section(layout)
    slo = {"type": "custom", "name": "slo", "label": "SLO (s)", "query": ",".join(SLO_CHOICES), "hide": 0,
           "current": {"selected": True, "text": "60.0", "value": "60.0"}, "multi": False, "includeAll": False,
           "options": [{"selected": c == "60.0", "text": c, "value": c} for c in SLO_CHOICES]}
    return {
        "uid": "srserve",
        "title": "srserve: Sketching-Rendering video serving",
        "description": "srserve's jobs, stages, GPUs and capacity. Generated by "
                       "deployments/monitoring/build_dashboard.py.",
        "tags": ["srserve", "ray", "ray-serve"],
        "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 2,
        "time": {"from": "now-3h", "to": "now"}, "refresh": "30s", "timezone": "",
        "links": [], "annotations": {"list": []},
        "templating": {"list": [
            {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            variable("cluster", "Ray cluster", "label_values(ray_serve_deployment_replica_healthy, ray_io_cluster)",
                     None, True),
            variable("application", "Serve application", 'label_values(ray_serve_deployment_replica_healthy'
                     '{ray_io_cluster=~"$cluster"}, application)', "srserve", False),
            variable("stage", "Stage", 'label_values(ray_srserve_stage_requests_in_flight'
                     '{application=~"$application"}, stage)', None, True, multi=True),
            slo,
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
