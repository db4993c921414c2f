"""The GPU part of issue 10's checks: the app on a GPU with the NVML sampler on, its GPU series scraped once.

    .venv/bin/python benchmarks/gpu/observability.py --out benchmarks/results/gpu/<device>/observability.json

`srserve serve` runs srd-tiny on `cuda` (every stage takes a 0.1 GPU share, so Ray gives each replica the GPU in
CUDA_VISIBLE_DEVICES; sketch on sketch_pool, encode/render/decode on render_pool, as on CPU), a few jobs
complete, and after two sampler periods the metrics endpoint `srserve serve` prints is scraped once (plain HTTP,
parsed with prometheus-client). Required, for both pools: `ray_srserve_gpu_sampler_up` 1 and every
`ray_srserve_gpu_*` gauge with a `gpu` label and a plausible value. Where the `prometheus` binary is installed,
the dashboard's GPU panels (those tests/test_observability_e2e.py exempts on CPU) are also evaluated through a
real Prometheus: srserve's must return data; Ray's own per-node cross-check is reported, not required (Ray's
agent reads NVML itself). Exit status 1 on a missing series; the JSON says what was found.

`check_gpu_series` and `gpu_config` are pure and unit-tested on CPU (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from observed_app import PROMPTS, Client, LocalApp, app_config, needs_gpu, panel_queries  # noqa: E402

POOLS = ("sketch_pool", "render_pool")
GAUGES = {  # series -> plausible range
    "ray_srserve_gpu_utilization_percent": (0.0, 100.0),
    "ray_srserve_gpu_memory_used_bytes": (0.0, math.inf),
    "ray_srserve_gpu_memory_total_bytes": (1.0, math.inf),
    "ray_srserve_gpu_power_watts": (0.0, 5000.0),
    "ray_srserve_gpu_temperature_celsius": (1.0, 150.0),
}
RAY_GPU_SERIES = "ray_node_gpus_utilization"


def gpu_config(work: Path, spec: dict[str, Any], gpu_share: float = 0.1) -> dict[str, Any]:
    """The CPU test's Serve config (benchmarks/observed_app.py), on `cuda`: the model spec inline with its device
    set, each stage a `gpu_share` of the GPU (Ray then sets CUDA_VISIBLE_DEVICES), render not autoscaled."""
    config = app_config(work, app="srserve", max_pending_jobs=16)
    args = config["applications"][0]["args"]
    args["model"] = {**spec, "device": "cuda"}
    for stage in ("encode", "sketch", "render", "decode"):
        args[stage]["num_gpus"] = gpu_share
    args["render"].pop("autoscaling_config", None)
    return config


def check_gpu_series(samples: list[Any], pools: tuple[str, ...] = POOLS) -> tuple[list[str], dict[str, Any]]:
    """(problems, what was found) for the samples of one scrape (`srserve.serving.prom.parse_exposition`)."""
    problems: list[str] = []
    found: dict[str, Any] = {}
    up = {s.labels.get("pool"): s.value for s in samples if s.name == "ray_srserve_gpu_sampler_up"}
    found["sampler_up"] = up
    for pool in pools:
        if up.get(pool) != 1.0:
            problems.append(f"ray_srserve_gpu_sampler_up{{pool={pool!r}}} is {up.get(pool)}, expected 1")
    for name, (low, high) in GAUGES.items():
        values = {(s.labels.get("pool"), s.labels.get("gpu")): s.value for s in samples if s.name == name}
        found[name] = {f"{pool}/{gpu}": value for (pool, gpu), value in values.items()}
        for pool in pools:
            mine = {gpu: v for (p, gpu), v in values.items() if p == pool}
            if not mine:
                problems.append(f"{name}: no sample for pool {pool!r}")
            for gpu, value in mine.items():
                if not gpu:
                    problems.append(f"{name}{{pool={pool!r}}}: no gpu label")
                if not low <= value <= high:
                    problems.append(f"{name}{{pool={pool!r},gpu={gpu!r}}} = {value}: outside [{low}, {high}]")
    used, total = found["ray_srserve_gpu_memory_used_bytes"], found["ray_srserve_gpu_memory_total_bytes"]
    for key, value in used.items():
        if key in total and value > total[key]:
            problems.append(f"GPU {key}: memory used {value} > total {total[key]}")
    return problems, found


def scrape(endpoint: str) -> str:
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10) as resp:
        return resp.read().decode()


def gpu_panels(variables: dict[str, str]) -> list[tuple[str, str]]:
    """The dashboard's panels that only a GPU gives data (exempt in the CPU test)."""
    return [(t, e) for t, e in panel_queries(variables) if needs_gpu(e)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON report")
    parser.add_argument("--jobs", type=int, default=4)
    opts = parser.parse_args(argv)
    from srserve.pipeline.spec import resolve_model_spec
    from srserve.serving.prom import PrometheusServer, parse_exposition, scrape_config
    from srserve.tiny import default_model_path

    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="srserve-gpu-observability-"))
    spec = resolve_model_spec(default_model_path()).model_dump(mode="json")
    report: dict[str, Any] = {"problems": []}
    app = LocalApp(gpu_config(work / "app", spec), work / "app", extra_args=["--num-gpus", "1"])
    with app:
        report["metrics_endpoints"] = app.metrics
        prom = None
        if shutil.which("prometheus"):
            prom = PrometheusServer(scrape_config(app.metrics, interval_s=1.0), workdir=work / "prometheus").start()
        try:
            client = Client(app.url)
            ids = [client.create(prompt=PROMPTS[i % len(PROMPTS)], seed=i, num_inference_steps=16,
                                 switch="step:8") for i in range(opts.jobs)]
            report["jobs"] = [client.finished(i, timeout_s=120)["status"] for i in ids]
            time.sleep(12)  # two sampler periods (5 s) and a metrics report
            problems, found = check_gpu_series(parse_exposition(scrape(app.metrics[0])))
            report["problems"] += problems
            report["found"] = found
            if prom is not None:
                variables = {"$__rate_interval": "1m", "$application": "srserve", "$cluster": ".*",
                             "$stage": ".*", "$slo": "60.0"}
                report["panels"] = {}
                for title, expr in gpu_panels(variables):
                    result = prom.query(expr)
                    report["panels"][title] = len(result)
                    if not result and RAY_GPU_SERIES not in expr:
                        report["problems"].append(f"panel {title!r}: no data from {expr}")
            else:
                report["panels"] = "prometheus binary not installed: panels not evaluated"
        finally:
            if prom is not None:
                prom.stop()
    report["seconds"] = round(time.monotonic() - began, 1)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("problems", "seconds")}))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
