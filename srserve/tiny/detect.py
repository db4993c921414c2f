"""What the srd-tiny evaluator sees in a frame: the object (segmentation), its color, shape and motion direction,
and the per-video measures built from detections (temporal consistency, detail). Thresholds are the module's
constants; `evaluate` scores videos with these, `scene` the two-object and direction-change forms."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from srserve.tiny.domain import COLORS, DIRECTIONS, SHAPES, shape_mask
from srserve.tiny.metrics import as_video, bbox_window, dilate, gradient_energy, largest_component, pad2d, quantile

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
HUES = {name: float(np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360)
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



def bright_pixels(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """One (H, W, 3) frame as floats, its value (max over channels) and its half-maximum mask: pixels at least
    half as bright as the frame's brightest 3x3 patch. None if the frame is dark."""
    frame = as_video(np.asarray(frame)[None])[0].astype(np.float64)
    value = frame.max(axis=2)
    h, w = value.shape
    padded = pad2d(value, 1)
    smooth = sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0
    peak = float(smooth.max())
    if peak < MIN_PEAK:
        return None
    return frame, value, value >= REL_THRESHOLD * peak


def find_object(frame: np.ndarray) -> Detection | None:
    """Segment the object in one (H, W, 3) frame: the largest 8-connected component of its half-maximum mask
    (`bright_pixels`). None if the frame is dark or the blob tiny."""
    if (seen := bright_pixels(frame)) is None:
        return None
    frame, value, bright = seen
    h, w = value.shape
    if bright.sum() < MIN_AREA * h * w:
        return None
    mask = np.zeros_like(bright)
    win = bbox_window(bright, 1)
    mask[win] = largest_component(bright[win])
    if not MIN_AREA * h * w <= mask.sum() <= MAX_AREA * h * w:
        return None
    return measure(frame, value, mask)


def measure(frame: np.ndarray, value: np.ndarray, mask: np.ndarray) -> Detection | None:
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
    return min(HUES, key=lambda n: min(abs(hue - HUES[n]), 360 - abs(hue - HUES[n])))


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


def majority(labels: list[str | None]) -> str | None:
    """The label of at least half of the frames (None votes count against), else None."""
    votes = [x for x in labels if x is not None]
    best = max(dict.fromkeys(votes), key=votes.count) if votes else None  # ties: the first seen
    return best if best is not None and 2 * votes.count(best) >= len(labels) else None


def consistency(dets: list[Detection], fraction: float) -> float:
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


def detail_score(video: np.ndarray, dets: list[Detection | None], shapes: list[str | None],
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


