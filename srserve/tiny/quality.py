"""The srd-tiny quality table: every switch policy on held-out prompt x seed pairs, scored by the evaluator.

    srserve tiny quality --videos 72 --out-json benchmarks/results/quality.json --doc docs/srd-tiny.md
    srserve tiny quality --form core,pair,then ...   (one table per form, each in its own block of the doc)

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
from srserve.tiny.domain import FORMS, all_prompts
from srserve.tiny.evaluate import score_video, summarize

# Generation seeds start far above anything training draws, so no pair was seen in training. Defaults (the
# bundle's switch policy, its step count) are chosen on the calibration seeds, never on the reported ones.
HELD_OUT_SEED_BASE = 1_000_000
CALIBRATION_SEED_BASE = 2_000_000
MARK_START, MARK_END = "<!-- quality-table:start -->", "<!-- quality-table:end -->"


def form_marks(form: str) -> tuple[str, str]:
    """The doc block of one form's table (the core form keeps the block it always had)."""
    if form == "core":
        return MARK_START, MARK_END
    return f"<!-- quality-table:{form}:start -->", f"<!-- quality-table:{form}:end -->"


def form_path(path: Path, form: str) -> Path:
    """Where a per-form output goes: `path` for the core form, `stem-FORM.suffix` beside it for the others."""
    return path if form == "core" else path.with_name(f"{path.stem}-{form}{path.suffix}")


def default_policies(steps: int, default_switch: str = "adaptive") -> list[str]:
    """A sweep: both ends, fixed splits at 10-50% of the steps, two ratios, and the model's default switch."""
    ks = sorted({max(1, round(steps * f)) for f in (0.1, 0.2, 0.3, 0.5)})
    last = default_switch if default_switch.startswith("adaptive") else "adaptive"
    return ["none", "small-only", *[f"step:{k}" for k in ks], "ratio:0.9", "ratio:0.8", last]


def held_out_pairs(count: int, seed_base: int = HELD_OUT_SEED_BASE, form: str = "core") -> list[tuple[str, int]]:
    """`count` prompt x seed pairs of one form. Core cycles through its 72 prompts in order; pair (4,320 prompts) and
    then (216) take prompts in an order shuffled by `seed_base`, so the calibration and held-out splits draw
    different prompts as well as different seeds."""
    prompts = all_prompts(form)
    if form != "core":
        prompts = [prompts[i] for i in np.random.default_rng(seed_base).permutation(len(prompts))]
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


def _generate_pairs(model: str | None, pairs: list[tuple[int, str, int]], steps: int | None, policies: list[str],
                    sample_indexes: tuple[int, ...], threads: int | None) -> tuple[dict, dict]:
    """Every policy on each (index, prompt, seed): per policy the scores (PSNR against that pair's `none` video),
    switch steps and seconds, and the frames of `sample_indexes`. Runs in a worker process when --workers > 1."""
    import torch

    from srserve.pipeline.engine import SREngine
    from srserve.pipeline.spec import resolve_model_spec
    from srserve.tiny import default_model_path

    if threads:
        torch.set_num_threads(threads)
    engine = SREngine.load(resolve_model_spec(model or default_model_path()))
    rows = {p: {"scores": [], "switch_steps": [], "seconds": []} for p in policies}
    samples: dict[str, dict[int, np.ndarray]] = {p: {} for p in policies}
    embeddings = {}
    for index, prompt, seed in pairs:
        request = engine.resolve(GenerationRequest(prompt=prompt, seed=seed, num_inference_steps=steps))
        if prompt not in embeddings:
            embeddings[prompt] = engine.encode(request)
        videos = {}
        for policy in policies:  # alternate policies per pair, so machine noise spreads evenly over them
            req = request.model_copy(update={"switch": policy})
            began = time.perf_counter()
            state = engine.render(engine.sketch(engine.prepare(req, embeddings[prompt])))
            videos[policy] = engine.decode(state)
            rows[policy]["seconds"].append(time.perf_counter() - began)
            rows[policy]["switch_steps"].append(int(state.switch_step))
        for policy in policies:
            rows[policy]["scores"].append(score_video(videos[policy], prompt, videos.get("none")))
            if index in sample_indexes:
                samples[policy][index] = videos[policy]
    return rows, samples


def run_table(model: str | None, count: int, steps: int | None, policies: list[str] | None,
              seed_base: int = HELD_OUT_SEED_BASE, samples: Path | None = None, form: str = "core",
              workers: int = 1, threads: int | None = None) -> dict:
    """The quality table of one prompt form: `count` pairs under every policy, on `workers` processes (each takes
    every `workers`-th pair; timings then hold with all workers busy, the same for every policy)."""
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from srserve.pipeline.card import model_card
    from srserve.pipeline.spec import resolve_model_spec
    from srserve.tiny import default_model_path

    spec = resolve_model_spec(model or default_model_path())
    steps = steps or model_card(spec).default_steps
    policies = policies or default_policies(steps, str(spec.default_switch or "adaptive"))
    pairs = [(i, p, s) for i, (p, s) in enumerate(held_out_pairs(count, seed_base, form))]
    if workers == 1:
        parts = [_generate_pairs(model, pairs, steps, policies, SAMPLE_PAIRS, threads)]
    else:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_generate_pairs, *zip(*[(model, pairs[w::workers], steps, policies, SAMPLE_PAIRS,
                                                            threads) for w in range(workers)])))
    table = []
    for policy in policies:
        merged = {k: [v for rows, _ in parts for v in rows[policy][k]] for k in ("scores", "switch_steps", "seconds")}
        table.append({
            "policy": policy, **summarize(merged["scores"]),
            "large_steps_mean": float(np.mean(merged["switch_steps"])),
            "seconds": {"min": min(merged["seconds"]), "median": statistics.median(merged["seconds"]),
                        "max": max(merged["seconds"])},
        })
    if samples is not None:
        write_samples(samples, {p: {i: f for _, s in parts for i, f in s[p].items()} for p in policies})
    base = next(r for r in table if r["policy"] == "none")["seconds"]["median"]
    for r in table:
        r["speedup_vs_none"] = base / r["seconds"]["median"]
    return {"model": spec.name, "form": form, "videos": count, "steps": steps, "workers": workers,
            "torch_threads": threads or torch.get_num_threads(), "seed_base": seed_base,
            "sample_prompts": [pairs[i][1] for i in SAMPLE_PAIRS if i < len(pairs)], "rows": table}


def markdown(result: dict) -> str:
    lines = [
        f"{result['videos']} prompt x seed pairs of the `{result.get('form', 'core')}` form (seeds from "
        f"{result['seed_base']:,}), "
        f"{result['steps']} steps, model `{result['model']}`, "
        f"{result.get('workers', 1)} process(es) of {result['torch_threads']} torch thread(s). Accuracy in %; "
        "PSNR/SSIM against the `none` video of the same seed; seconds = denoise + decode per video (median, [min, max]).",
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
    parser.add_argument("--form", default="core",
                        help=f"prompt form(s) of the pairs, comma-separated, of {', '.join(FORMS)}; each gets its own "
                             "table, JSON (-FORM suffix unless core), samples PNG and doc block")
    parser.add_argument("--workers", type=int, default=1, help="processes (each --threads threads), pairs split")
    parser.add_argument("--out-json", default="benchmarks/results/quality.json")
    parser.add_argument("--samples", type=Path, default=None,
                        help=f"PNG of frames {SAMPLE_FRAMES} of pairs {SAMPLE_PAIRS} under {SAMPLE_POLICIES}")
    parser.add_argument("--doc", default=None, help="markdown file whose quality-table block is replaced")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    forms = args.form.split(",")
    unknown = [f for f in forms if f not in FORMS]
    if unknown or len(set(forms)) != len(forms):
        parser.error(f"--form: {args.form!r}: give distinct forms of {', '.join(FORMS)}")
    for form in forms:
        result = run_table(args.model, args.videos, args.steps,
                           args.policies.split(",") if args.policies else None, args.seed_base,
                           form_path(args.samples, form) if args.samples else None, form, args.workers, args.threads)
        out_json = form_path(Path(args.out_json), form)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=2) + "\n")
        table = markdown(result)
        print(table)
        if args.doc:
            write_doc(Path(args.doc), table, "srserve tiny quality " + " ".join(argv or []), form_marks(form),
                      "Quality table" if form == "core" else f"Quality table: the {form} form")
    return 0
