"""Step caches on top of SR: speedup over SR alone and quality, on srd-tiny, measured side by side in one process.

For every held-out prompt x seed pair, alternating: `none` (the large model alone: the PSNR reference), SR alone
(the model's default switch), then SR with each cache kind on the render and/or the sketch model. Each run is one
request at a time (batch 1); seconds cover denoising (sketch + render). MagCache's ratios are calibrated first on
a calibration seed (never a reported one). Cache parameters are diffusers' defaults unless `--cache-params` says.

    .venv/bin/python benchmarks/cache_compare.py --videos 64 --doc docs/srd-tiny.md
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from srserve.config import CACHE_DEFAULTS, CacheConfig, GenerationRequest
from srserve.pipeline.caches import calibrate_mag_ratios
from srserve.pipeline.engine import SREngine
from srserve.pipeline.spec import resolve_model_spec
from srserve.tiny.evaluate import score_video, summarize
from srserve.tiny.metrics import psnr
from srserve.tiny import quality
from srserve.tiny.quality import CALIBRATION_SEED_BASE, held_out_pairs

MARK_START, MARK_END = "<!-- cache-compare:start -->", "<!-- cache-compare:end -->"


def stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def cache_configs(kinds: list[str], roles: list[str], params: dict[str, dict], mag_ratios: dict[str, list[float]]
                  ) -> dict[str, dict[str, CacheConfig]]:
    """Configuration name -> {"sketch_cache" / "render_cache": CacheConfig}; "sr" has none."""
    configs: dict[str, dict[str, CacheConfig]] = {"sr": {}}
    for kind in kinds:
        for role in roles:
            targets = ("sketch", "render") if role == "both" else (role,)
            configs[f"{kind}@{role}"] = {
                f"{r}_cache": CacheConfig(kind=kind, **params.get(kind, {}),
                                          **({"mag_ratios": mag_ratios[r]} if kind == "mag" else {}))
                for r in targets}
    return configs


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = resolve_model_spec(args.model)
    base = SREngine.load(spec, roles=("encode", "decode", "sketch"))  # `none` runs on it
    default = base.resolve(GenerationRequest(prompt="a red circle moving right", num_inference_steps=args.steps))
    needs_mag = "mag" in args.kinds
    calibration = GenerationRequest(prompt=held_out_pairs(1)[0][0], seed=CALIBRATION_SEED_BASE,
                                    num_inference_steps=default.num_inference_steps)
    mag_ratios = {r: calibrate_mag_ratios(spec, r, calibration) for r in ("sketch", "render")} if needs_mag else {}
    configs = cache_configs(args.kinds, args.roles, args.cache_params, mag_ratios)
    engines = {name: SREngine.load(spec.model_copy(update=caches), roles=("sketch", "render"))
               for name, caches in configs.items()}
    names = ["none", *configs]
    seconds: dict[str, list[float]] = {n: [] for n in names}
    steps: dict[str, list[int]] = {n: [] for n in names}
    videos: dict[str, dict[int, np.ndarray]] = {n: {} for n in names}
    pairs = held_out_pairs(args.videos)
    embeddings: dict[str, Any] = {}
    warm = default.model_copy(update={"switch": "step:2"})
    for engine in engines.values():  # allocations, lazy inits
        engine.render(engine.sketch(base.prepare(warm, base.encode(warm))))
    for repeat in range(args.repeats):
        for index, (prompt, seed) in enumerate(pairs):
            request = base.resolve(GenerationRequest(prompt=prompt, seed=seed,
                                                     num_inference_steps=default.num_inference_steps))
            if prompt not in embeddings:
                embeddings[prompt] = base.encode(request)
            shift = (index + repeat) % len(names)  # alternate, rotating the order: no configuration always
            for name in names[shift:] + names[:shift]:  # follows the long `none` run or goes first
                engine = base if name == "none" else engines[name]
                req = request.model_copy(update={"switch": "none"}) if name == "none" else request
                state = base.prepare(req, embeddings[prompt])
                sync()
                began = time.perf_counter()
                state = engine.render(engine.sketch(state)) if name != "none" else engine.sketch(state)
                sync()
                seconds[name].append(time.perf_counter() - began)
                if repeat == 0:
                    steps[name].append(int(state.switch_step))
                    videos[name][index] = base.decode(state)
    rows = []
    sr_median = statistics.median(seconds["sr"])
    for name in names:
        scores = [score_video(videos[name][i], prompt, videos["none"][i]) for i, (prompt, _) in enumerate(pairs)]
        paired = [s / c for s, c in zip(seconds["sr"], seconds[name])]  # same pair, same repeat
        rows.append({
            "config": name, **summarize(scores),
            "psnr_vs_sr": float(np.mean([psnr(videos[name][i], videos["sr"][i]) for i in range(len(pairs))])),
            "large_steps_mean": float(np.mean(steps[name])), "denoise_seconds": stats(seconds[name]),
            "speedup_vs_sr": sr_median / statistics.median(seconds[name]), "speedup_vs_sr_paired": stats(paired),
            "caches": {k: v.params() for k, v in configs.get(name, {}).items()},
        })
    return {
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "model": spec.name,
        "steps": default.num_inference_steps, "switch": default.switch,
        "size": f"{default.width}x{default.height}x{default.num_frames}", "videos": args.videos,
        "repeats": args.repeats, "mag_ratios": mag_ratios, "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{result['videos']} held-out pairs x {result['repeats']} repeat(s), model `{result['model']}`, "
        f"{result['steps']} steps, {result['size']}, SR switch `{result['switch']}`, {result['threads']} torch "
        "thread(s), one request at a time. Accuracy in %; PSNR against the `none` (large-only) video of the same "
        "seed and against SR alone; seconds = denoising per video (median [min, max]); speedup = SR's median "
        "seconds / the configuration's (paired per video: median [min, max]). Cache parameters: diffusers' "
        "defaults unless noted in the JSON.",
        "",
        "| config | color | shape | motion | all three | PSNR vs none | PSNR vs SR | large steps | seconds "
        "| speedup vs SR |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        s, p = r["denoise_seconds"], r["speedup_vs_sr_paired"]
        vs_none = "ref" if r["config"] == "none" else f"{r['psnr']:.1f}"
        lines.append(
            f"| `{r['config']}` | {r['color_acc']:.1f} | {r['shape_acc']:.1f} | {r['motion_acc']:.1f} "
            f"| {r['all_acc']:.1f} | {vs_none} | {r['psnr_vs_sr']:.1f} | {r['large_steps_mean']:.1f} "
            f"| {s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}] "
            f"| {r['speedup_vs_sr']:.2f}x [{p['min']:.2f}, {p['max']:.2f}] |")
    return "\n".join(lines)


def write_doc(doc: Path, table: str, command: str) -> None:
    """Replace the cache-compare block of `doc` (appended under its own heading the first time)."""
    quality.write_doc(doc, table, command, (MARK_START, MARK_END), "Step caches on top of SR")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled srd-tiny")
    parser.add_argument("--videos", type=int, default=64, help="held-out prompt x seed pairs")
    parser.add_argument("--repeats", type=int, default=1, help="timing passes over the pairs (quality: the first)")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--kinds", default=",".join(CACHE_DEFAULTS), help="cache kinds, comma-separated")
    parser.add_argument("--roles", default="render,sketch", help="render, sketch and/or both, comma-separated")
    parser.add_argument("--cache-params", default="{}", help='JSON per kind, e.g. \'{"sea": {"threshold": 0.1}}\'')
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/cache_compare.json")
    parser.add_argument("--doc", default=None, help="markdown file whose cache-compare block is replaced")
    args = parser.parse_args(argv)
    args.kinds, args.roles = args.kinds.split(","), args.roles.split(",")
    args.cache_params = json.loads(args.cache_params)
    if args.model is None:
        from srserve.tiny import default_model_path

        args.model = default_model_path()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    result = run(args)
    result["wall_seconds"] = time.perf_counter() - began
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    print(table)
    if args.doc:
        shown = sys.argv[1:] if argv is None else argv
        write_doc(Path(args.doc), table, ".venv/bin/python benchmarks/cache_compare.py " + " ".join(shown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
