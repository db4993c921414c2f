"""The srd-tiny domain evaluator: find the object in each frame, score a video against its prompt.

Per video: color, shape and motion direction (correct or not against `a COLOR SHAPE moving DIRECTION`),
temporal consistency, detail (edge sharpness against a clean rendering), the fraction of frames where the
object was found, and optionally PSNR / SSIM against a reference video (the large-only video of one seed).
`validate` measures the evaluator itself on ground-truth clips of the domain. `main` is `srserve eval`.
What a frame shows is found in `detect`; the two-object and direction-change forms are scored in `scene`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from srserve.tiny.detect import (
    MIN_DETECTED,
    classify_color,
    classify_direction,
    classify_shape,
    consistency,
    detail_score,
    find_object,
    majority,
)
from srserve.tiny.domain import FORMS, parse_prompt, parse_scene, render_clip, render_scene, sample_scene, sample_spec
from srserve.tiny.metrics import as_video, augment, load_video, psnr, ssim
from srserve.tiny.scene import SceneScore, score_scene


@dataclass(frozen=True)
class VideoScore:
    prompt: str
    color: str | None           # detected attributes (None: undetermined)
    shape: str | None
    direction: str | None       # None also when the object does not move enough
    color_ok: bool
    shape_ok: bool
    motion_ok: bool
    temporal_consistency: float  # [0, 1]
    detail: float                # [0, 1]
    detected_fraction: float     # [0, 1]
    psnr: float | None = None    # dB against the reference, if one was given
    ssim: float | None = None

    @property
    def all_ok(self) -> bool:
        return self.color_ok and self.shape_ok and self.motion_ok

    def to_dict(self) -> dict:
        return asdict(self)



def score_video(frames: np.ndarray, prompt: str, reference: np.ndarray | None = None) -> VideoScore | SceneScore:
    """Score one video (F, H, W, 3; float in [0, 1] or uint8) against its prompt (and a reference video). A `pair`
    or `then` prompt gives a `SceneScore` (per object and phase), a core prompt a `VideoScore`."""
    if parse_scene(prompt)[0] != "core":
        return score_scene(frames, prompt, reference)
    want_color, want_shape, want_direction = parse_prompt(prompt)
    video = as_video(frames)
    num_frames, h, w, _ = video.shape
    all_dets = [find_object(f) for f in video]
    found = [i for i, d in enumerate(all_dets) if d is not None]
    dets = [all_dets[i] for i in found]
    fraction = len(found) / num_frames
    color = shape = direction = None
    frame_shapes: list[str | None] = [None] * num_frames
    if dets and fraction >= MIN_DETECTED:
        color = majority([classify_color(d.color) for d in dets])
        for i in found:
            frame_shapes[i] = classify_shape(all_dets[i])
        shape = majority([frame_shapes[i] for i in found])
        direction = classify_direction(np.array(found, float), np.array([d.centroid for d in dets]), min(h, w))
    return VideoScore(
        prompt=prompt, color=color, shape=shape, direction=direction,
        color_ok=color == want_color, shape_ok=shape == want_shape, motion_ok=direction == want_direction,
        temporal_consistency=consistency(dets, fraction),
        detail=detail_score(video, all_dets, frame_shapes) if shape else 0.0,
        detected_fraction=fraction,
        psnr=None if reference is None else psnr(video, reference),
        ssim=None if reference is None else ssim(video, reference),
    )



def summarize(scores: list[VideoScore | SceneScore]) -> dict:
    """Accuracies in percent per attribute (and all three), mean scores; PSNR/SSIM over videos that have them.
    Scene scores count an attribute right only if it is right for every object and phase; a list of `then` scores
    also gets `phase_acc`, the accuracy of each phase's direction."""
    n = len(scores)

    def pct(key: str) -> float:
        return round(100.0 * sum(bool(getattr(s, key)) for s in scores) / n, 2) if n else 0.0

    def mean(key: str) -> float | None:
        vals = [getattr(s, key) for s in scores if getattr(s, key) is not None]
        return round(float(np.mean(vals)), 4) if vals else None

    out = {"videos": n, "color_acc": pct("color_ok"), "shape_acc": pct("shape_ok"),
           "motion_acc": pct("motion_ok"), "all_acc": pct("all_ok"),
           **{k: mean(k) for k in ("temporal_consistency", "detail", "detected_fraction", "psnr", "ssim")}}
    phases = {len(getattr(s, "phases_ok", ())) for s in scores}
    if n and len(phases) == 1 and phases != {0} and phases != {1}:  # all `then` scores: accuracy per phase
        out["phase_acc"] = [round(100.0 * sum(s.phases_ok[p] for s in scores) / n, 2) for p in range(phases.pop())]
    return out


def validate(n: int = 500, seed: int = 0, noise: float = 0.05, blur: float = 0.7, num_frames: int = 17,
             size: int = 64, conditions: tuple[str, ...] = ("clean", "augmented"), form: str = "core") -> dict:
    """Score n random ground-truth clips of the domain (random color, shape, direction, size, speed, start) in
    each condition: "clean" as rendered, "augmented" through `augment`. A summary per condition. `form`: the
    prompt form of the clips ("core", "pair" or "then")."""
    unknown = set(conditions) - {"clean", "augmented"}
    if unknown:
        raise ValueError(f"unknown validation conditions {sorted(unknown)}; use 'clean' and/or 'augmented'")
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; one of {list(FORMS)}")
    rng = np.random.default_rng(seed)
    scores: dict[str, list[VideoScore]] = {name: [] for name in conditions}
    start = time.perf_counter()
    for _ in range(n):
        if form == "core":
            spec = sample_spec(rng, num_frames=num_frames, size=size)
            frames, _ = render_clip(spec, num_frames, size, size)
        else:
            spec = sample_scene(rng, form, num_frames=num_frames, size=size)
            frames, _ = render_scene(spec, num_frames, size, size)
        if "clean" in scores:
            scores["clean"].append(score_video(frames, spec.prompt))
        if "augmented" in scores:
            scores["augmented"].append(score_video(augment(frames, rng, noise, blur), spec.prompt))
    out: dict = {name: summarize(s) for name, s in scores.items()}
    out["settings"] = {**({"form": form} if form != "core" else {}), "n": n, "seed": seed, "noise": noise,
                       "blur": blur, "num_frames": num_frames, "size": size,
                       "seconds": round(time.perf_counter() - start, 2)}
    return out


def _read_manifest(path: Path) -> list[dict]:
    entries = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not JSON ({exc})") from exc
        if not isinstance(entry, dict) or "path" not in entry or "prompt" not in entry:
            raise ValueError(f"{path}:{lineno}: each line needs 'path' and 'prompt'")
        for key in ("path", "reference"):
            if entry.get(key) and not Path(entry[key]).is_absolute():
                entry[key] = str(path.parent / entry[key])
        entries.append(entry)
    return entries


def _vae_check(model: str | None, n: int, seed: int, form: str = "core") -> int:
    import torch
    from diffusers import AutoencoderKLWan

    from srserve.tiny import default_model_path
    from srserve.tiny.train_vae import reconstruction_summary

    if n < 1:
        print("srserve eval vae: error: --n must be >= 1", file=sys.stderr)
        return 2
    path = Path(model or default_model_path())
    torch.set_num_threads(1)
    vae = AutoencoderKLWan.from_pretrained(path / "vae" if (path / "vae").is_dir() else path).eval()
    print(json.dumps({"model": str(path), "form": form, "clips": n, "seed": seed,
                      **reconstruction_summary(vae, n, seed, form)}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="srserve eval", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    vid = sub.add_parser("videos", help="score videos (.npy or .mp4) against prompts; prints a JSON summary")
    vid.add_argument("paths", nargs="*", help="video files, all scored against --prompt")
    vid.add_argument("--prompt", help="'a COLOR SHAPE moving DIRECTION' for the listed paths")
    vid.add_argument("--reference", help="reference video for PSNR/SSIM of the listed paths")
    vid.add_argument("--manifest", type=Path, help='JSONL: {"path": ..., "prompt": ..., "reference": optional}')
    vid.add_argument("--per-video", action="store_true", help="include every video's scores")
    val = sub.add_parser("validate", help="accuracy of the evaluator on ground-truth clips of the domain")
    val.add_argument("--n", type=int, default=500)
    val.add_argument("--seed", type=int, default=0)
    val.add_argument("--noise", type=float, default=0.05, help="noise sigma of the augmented condition")
    val.add_argument("--blur", type=float, default=0.7, help="blur sigma (pixels) of the augmented condition")
    val.add_argument("--frames", type=int, default=17)
    val.add_argument("--size", type=int, default=64, help="frame height and width")
    val.add_argument("--form", choices=FORMS, default="core", help="prompt form of the clips")
    rec = sub.add_parser("vae", help="scores of a VAE's reconstructions of ground-truth clips (a generator's ceiling)")
    rec.add_argument("--model", default=None, help="diffusers bundle directory (default: the bundled srd-tiny)")
    rec.add_argument("--n", type=int, default=48)
    rec.add_argument("--seed", type=int, default=123)
    rec.add_argument("--form", choices=FORMS, default="core", help="prompt form of the clips")
    args = parser.parse_args(argv)
    if args.command == "vae":
        return _vae_check(args.model, args.n, args.seed, args.form)
    if args.command == "validate":
        if args.n < 1 or args.frames < 2 or args.size < 16 or args.noise < 0 or args.blur < 0:
            parser.error("need --n >= 1, --frames >= 2, --size >= 16, --noise >= 0, --blur >= 0")
        print(json.dumps(validate(args.n, args.seed, args.noise, args.blur, args.frames, args.size,
                                         form=args.form), indent=2))
        return 0
    try:
        entries = _read_manifest(args.manifest) if args.manifest else []
        if args.paths:
            if not args.prompt:
                parser.error("--prompt is required with video paths")
            entries += [{"path": p, "prompt": args.prompt, "reference": args.reference} for p in args.paths]
        if not entries:
            parser.error("give video paths with --prompt, or --manifest")
        scores = []
        for e in entries:
            try:
                ref = load_video(e["reference"]) if e.get("reference") else None
                scores.append(score_video(load_video(e["path"]), e["prompt"], ref))
            except ValueError as exc:
                raise ValueError(f"{e['path']}: {exc}") from exc
    except (OSError, ValueError) as exc:
        print(f"srserve eval: error: {exc}", file=sys.stderr)
        return 2
    out: dict = {"summary": summarize(scores)}
    if args.per_video:
        out["videos"] = [{"path": e["path"], **s.to_dict()} for e, s in zip(entries, scores)]
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
