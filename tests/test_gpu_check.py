"""The CPU-side parts of the GPU check (benchmarks/gpu/observability.py, run by benchmarks/gpu/run.sh): the Serve
config it runs on `cuda`, and the check of one scrape's GPU series, on exposition text as Ray's agent writes it."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
from observability import GAUGES, check_gpu_series, gpu_config  # noqa: E402

from srserve.serving.args import AppArgs  # noqa: E402
from srserve.serving.prom import parse_exposition  # noqa: E402
from srserve.serving.runner import pool_resources  # noqa: E402


def exposition(pools=("sketch_pool", "render_pool"), up=1, drop=None, temperature=45.0) -> str:
    lines = []
    for name in ("ray_srserve_gpu_sampler_up", *GAUGES):
        lines.append(f"# TYPE {name} gauge")
    for pool in pools:
        common = f'application="srserve",deployment="Sketch",replica="r1",pool="{pool}"'
        lines.append(f"ray_srserve_gpu_sampler_up{{{common}}} {up}")
        values = {"ray_srserve_gpu_utilization_percent": 37.0, "ray_srserve_gpu_memory_used_bytes": 2.0e9,
                  "ray_srserve_gpu_memory_total_bytes": 1.4e11, "ray_srserve_gpu_power_watts": 120.5,
                  "ray_srserve_gpu_temperature_celsius": temperature}
        for name, value in values.items():
            if name != drop:
                lines.append(f'{name}{{{common},gpu="0"}} {value}')
    return "\n".join(lines) + "\n"


def test_a_complete_scrape_passes():
    problems, found = check_gpu_series(parse_exposition(exposition()))
    assert problems == []
    assert found["sampler_up"] == {"sketch_pool": 1.0, "render_pool": 1.0}
    assert found["ray_srserve_gpu_power_watts"] == {"sketch_pool/0": 120.5, "render_pool/0": 120.5}


def test_missing_or_implausible_series_are_named():
    problems, _ = check_gpu_series(parse_exposition(exposition(drop="ray_srserve_gpu_power_watts")))
    assert problems == ["ray_srserve_gpu_power_watts: no sample for pool 'sketch_pool'",
                        "ray_srserve_gpu_power_watts: no sample for pool 'render_pool'"]
    problems, _ = check_gpu_series(parse_exposition(exposition(up=0, temperature=0.0)))
    assert any("sampler_up" in p and "expected 1" in p for p in problems)
    assert any("temperature" in p and "outside" in p for p in problems)
    problems, _ = check_gpu_series(parse_exposition(exposition(pools=("render_pool",))))
    assert any("'sketch_pool'" in p for p in problems)


def test_the_gpu_config_is_a_valid_app_on_cuda(tmp_path):
    config = gpu_config(tmp_path, {"name": "srd-tiny", "family": "wan", "base_path": str(tmp_path)})
    app = config["applications"][0]
    args = AppArgs.model_validate(app["args"])
    assert args.model.device == "cuda"
    assert all(options.num_gpus > 0 for options in args.stages().values())
    assert args.sketch.pool == "sketch_pool" and args.render.pool == "render_pool"
    assert pool_resources(config) == {"sketch_pool": 1.0, "render_pool": 1.0}


def test_run_sh_runs_the_check():
    script = (ROOT / "benchmarks" / "gpu" / "run.sh").read_text()
    assert "benchmarks/gpu/observability.py" in script and "observability.json" in script
