"""The harder forms of the srd-tiny domain (`pair`: two objects, `then`: a direction change at mid-clip): objects
segmented and tracked across frames, matched to the prompt's objects by color, scored per object and phase."""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np

from srserve.tiny.detect import (
    HUES,
    MAX_AREA,
    MIN_AREA,
    MIN_DETECTED,
    NEW_TRACK,
    Detection,
    bright_pixels,
    classify_color,
    classify_direction,
    classify_shape,
    consistency,
    detail_score,
    find_object,
    majority,
    measure,
)
from srserve.tiny.domain import parse_scene
from srserve.tiny.metrics import as_video, bbox_window, largest_component, psnr, ssim



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
    if (seen := bright_pixels(frame)) is None:
        return []
    frame, value, remaining = seen
    h, w = value.shape
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
        det = measure(frame, value, mask)
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
    d = abs(hue - HUES[name])
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
        color = majority([classify_color(track[i].color) for i in found])
        for i in found:
            frame_shapes[i] = classify_shape(track[i])
        shape = majority([frame_shapes[i] for i in found])
        t = np.arange(num_frames)
        switch = (num_frames - 1) / 2
        phases = [t] if len(want_dirs) == 1 else [t[t <= switch], t[t >= switch]]
        for p, frames in enumerate(phases):
            idx = [i for i in frames if track[i] is not None]
            track_xy = np.array([track[i].centroid for i in idx]).reshape(-1, 2)
            dirs[p] = classify_direction(np.array(idx, float), track_xy, min(h, w))
    dets = [track[i] for i in found]
    return {"color": color, "shape": shape, "directions": tuple(dirs), "detected_fraction": fraction,
            "temporal_consistency": consistency(dets, fraction),
            "detail": detail_score(video, track, frame_shapes, others) if shape else 0.0}


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
        label = majority([classify_color(d.color) for d in dets]) if dets else None
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


