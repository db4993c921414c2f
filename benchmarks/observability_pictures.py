"""Draws the dashboard's main panels from a real local run: docs/img/observability-{overview,stages,capacity}.png.

    .venv/bin/python benchmarks/observability_pictures.py            # about 4 minutes on 2 CPU cores
    .venv/bin/python benchmarks/observability_pictures.py --seconds 60 --out /tmp/pictures

It starts the app with `srserve serve` (srd-tiny on CPU, the local pools, render autoscaled 1..2; see
benchmarks/observed_app.py), a real Prometheus scraping it, runs an open-loop load (mixed prompts, sizes and
switch policies, some invalid requests, some cancelled jobs; 429s when more than `max_pending_jobs` are in flight),
then draws each chosen panel of deployments/monitoring/srserve-grafana-dashboard.json from Prometheus'
`query_range`: the panel's own PromQL and legends, the dashboard's variables filled in as Grafana would. Grafana
is not needed (nor installed here). GPU panels are left out: on CPU the sampler only says it is off.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from observed_app import ROOT, LocalApp, app_config, steady_load  # noqa: E402

DASHBOARD = ROOT / "deployments" / "monitoring" / "srserve-grafana-dashboard.json"
FIGURES = {
    "overview": ("Jobs / s", "Job latency p50 / p95 / p99", "Failures, refusals and retries / s by reason",
                 "Jobs in flight", "Queue wait and time to first progress", "SLO attainment (completed within $slo s)"),
    "stages": ("Waiting to join a batch", "In flight (in a batch)", "Batch size", "Switch step k by policy",
               "Step latency by role", "Stage latency", "Handoff bytes per hop",
               "Handoff seconds per hop and phase (p95)"),
    "capacity": ("Replicas: running vs target", "Ongoing and queued requests", "Requests / s per deployment",
                 "Pool units in use", "Job-store operation latency (p95)", "Prompt-cache hit ratio"),
}
UNITS = {"s": "seconds", "ms": "milliseconds", "bytes": "bytes", "reqps": "per second", "percentunit": "share",
         "percent": "%", "short": ""}


def panels() -> dict[str, dict[str, Any]]:
    top = json.loads(DASHBOARD.read_text())["panels"]
    return {p["title"]: p for parent in top for p in [parent, *parent.get("panels", [])] if p["type"] != "row"}


def fill(expr: str, variables: dict[str, str]) -> str:
    for name, value in variables.items():
        expr = expr.replace(name, value)
    return expr


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip() or "value"


def draw(name: str, titles: tuple[str, ...], series: dict[str, list], t0: float, out: Path,
         variables: dict[str, str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3 if len(titles) % 3 == 0 else 4
    rows = math.ceil(len(titles) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    all_panels = panels()
    for ax, title in zip(axes.flat, titles):
        unit = all_panels[title]["fieldConfig"]["defaults"].get("unit", "short")
        for label, points in series[title]:
            xs = [(t - t0) / 60 for t, _ in points]
            ys = [v for _, v in points]
            ax.plot(xs, ys, label=label, linewidth=1.3)
        ax.set_title(fill(title, variables), fontsize=10)
        ax.set_xlabel("minutes into the run", fontsize=8)
        ax.set_ylabel(UNITS.get(unit, unit), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if unit in ("bytes",):
            ax.set_yscale("log")
        if series[title]:
            ax.legend(fontsize=6, loc="upper left", ncol=2 if len(series[title]) > 4 else 1)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(titles):]:
        ax.axis("off")
    fig.suptitle(f"srserve dashboard, {name} (srd-tiny on CPU, local Ray cluster, Prometheus query_range)",
                 fontsize=11)
    fig.tight_layout()
    path = out / f"observability-{name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=150.0, help="length of the load (default 150)")
    parser.add_argument("--rate", type=float, default=0.6, help="job arrivals per second (default 0.6)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"), help="where the PNGs go (default docs/img)")
    parser.add_argument("--workdir", default=None, help="app and Prometheus files (default: a temporary dir)")
    opts = parser.parse_args(argv)
    from srserve.serving.prom import PrometheusServer, scrape_config

    began = time.monotonic()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(opts.workdir or tempfile.mkdtemp(prefix="srserve-pictures-"))
    # Eager enough that this light load scales render up once (and back down): the capacity panel has a story.
    autoscaling = {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1, "target_ongoing_requests": 0.3,
                   "upscale_delay_s": 5, "downscale_delay_s": 45, "metrics_interval_s": 1,
                   "look_back_period_s": 10}
    config = app_config(work / "app", app="srserve", max_pending_jobs=4, render_autoscaling=autoscaling)
    step_s, window = 3.0, "30s"
    variables = {"$__rate_interval": window, "$application": "srserve", "$cluster": ".*", "$stage": ".*",
                 "$slo": "10.0"}
    with LocalApp(config, work / "app") as app:
        print(f"app ready at {app.url} after {time.monotonic() - began:.0f}s; metrics at {app.metrics}", flush=True)
        with PrometheusServer(scrape_config(app.metrics, interval_s=1.0), workdir=work / "prometheus") as prom:
            t0 = time.time()
            steady_load(app, opts.seconds, opts.rate)
            time.sleep(8)  # the last reports and scrapes
            t1 = time.time()
            series: dict[str, list] = {}
            all_panels = panels()
            for titles in FIGURES.values():
                for title in titles:
                    series[title] = []
                    for target in all_panels[title]["targets"]:
                        data = prom.api("query_range", query=fill(target["expr"], variables), start=f"{t0:.3f}",
                                        end=f"{t1:.3f}", step=f"{step_s:g}")
                        for result in data["result"]:
                            points = [(float(t), float(v)) for t, v in result["values"]]
                            points = [(t, v) for t, v in points if math.isfinite(v)]
                            if points:
                                series[title].append((legend(target.get("legendFormat", ""), result["metric"]),
                                                      points))
    for name, titles in FIGURES.items():
        print(f"wrote {draw(name, titles, series, t0, out, variables)}")
    empty = [t for t, s in series.items() if not s]
    if empty:
        print(f"panels without data: {empty}")
    print(f"done in {time.monotonic() - began:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
