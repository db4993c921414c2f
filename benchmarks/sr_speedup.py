"""Single-request SR speedup against the compute-bound limit, measured side by side in one process.

For each repeat, alternating: per-step seconds of the sketch and render models (one guided step each), then a
full `none` run and each SR policy. Reports the denoising speedup over `none`, the limit N / (k + (N - k) / r)
from the per-step costs measured in the same run, and their ratio.

    .venv/bin/python benchmarks/sr_speedup.py --repeats 5 --out benchmarks/results/sr_speedup.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from srserve.config import GenerationRequest
from srserve.pipeline.engine import DenoiseBatch, SREngine
from srserve.pipeline.spec import resolve_model_spec
from srserve.tiny import default_model_path


def stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def sync() -> None:
    """Wait for queued GPU work, so a timing covers it (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def per_step_seconds(engine: SREngine, state, role: str, steps: int = 3) -> float:
    """Median seconds of one guided denoising step of `role`, on a step-0 state."""
    times = []
    for _ in range(steps):
        batch = DenoiseBatch(engine.family, role)
        batch.add("x", state.replace(switch_step=state.num_steps))
        sync()
        began = time.perf_counter()
        batch.step()
        sync()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--policies", default="step:4,step:6,step:8,adaptive")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt", default="a red circle moving right")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = resolve_model_spec(args.model or default_model_path())
    engine = SREngine.load(spec)
    policies = ["none"] + args.policies.split(",")
    runs: dict[str, list[dict]] = {p: [] for p in policies}
    step_costs: dict[str, list[float]] = {"sketch": [], "render": []}
    request = engine.resolve(GenerationRequest(prompt=args.prompt, num_inference_steps=args.steps, seed=0))
    engine.generate(request.model_copy(update={"switch": "step:2"}))  # warm-up: allocations, lazy inits
    for _ in range(args.repeats):
        state0 = engine.prepare(request, engine.encode(request))
        for role in ("sketch", "render"):
            step_costs[role].append(per_step_seconds(engine, state0, role))
        for policy in policies:
            result = engine.generate(request.model_copy(update={"switch": policy}))
            t = result.timings
            runs[policy].append({"switch_step": result.switch_step,
                                 "denoise_seconds": t["sketch_seconds"] + t["render_seconds"],
                                 "total_seconds": t["total_seconds"]})
    sketch_step = statistics.median(step_costs["sketch"])
    render_step = statistics.median(step_costs["render"])
    r = sketch_step / render_step
    n = request.num_inference_steps
    base_denoise = statistics.median(x["denoise_seconds"] for x in runs["none"])
    base_total = statistics.median(x["total_seconds"] for x in runs["none"])
    rows = []
    for policy in policies[1:]:
        k = statistics.median(x["switch_step"] for x in runs[policy])
        limit = n / (k + (n - k) / r)
        speedups = [base_denoise / x["denoise_seconds"] for x in runs[policy]]
        speedup = base_denoise / statistics.median(x["denoise_seconds"] for x in runs[policy])
        rows.append({
            "policy": policy, "switch_step": k, "limit": limit, "denoise_speedup": speedup,
            "denoise_speedup_repeats": stats(speedups), "fraction_of_limit": speedup / limit,
            "end_to_end_speedup": base_total / statistics.median(x["total_seconds"] for x in runs[policy]),
        })
    report = {
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__, "threads": args.threads, "model": spec.name, "model_path": spec.base_path,
        "steps": n, "size": f"{request.width}x{request.height}", "frames": request.num_frames,
        "repeats": args.repeats, "sketch_step_seconds": stats(step_costs["sketch"]),
        "render_step_seconds": stats(step_costs["render"]), "per_step_ratio_r": r,
        "none_denoise_seconds": stats([x["denoise_seconds"] for x in runs["none"]]), "policies": rows,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
