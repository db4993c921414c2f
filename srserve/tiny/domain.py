"""The procedural text-to-video domain of srd-tiny: one colored shape moving on black.

Prompts follow `a {color} {shape} moving {direction}`. Every clip keeps its ground truth (attributes and
per-frame object centers), so the evaluator can be validated on clips whose answer is known.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

DEFAULT_FRAMES = 17
DEFAULT_SIZE = 64

_PROMPT = re.compile(r"^\s*an?\s+(\w+)\s+(\w+)\s+moving\s+(\w+)\s*\.?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class ClipSpec:
    """Ground truth of one clip. Positions are object centers in pixels (x right, y down)."""

    color: str
    shape: str
    direction: str
    radius: float = 12.0
    start_x: float = 32.0
    start_y: float = 32.0
    speed: float = 1.5  # pixels per frame

    @property
    def prompt(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction}"

    def centers(self, num_frames: int) -> np.ndarray:
        """(num_frames, 2) object centers (x, y) for each frame."""
        dx, dy = DIRECTIONS[self.direction]
        steps = np.arange(num_frames, dtype=np.float64) * self.speed
        return np.stack([self.start_x + dx * steps, self.start_y + dy * steps], axis=1)


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """(color, shape, direction) of a core-grammar prompt; ValueError naming what is not understood."""
    match = _PROMPT.match(prompt)
    if not match:
        raise ValueError(f"prompt {prompt!r} is not of the form 'a COLOR SHAPE moving DIRECTION'")
    color, shape, direction = (g.lower() for g in match.groups())
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; one of {sorted(COLORS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; one of {list(SHAPES)}")
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; one of {sorted(DIRECTIONS)}")
    return color, shape, direction


def all_prompts() -> list[str]:
    return [ClipSpec(c, s, d).prompt for c in COLORS for s in SHAPES for d in DIRECTIONS]


def sample_spec(
    rng: np.random.Generator,
    num_frames: int = DEFAULT_FRAMES,
    size: int = DEFAULT_SIZE,
    color: str | None = None,
    shape: str | None = None,
    direction: str | None = None,
) -> ClipSpec:
    """A random clip whose object stays fully inside the frame for all frames."""
    color = color or str(rng.choice(list(COLORS)))
    shape = shape or str(rng.choice(SHAPES))
    direction = direction or str(rng.choice(list(DIRECTIONS)))
    radius = float(rng.uniform(0.16, 0.22) * size)
    speed = float(rng.uniform(0.9, 1.5) * size / 64)
    travel = speed * (num_frames - 1)
    dx, dy = DIRECTIONS[direction]
    lo, hi = radius + 1, size - radius - 1

    def start(delta: int) -> float:
        if delta > 0:
            return float(rng.uniform(lo, max(lo, hi - travel)))
        if delta < 0:
            return float(rng.uniform(min(hi, lo + travel), hi))
        return float(rng.uniform(lo, hi))

    return ClipSpec(color, shape, direction, radius, start(dx), start(dy), speed)


def shape_mask(shape: str, cx: float, cy: float, radius: float, height: int, width: int) -> np.ndarray:
    """Anti-aliased (height, width) coverage in [0, 1] of one shape, by 4x4 supersampling."""
    ss = 4
    ys = (np.arange(height * ss) + 0.5) / ss
    xs = (np.arange(width * ss) + 0.5) / ss
    x, y = np.meshgrid(xs - cx, ys - cy)
    if shape == "circle":
        inside = x * x + y * y <= radius * radius
    elif shape == "square":
        half = radius * 0.85
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
    elif shape == "triangle":
        # Upward equilateral triangle inscribed in the circle of this radius.
        top, bottom = -radius, radius * 0.5
        half_width = (y - top) / (bottom - top) * radius * np.sqrt(3) / 2 * 1.0
        inside = (y >= top) & (y <= bottom) & (np.abs(x) <= half_width)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(height, ss, width, ss).mean(axis=(1, 3))


def render_clip(spec: ClipSpec, num_frames: int = DEFAULT_FRAMES, height: int = DEFAULT_SIZE,
                width: int = DEFAULT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(frames float32 (F, H, W, 3) in [0, 1], centers (F, 2)) of a clip on a black background."""
    centers = spec.centers(num_frames)
    color = np.asarray(COLORS[spec.color], dtype=np.float32)
    frames = np.zeros((num_frames, height, width, 3), dtype=np.float32)
    for f, (cx, cy) in enumerate(centers):
        mask = shape_mask(spec.shape, cx, cy, spec.radius, height, width).astype(np.float32)
        frames[f] = mask[..., None] * color
    return frames, centers
