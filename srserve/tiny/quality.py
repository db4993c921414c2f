"""The srd-tiny quality table: every switch policy on held-out prompt x seed pairs, scored by the evaluator.

    srserve tiny quality --videos 72 --out-json benchmarks/results/quality.json --doc docs/srd-tiny.md

Each pair is generated once per policy from the same seed; the prompt embeddings are computed once per prompt
(they are the same for every policy). Wall time per video covers denoising and decoding, measured one request at
a time. PSNR/SSIM compare each video with the `none` (large-only) video of the same seed.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import numpy as np

from srserve.config import GenerationRequest
from srserve.tiny.domain import all_prompts
from srserve.tiny.evaluate import score_video, summarize

# Generation seeds start far above anything training draws, so no pair was seen in training. Defaults (the
# bundle's switch policy, its step count) are chosen on the calibration seeds, never on the reported ones.
HELD_OUT_SEED_BASE = 1_000_000
CALIBRATION_SEED_BASE = 2_000_000
MARK_START, MARK_END = "<!-- quality-table:start -->", "<!-- quality-table:end -->"


def default_policies(steps: int, default_switch: str = "adaptive") -> list[str]:
    """A sweep: both ends, fixed splits at 10-50% of the steps, two ratios, and the model's default switch."""
    ks = sorted({max(1, round(steps * f)) for f in (0.1, 0.2, 0.3, 0.5)})
    last = default_switch if default_switch.startswith("adaptive") else "adaptive"
    return ["none", "small-only", *[f"step:{k}" for k in ks], "ratio:0.9", "ratio:0.8", last]


def held_out_pairs(count: int, seed_base: int = HELD_OUT_SEED_BASE) -> list[tuple[str, int]]:
    prompts = all_prompts()
    return [(prompts[i % len(prompts)], seed_base + i) for i in range(count)]


SAMPLE_PAIRS = (4, 21, 26, 43)  # a red square, a green triangle, a blue circle, a yellow square
SAMPLE_POLICIES = ("none", "small-only", "adaptive")
SAMPLE_FRAMES = (0, 4, 8, 12, 16)


def write_samples(path: Path, videos: dict[str, dict[int, np.ndarray]]) -> None:
    """A PNG grid: one block of rows per policy (`SAMPLE_POLICIES`), one row per sample pair, frames as columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gap, rows = 2, []
    # "adaptive" stands for the model's default adaptive switch, whatever its parameters
    chosen = [next((v for v in videos if v.split(":")[0] == p), None) for p in SAMPLE_POLICIES]
    for policy in (p for p in chosen if p is not None):
        for index in (i for i in SAMPLE_PAIRS if i in videos[policy]):
            video = videos[policy][index]
            frames = [np.pad(video[f], ((gap, gap), (gap, gap), (0, 0))) for f in SAMPLE_FRAMES if f < len(video)]
            rows.append(np.concatenate(frames, axis=1))
        rows.append(np.ones((3 * gap, rows[-1].shape[1], 3)))  # a white rule between policies
    grid = np.concatenate(rows[:-1], axis=0).clip(0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, grid.repeat(2, axis=0).repeat(2, axis=1))


def run_table(model: str | None, count: int, steps: int | None, policies: list[str] | None,
              seed_base: int = HELD_OUT_SEED_BASE, samples: Path | None = None) -> dict:
    import torch

    from srserve.pipeline.engine import SREngine
    from srserve.pipeline.spec import resolve_model_spec
    from srserve.tiny import default_model_path

    spec = resolve_model_spec(model or default_model_path())
    engine = SREngine.load(spec)
    steps = steps or engine.family.defaults.num_inference_steps
    policies = policies or default_policies(steps, str(spec.default_switch or "adaptive"))
    pairs = held_out_pairs(count, seed_base)
    embeddings = {}
    rows: dict[str, dict] = {p: {"scores": [], "switch_steps": [], "seconds": []} for p in policies}
    references: dict[int, np.ndarray] = {}
    for index, (prompt, seed) in enumerate(pairs):
        request = engine.resolve(GenerationRequest(prompt=prompt, seed=seed, num_inference_steps=steps))
        if prompt not in embeddings:
            embeddings[prompt] = engine.encode(request)
        for policy in policies:  # alternate policies per pair, so machine noise spreads evenly over them
            req = request.model_copy(update={"switch": policy})
            began = time.perf_counter()
            state = engine.render(engine.sketch(engine.prepare(req, embeddings[prompt])))
            frames = engine.decode(state)
            seconds = time.perf_counter() - began
            if policy == "none":
                references[index] = frames
            row = rows[policy]
            row["scores"].append((index, frames, prompt))
            row["switch_steps"].append(int(state.switch_step))
            row["seconds"].append(seconds)
    if samples is not None:
        write_samples(samples, {p: {i: f for i, f, _ in rows[p]["scores"] if i in SAMPLE_PAIRS} for p in policies})
    table = []
    for policy in policies:
        row = rows[policy]
        scores = [score_video(frames, prompt, references.get(index)) for index, frames, prompt in row["scores"]]
        summary = summarize(scores)
        table.append({
            "policy": policy, **summary,
            "large_steps_mean": float(np.mean(row["switch_steps"])),
            "seconds": {"min": min(row["seconds"]), "median": statistics.median(row["seconds"]),
                        "max": max(row["seconds"])},
        })
    base = next(r for r in table if r["policy"] == "none")["seconds"]["median"]
    for r in table:
        r["speedup_vs_none"] = base / r["seconds"]["median"]
    return {"model": spec.name, "videos": count, "steps": steps, "torch_threads": torch.get_num_threads(),
            "seed_base": seed_base, "rows": table}


def markdown(result: dict) -> str:
    lines = [
        f"{result['videos']} held-out prompt x seed pairs (seeds from {result['seed_base']:,}), "
        f"{result['steps']} steps, model `{result['model']}`, "
        f"{result['torch_threads']} torch thread(s). Accuracy in %; PSNR/SSIM against the `none` video of the "
        "same seed; seconds = denoise + decode per video (median, [min, max]).",
        "",
        "| policy | color | shape | motion | all three | temporal | detail | PSNR dB | SSIM | large steps "
        "| seconds | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        psnr = "ref" if r["policy"] == "none" else f"{r['psnr']:.1f}" if r["psnr"] not in (None, float("inf")) \
            else "inf"
        ssim = "ref" if r["policy"] == "none" else f"{r['ssim']:.3f}" if r["ssim"] is not None else "-"
        s = r["seconds"]
        lines.append(
            f"| `{r['policy']}` | {r['color_acc']:.1f} | {r['shape_acc']:.1f} | {r['motion_acc']:.1f} "
            f"| {r['all_acc']:.1f} | {r['temporal_consistency']:.3f} | {r['detail']:.3f} | {psnr} | {ssim} "
            f"| {r['large_steps_mean']:.1f} | {s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}] "
            f"| {r['speedup_vs_none']:.2f}x |")
    return "\n".join(lines)


def write_doc(doc: Path, table: str, command: str, marks: tuple[str, str] = (MARK_START, MARK_END),
              heading: str = "Quality table") -> None:
    """Replace the block between `marks` in `doc` (appended under `heading` the first time)."""
    start, end = marks
    block = f"{start}\nRegenerate with `{command}`.\n\n{table}\n{end}"
    text = doc.read_text() if doc.exists() else ""
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text += f"\n## {heading}\n\n{block}\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="srserve tiny quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--videos", type=int, default=72, help="prompt x seed pairs (>= 64 for the report)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--policies", default=None, help="comma-separated (default: a standard sweep)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed-base", type=int, default=HELD_OUT_SEED_BASE,
                        help=f"first generation seed; {CALIBRATION_SEED_BASE:,} is the calibration split on which "
                             "the bundle's defaults are chosen")
    parser.add_argument("--out-json", default="benchmarks/results/quality.json")
    parser.add_argument("--samples", type=Path, default=None,
                        help=f"PNG of frames {SAMPLE_FRAMES} of pairs {SAMPLE_PAIRS} under {SAMPLE_POLICIES}")
    parser.add_argument("--doc", default=None, help="markdown file whose quality-table block is replaced")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = run_table(args.model, args.videos, args.steps, args.policies.split(",") if args.policies else None,
                       args.seed_base, args.samples)
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    print(table)
    if args.doc:
        write_doc(Path(args.doc), table, "srserve tiny quality " + " ".join(argv or []))
    return 0
