"""The srd-tiny domain evaluator: find the object in each frame, score a video against its prompt.

Per video: color, shape and motion direction (correct or not against `a COLOR SHAPE moving DIRECTION`),
temporal consistency, detail (edge sharpness against a clean rendering), the fraction of frames where the
object was found, and optionally PSNR / SSIM against a reference video (the large-only video of one seed).
`validate` measures the evaluator itself on ground-truth clips of the domain. `main` is `srserve eval`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from srserve.tiny.domain import (
    COLORS,
    DIRECTIONS,
    FORMS,
    SHAPES,
    parse_prompt,
    parse_scene,
    render_clip,
    render_scene,
    sample_scene,
    sample_spec,
    shape_mask,
)
from srserve.tiny.metrics import (
    as_video,
    augment,
    bbox_window,
    dilate,
    gradient_energy,
    largest_component,
    load_video,
    pad2d,
    psnr,
    quantile,
    ssim,
)

MIN_PEAK = 0.2              # a frame whose brightest 3x3 patch is dimmer than this holds no object
REL_THRESHOLD = 0.5         # object pixels: brightness >= this fraction of the frame's peak (half maximum)
MIN_AREA = 0.002            # of the frame (8 pixels at 64x64): a smaller blob is not an object
MAX_AREA = 0.25             # of the frame: a larger bright region is not an object of the domain
MIN_IOU = 0.6               # a mask that overlaps no area-matched shape template better than this has no shape
MIN_SATURATION = 0.25       # a grayer object has no palette color
MIN_DETECTED = 0.5          # attributes are judged only if the object is found in at least this fraction of frames
MIN_DISPLACEMENT = 0.08     # of min(H, W): a smaller fitted displacement over the clip is "static"
MIN_AXIS_RATIO = 1.5        # the main axis of motion must dominate the other by this factor
MIN_TRACK_R2 = 0.5          # the line must explain this much of the track's variance along the main axis
NEW_TRACK = 0.25            # of min(H, W): a detection this far from every known track starts another track
_SHAPE_AREA = {"circle": np.pi, "square": 1.7**2, "triangle": 3 * np.sqrt(3) / 4}  # area / radius**2
_HUES = {name: float(np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360)
         for name, (r, g, b) in COLORS.items()}


@dataclass(frozen=True, eq=False)
class Detection:
    """The object in one frame: pixel mask; centroid (x, y) in the domain's coordinates (pixel i spans [i, i+1))
    and area in pixels, both sub-pixel from the soft coverage; mean RGB of its core; its brightness level."""

    mask: np.ndarray
    centroid: tuple[float, float]
    area: float
    color: tuple[float, float, float]
    level: float


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


def find_object(frame: np.ndarray) -> Detection | None:
    """Segment the object in one (H, W, 3) frame: pixels at least half as bright (max over channels) as the
    frame's brightest 3x3 patch, largest 8-connected component. None if the frame is dark or the blob tiny."""
    frame = as_video(np.asarray(frame)[None])[0].astype(np.float64)
    value = frame.max(axis=2)
    h, w = value.shape
    padded = pad2d(value, 1)
    smooth = sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0
    peak = float(smooth.max())
    if peak < MIN_PEAK:
        return None
    bright = value >= REL_THRESHOLD * peak
    if bright.sum() < MIN_AREA * h * w:
        return None
    mask = np.zeros_like(bright)
    win = bbox_window(bright, 1)
    mask[win] = largest_component(bright[win])
    if not MIN_AREA * h * w <= mask.sum() <= MAX_AREA * h * w:
        return None
    return _measure(frame, value, mask)


def _measure(frame: np.ndarray, value: np.ndarray, mask: np.ndarray) -> Detection | None:
    """The detection of one object mask in a frame (float (H, W, 3)) of brightness `value` (max over channels)."""
    # Sub-pixel centroid and area from the soft coverage (brightness between the background floor and the
    # object's level) near the mask: the binary mask alone is off by up to half a pixel per edge.
    floor = quantile(value[~mask], 0.5) if not mask.all() else 0.0
    level = quantile(value[mask], 0.75)
    win = bbox_window(mask, 2)
    weight = np.clip((value[win] - floor) / max(level - floor, 1e-6), 0.0, 1.0) * dilate(mask[win], 2)
    total = float(weight.sum())
    if total <= 0:
        return None
    ys, xs = np.mgrid[win] + 0.5
    centroid = (float((weight * xs).sum() / total), float((weight * ys).sum() / total))
    color = frame[mask & (value >= quantile(value[mask], 0.5))].mean(axis=0)
    return Detection(mask, centroid, total, tuple(map(float, color)), level)


def classify_color(rgb: tuple[float, float, float]) -> str | None:
    """Nearest palette color by hue; None if the color is too gray (or black)."""
    r, g, b = rgb
    hi, lo = max(rgb), min(rgb)
    if hi <= 0 or (hi - lo) / hi < MIN_SATURATION:
        return None
    hue = float(np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360)
    return min(_HUES, key=lambda n: min(abs(hue - _HUES[n]), 360 - abs(hue - _HUES[n])))


def _template(shape: str, det: Detection, x0: int, y0: int, h: int, w: int) -> np.ndarray:
    radius = np.sqrt(det.area / _SHAPE_AREA[shape])
    cx, cy = det.centroid  # every shape of the domain has its centroid at its center (the triangle: equilateral)
    return shape_mask(shape, cx - x0, cy - y0, radius, h, w)


def classify_shape(det: Detection) -> str | None:
    """The domain shape whose area-matched template, centered on the centroid, best overlaps the mask (IoU);
    None if even the best overlaps less than MIN_IOU."""
    win = bbox_window(det.mask, 4)
    crop = det.mask[win]
    (y0, x0), (h, w) = (win[0].start, win[1].start), crop.shape

    def iou(shape: str) -> float:
        t = _template(shape, det, x0, y0, h, w) >= 0.5
        return (t & crop).sum() / max((t | crop).sum(), 1)

    ious = {shape: iou(shape) for shape in SHAPES}
    best = max(ious, key=ious.get)
    return best if ious[best] >= MIN_IOU else None


def classify_direction(times: np.ndarray, centroids: np.ndarray, size: int) -> str | None:
    """Direction of a least-squares line through the centroid track; None if it moves too little, diagonally,
    or erratically (the line explains too little of the track)."""
    if len(times) < 3:
        return None
    t, c = times - times.mean(), centroids - centroids.mean(axis=0)
    slope = (t[:, None] * c).sum(axis=0) / max((t * t).sum(), 1e-9)
    disp = slope * (times.max() - times.min())
    major = int(np.argmax(np.abs(disp)))
    r2 = 1.0 - ((c[:, major] - slope[major] * t) ** 2).sum() / max((c[:, major] ** 2).sum(), 1e-9)
    if (abs(disp[major]) < MIN_DISPLACEMENT * size or abs(disp[major]) < MIN_AXIS_RATIO * abs(disp[1 - major])
            or r2 < MIN_TRACK_R2):
        return None
    step = [0, 0]
    step[major] = int(np.sign(disp[major]))
    return next(name for name, d in DIRECTIONS.items() if list(d) == step)


def _majority(labels: list[str | None]) -> str | None:
    """The label of at least half of the frames (None votes count against), else None."""
    votes = [x for x in labels if x is not None]
    best = max(dict.fromkeys(votes), key=votes.count) if votes else None  # ties: the first seen
    return best if best is not None and 2 * votes.count(best) >= len(labels) else None


def _temporal_consistency(dets: list[Detection], fraction: float) -> float:
    """fraction x (1 - clip(area flicker + color flicker + position jerk, 0, 1)) over consecutive found frames."""
    if len(dets) < 3:
        return 0.0 if len(dets) < 2 else fraction
    area = np.array([d.area for d in dets])
    color = np.array([d.color for d in dets])
    pos = np.array([d.centroid for d in dets])
    area_flicker = np.abs(np.diff(area)).mean() / area.mean()
    color_flicker = np.abs(np.diff(color, axis=0)).max(axis=1).mean()
    jerk = np.linalg.norm(np.diff(pos, n=2, axis=0), axis=1).mean() / np.sqrt(area.mean())
    return float(fraction * (1.0 - np.clip(area_flicker + color_flicker + jerk, 0.0, 1.0)))


def _detail(video: np.ndarray, dets: list[Detection | None], shapes: list[str | None],
            others: list[np.ndarray | None] | None = None) -> float:
    """Edge energy of the video near the object (brightness normalized by its core, minus the background's noise
    energy) over that of a clean rendering of the detected shape at the detected position and size. `others`:
    per frame, a mask of other objects to leave out of the background."""
    num = den = 0.0
    others = others or [None] * len(dets)
    for frame, det, shape, other in zip(video, dets, shapes, others):
        if det is None or shape is None:
            continue
        value = frame.max(axis=2).astype(np.float64) / max(det.level, 1e-6)
        e_video = gradient_energy(value)
        win = bbox_window(det.mask, 8)  # holds the whole clean template and the band around its edges
        e_clean = gradient_energy(_template(shape, det, win[1].start, win[0].start, *det.mask[win].shape))
        band = dilate(e_clean > 0, 3)
        background = np.ones(value.shape, dtype=bool)
        background[win] = ~dilate(band | det.mask[win], 3)
        if other is not None:
            background &= ~dilate(other, 3)
        noise = float(e_video[background].mean()) if background.any() else 0.0
        e_video = e_video[win]
        num += e_video[band].sum() - noise * band.sum()
        den += e_clean[band].sum()
    return float(np.clip(num / den, 0.0, 1.0)) if den > 0 else 0.0


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
        color = _majority([classify_color(d.color) for d in dets])
        for i in found:
            frame_shapes[i] = classify_shape(all_dets[i])
        shape = _majority([frame_shapes[i] for i in found])
        direction = classify_direction(np.array(found, float), np.array([d.centroid for d in dets]), min(h, w))
    return VideoScore(
        prompt=prompt, color=color, shape=shape, direction=direction,
        color_ok=color == want_color, shape_ok=shape == want_shape, motion_ok=direction == want_direction,
        temporal_consistency=_temporal_consistency(dets, fraction),
        detail=_detail(video, all_dets, frame_shapes) if shape else 0.0,
        detected_fraction=fraction,
        psnr=None if reference is None else psnr(video, reference),
        ssim=None if reference is None else ssim(video, reference),
    )


# ---------------------------------------------------------------------------------------------------------------
# The harder forms (`pair`: two objects, `then`: a direction change at mid-clip), scored per object and phase.


@dataclass(frozen=True)
class SceneScore:
    """A video scored against a `pair` or `then` prompt. `color`, `shape`: detected per prompt object; `direction`:
    detected per object and phase. `color_ok`, `shape_ok`, `motion_ok`: true for every object (and every phase);
    `phases_ok`: per phase, every object's direction right; `objects`: per object detail. The means are over the
    objects."""

    prompt: str
    form: str
    color: tuple[str | None, ...]
    shape: tuple[str | None, ...]
    direction: tuple[tuple[str | None, ...], ...]
    color_ok: bool
    shape_ok: bool
    motion_ok: bool
    phases_ok: tuple[bool, ...]
    objects: tuple[dict, ...]
    temporal_consistency: float
    detail: float
    detected_fraction: float
    psnr: float | None = None
    ssim: float | None = None

    @property
    def all_ok(self) -> bool:
        return self.color_ok and self.shape_ok and self.motion_ok

    def to_dict(self) -> dict:
        return {**asdict(self), "all_ok": self.all_ok}


def find_objects(frame: np.ndarray, k: int = 2) -> list[Detection]:
    """Up to k objects in one frame: as `find_object`, the k largest 8-connected components of the half-maximum
    mask that have an object's area (largest first)."""
    frame = as_video(np.asarray(frame)[None])[0].astype(np.float64)
    value = frame.max(axis=2)
    h, w = value.shape
    padded = pad2d(value, 1)
    smooth = sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0
    peak = float(smooth.max())
    if peak < MIN_PEAK:
        return []
    remaining = value >= REL_THRESHOLD * peak
    dets: list[Detection] = []
    for _ in range(k):
        if remaining.sum() < MIN_AREA * h * w:
            break
        mask = np.zeros_like(remaining)
        win = bbox_window(remaining, 1)
        mask[win] = largest_component(remaining[win])
        remaining = remaining & ~mask
        if mask.sum() < MIN_AREA * h * w:
            break
        if mask.sum() > MAX_AREA * h * w:
            continue
        det = _measure(frame, value, mask)
        if det is not None:
            dets.append(det)
    return dets


def _assign(dets: list[Detection], last: list[tuple[float, float] | None], new_cost: float) -> list[Detection | None]:
    """Detections of one frame given to the tracks (each track's last position, None if not yet seen) by least total
    distance; starting a track with no position costs `new_cost` (a detection farther than that from every track
    starts one)."""
    k = len(last)
    best, best_cost = None, np.inf
    for perm in itertools.permutations(range(k), min(len(dets), k)):
        cost = sum(new_cost if last[t] is None else float(np.hypot(dets[i].centroid[0] - last[t][0],
                                                              dets[i].centroid[1] - last[t][1]))
                   for i, t in enumerate(perm))
        if cost < best_cost:
            best, best_cost = perm, cost
    out: list[Detection | None] = [None] * k
    for i, t in enumerate(best or ()):
        out[t] = dets[i]
    return out


def track_objects(video: np.ndarray, k: int = 2) -> list[list[Detection | None]]:
    """k tracks (per track, its detection in each frame or None): from the first frame with the most objects,
    forward then backward, each frame's objects go to the nearest tracks."""
    per_frame = [find_objects(f, k) for f in video]
    n = len(per_frame)
    tracks: list[list[Detection | None]] = [[None] * n for _ in range(k)]
    if not any(per_frame):
        return tracks
    anchor = max(range(n), key=lambda i: (len(per_frame[i]), -i))
    for order in (range(anchor, n), range(anchor - 1, -1, -1)):
        last: list[tuple[float, float] | None] = [None] * k
        if order.start != anchor:  # backward: start from the anchor's positions
            last = [tracks[t][anchor].centroid if tracks[t][anchor] is not None else None for t in range(k)]
        for i in order:
            got = _assign(per_frame[i], last, NEW_TRACK * min(video.shape[1:3]))
            for t in range(k):
                tracks[t][i] = got[t]
                if got[t] is not None:
                    last[t] = got[t].centroid
    return tracks


def _hue_distance(rgb: tuple[float, float, float], name: str) -> float:
    r, g, b = rgb
    hue = float(np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360)
    d = abs(hue - _HUES[name])
    return min(d, 360 - d) / 360


def _judge_track(video: np.ndarray, track: list[Detection | None], want_dirs: tuple[str, ...],
                 others: list[np.ndarray | None] | None = None) -> dict:
    """One object's detected color, shape, direction per phase (phases split at (F-1)/2), and scores."""
    num_frames, h, w, _ = video.shape
    found = [i for i, d in enumerate(track) if d is not None]
    fraction = len(found) / num_frames
    color = shape = None
    frame_shapes: list[str | None] = [None] * num_frames
    dirs: list[str | None] = [None] * len(want_dirs)
    if found and fraction >= MIN_DETECTED:
        color = _majority([classify_color(track[i].color) for i in found])
        for i in found:
            frame_shapes[i] = classify_shape(track[i])
        shape = _majority([frame_shapes[i] for i in found])
        t = np.arange(num_frames)
        switch = (num_frames - 1) / 2
        phases = [t] if len(want_dirs) == 1 else [t[t <= switch], t[t >= switch]]
        for p, frames in enumerate(phases):
            idx = [i for i in frames if track[i] is not None]
            track_xy = np.array([track[i].centroid for i in idx]).reshape(-1, 2)
            dirs[p] = classify_direction(np.array(idx, float), track_xy, min(h, w))
    dets = [track[i] for i in found]
    return {"color": color, "shape": shape, "directions": tuple(dirs), "detected_fraction": fraction,
            "temporal_consistency": _temporal_consistency(dets, fraction),
            "detail": _detail(video, track, frame_shapes, others) if shape else 0.0}


def score_scene(frames: np.ndarray, prompt: str, reference: np.ndarray | None = None) -> SceneScore:
    """Score one video against a `pair` or `then` prompt (`score_video` calls this for those forms). Pair: two
    objects are found by segmentation and tracking, then matched to the prompt's objects by color."""
    form, want = parse_scene(prompt)
    if form == "core":
        raise ValueError(f"{prompt!r} is a core prompt; score it with score_video")
    video = as_video(frames)
    k = len(want)
    if k == 1:
        tracks = [[find_object(f) for f in video]]
    else:
        tracks = track_objects(video, k)
    # Match tracks to the prompt's objects by color: most exact color matches, then least hue distance.
    def track_color(track):
        dets = [d for d in track if d is not None]
        label = _majority([classify_color(d.color) for d in dets]) if dets else None
        rgb = tuple(np.mean([d.color for d in dets], axis=0)) if dets else (0.0, 0.0, 0.0)
        return label, rgb

    colors = [track_color(tr) for tr in tracks]

    def cost(perm):  # perm[j]: the track of prompt object j
        return sum((colors[t][0] != want[j][0]) + _hue_distance(colors[t][1], want[j][0]) for j, t in enumerate(perm))

    perm = min(itertools.permutations(range(k)), key=cost)
    results = []
    for j, t in enumerate(perm):
        others = [np.logical_or.reduce([tracks[o][i].mask for o in range(k) if o != t and tracks[o][i] is not None]
                                       + [np.zeros(video.shape[1:3], bool)]) for i in range(len(video))]
        r = _judge_track(video, tracks[t], want[j][2], others if k > 1 else None)
        c, s, d = want[j]
        r.update(color_ok=r["color"] == c, shape_ok=r["shape"] == s,
                 phases_ok=tuple(got == exp for got, exp in zip(r["directions"], d)))
        r["motion_ok"] = all(r["phases_ok"])
        r["want"] = {"color": c, "shape": s, "directions": d}
        results.append(r)
    num_phases = len(want[0][2])
    return SceneScore(
        prompt=prompt, form=form,
        color=tuple(r["color"] for r in results), shape=tuple(r["shape"] for r in results),
        direction=tuple(r["directions"] for r in results),
        color_ok=all(r["color_ok"] for r in results), shape_ok=all(r["shape_ok"] for r in results),
        motion_ok=all(r["motion_ok"] for r in results),
        phases_ok=tuple(all(r["phases_ok"][p] for r in results) for p in range(num_phases)),
        objects=tuple(results),
        temporal_consistency=float(np.mean([r["temporal_consistency"] for r in results])),
        detail=float(np.mean([r["detail"] for r in results])),
        detected_fraction=float(np.mean([r["detected_fraction"] for r in results])),
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
