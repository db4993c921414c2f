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


def all_prompts(form: str = "core") -> list[str]:
    """Every prompt of one form (see `prompts_of`); the core form's 72 by default."""
    if form != "core":
        return prompts_of(form)
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


# ---------------------------------------------------------------------------------------------------------------
# Harder forms: two objects (`pair`), a direction change at mid-clip (`then`). The core form is `core`.
#   pair: `a {color1} {shape1} moving {dir1} and a {color2} {shape2} moving {dir2}`   (color1 != color2)
#   then: `a {color} {shape} moving {dir1} then {dir2}`                                (dir1 != dir2)
# A scene is a tuple of objects, each with one direction per phase: one phase for core and pair, two for then.
# Phase p of a `then` object covers frames t with t <= switch (p = 0) or t >= switch (p = 1), switch = (F-1)/2.

FORMS: tuple[str, ...] = ("core", "pair", "then")
_OBJ = r"an?\s+(\w+)\s+(\w+)\s+moving\s+(\w+)"
_PAIR = re.compile(rf"^\s*{_OBJ}\s*,?\s+and\s+{_OBJ}\s*\.?\s*$", re.IGNORECASE)
_THEN = re.compile(rf"^\s*{_OBJ}\s*,?\s+then\s+(\w+)\s*\.?\s*$", re.IGNORECASE)
PAIR_GAP = 6.0  # pixels between the two objects' bounding circles in every frame
PAIR_RADIUS = (0.13, 0.16)  # of the frame; smaller shapes blur to blobs through the VAE's 8x downsampling
PAIR_SPEED = (0.7, 1.2)  # pixels per frame at 64x64: two objects this size need room to pass each other


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a scene: center (x, y) at frame 0, speed in pixels per frame, a direction per phase."""

    color: str
    shape: str
    directions: tuple[str, ...]
    radius: float = 9.0
    start_x: float = 32.0
    start_y: float = 32.0
    speed: float = 1.5

    @property
    def bound(self) -> float:
        """Radius of the circle around the center that holds the whole shape (the square's corners: 0.85 * sqrt 2)."""
        return self.radius * (1.21 if self.shape == "square" else 1.0)

    def offsets(self, num_frames: int) -> np.ndarray:
        """(num_frames, 2) displacement from the start: each phase's direction for its share of the clip."""
        t = np.arange(num_frames, dtype=np.float64)
        if len(self.directions) == 1:
            weights = [t]
        else:
            switch = (num_frames - 1) / 2
            weights = [np.minimum(t, switch), np.maximum(t - switch, 0.0)]
        out = np.zeros((num_frames, 2))
        for direction, w in zip(self.directions, weights):
            out += np.outer(w * self.speed, DIRECTIONS[direction])
        return out

    def centers(self, num_frames: int) -> np.ndarray:
        return self.offsets(num_frames) + (self.start_x, self.start_y)

    def phase_frames(self, num_frames: int) -> list[np.ndarray]:
        """Frame indices of each phase (the two halves of a `then` clip share the switch frame if F is odd)."""
        t = np.arange(num_frames)
        if len(self.directions) == 1:
            return [t]
        switch = (num_frames - 1) / 2
        return [t[t <= switch], t[t >= switch]]


@dataclass(frozen=True)
class SceneSpec:
    """Ground truth of one clip of any form: its objects (one, or two for `pair`)."""

    form: str
    objects: tuple[ObjectSpec, ...]

    @property
    def prompt(self) -> str:
        def one(o: ObjectSpec) -> str:
            return f"a {o.color} {o.shape} moving {' then '.join(o.directions)}"
        return " and ".join(one(o) for o in self.objects)

    def centers(self, num_frames: int) -> np.ndarray:
        """(num_frames, objects, 2) object centers."""
        return np.stack([o.centers(num_frames) for o in self.objects], axis=1)

    @classmethod
    def from_clip(cls, spec: ClipSpec) -> SceneSpec:
        return cls("core", (ObjectSpec(spec.color, spec.shape, (spec.direction,), spec.radius, spec.start_x,
                                       spec.start_y, spec.speed),))


def _check(color: str, shape: str, direction: str) -> None:
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; one of {sorted(COLORS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; one of {list(SHAPES)}")
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; one of {sorted(DIRECTIONS)}")


def parse_scene(prompt: str) -> tuple[str, list[tuple[str, str, tuple[str, ...]]]]:
    """(form, [(color, shape, directions per phase), ...]) of a prompt of any form; ValueError naming what is not
    understood."""
    if (m := _PAIR.match(prompt)):
        g = [x.lower() for x in m.groups()]
        objs = [(g[0], g[1], (g[2],)), (g[3], g[4], (g[5],))]
        for c, s, (d,) in objs:
            _check(c, s, d)
        if g[0] == g[3]:
            raise ValueError(f"the two objects of {prompt!r} have the same color {g[0]!r}; they must differ")
        return "pair", objs
    if (m := _THEN.match(prompt)):
        c, s, d1, d2 = (x.lower() for x in m.groups())
        _check(c, s, d1)
        _check(c, s, d2)
        if d1 == d2:
            raise ValueError(f"{prompt!r} turns from {d1!r} to the same direction; the two must differ")
        return "then", [(c, s, (d1, d2))]
    if _PROMPT.match(prompt):
        c, s, d = parse_prompt(prompt)
        return "core", [(c, s, (d,))]
    raise ValueError(f"prompt {prompt!r} is not of the form 'a COLOR SHAPE moving DIRECTION', "
                     "'a COLOR SHAPE moving DIRECTION and a COLOR SHAPE moving DIRECTION' or "
                     "'a COLOR SHAPE moving DIRECTION then DIRECTION'")


def prompts_of(form: str = "core") -> list[str]:
    """Every prompt of one form: core 72, pair 4320 (ordered, distinct colors), then 216."""
    if form == "core":
        return all_prompts()
    if form == "pair":
        return [f"a {c1} {s1} moving {d1} and a {c2} {s2} moving {d2}" for c1 in COLORS for s1 in SHAPES
                for d1 in DIRECTIONS for c2 in COLORS if c2 != c1 for s2 in SHAPES for d2 in DIRECTIONS]
    if form == "then":
        return [f"a {c} {s} moving {d1} then {d2}" for c in COLORS for s in SHAPES for d1 in DIRECTIONS
                for d2 in DIRECTIONS if d2 != d1]
    raise ValueError(f"unknown form {form!r}; one of {list(FORMS)}")


def _place(rng: np.random.Generator, obj: ObjectSpec, num_frames: int, size: int) -> ObjectSpec:
    """The object with a random start such that it stays fully inside the frame for all frames."""
    off = obj.offsets(num_frames)
    lo, hi = obj.bound + 1, size - obj.bound - 1
    start = []
    for axis in range(2):
        a, b = lo - off[:, axis].min(), hi - off[:, axis].max()
        start.append(float(rng.uniform(a, b)) if b > a else (a + b) / 2)
    return ObjectSpec(obj.color, obj.shape, obj.directions, obj.radius, start[0], start[1], obj.speed)


def sample_scene(rng: np.random.Generator, form: str = "core", num_frames: int = DEFAULT_FRAMES,
                 size: int = DEFAULT_SIZE, prompt: str | None = None) -> SceneSpec:
    """A random valid clip of one form (or of the given prompt): every object inside the frame in every frame and,
    for `pair`, the two objects at least PAIR_GAP pixels apart in every frame and the first-named one starting left
    of the second. `core` draws as `sample_spec`."""
    if prompt is not None:
        form, objs = parse_scene(prompt)
    elif form not in FORMS:
        raise ValueError(f"unknown form {form!r}; one of {list(FORMS)}")
    else:
        objs = None
    if form == "core":
        c, s, (d,) = objs[0] if objs else (None, None, (None,))
        return SceneSpec.from_clip(sample_spec(rng, num_frames, size, c, s, d))
    if objs is None:
        if form == "pair":
            c1, c2 = (str(x) for x in rng.choice(list(COLORS), size=2, replace=False))
            objs = [(c, str(rng.choice(SHAPES)), (str(rng.choice(list(DIRECTIONS))),)) for c in (c1, c2)]
        else:
            d1, d2 = (str(x) for x in rng.choice(list(DIRECTIONS), size=2, replace=False))
            objs = [(str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)), (d1, d2))]
    if form == "then":
        c, s, dirs = objs[0]
        obj = ObjectSpec(c, s, dirs, float(rng.uniform(0.14, 0.2) * size),
                         speed=float(rng.uniform(1.2, 1.6) * size / 64))
        return SceneSpec("then", (_place(rng, obj, num_frames, size),))
    for _ in range(1000):
        placed = []
        for c, s, dirs in objs:
            obj = ObjectSpec(c, s, dirs, float(rng.uniform(PAIR_RADIUS[0], PAIR_RADIUS[1]) * size),
                             speed=float(rng.uniform(PAIR_SPEED[0], PAIR_SPEED[1]) * size / 64))
            placed.append(_place(rng, obj, num_frames, size))
        a, b = placed
        dist = np.linalg.norm(a.centers(num_frames) - b.centers(num_frames), axis=1).min()
        # Reading order: the first-named object starts left of the second, a layout cue the DiT can learn from
        # the text encoder's context (the prompts' own order); the evaluator matches objects by color regardless.
        if dist >= a.bound + b.bound + PAIR_GAP * size / 64 and a.start_x < b.start_x:
            return SceneSpec("pair", tuple(placed))
    raise RuntimeError(f"could not place two objects apart in {size}x{size}")  # pragma: no cover


def render_scene(spec: SceneSpec | ClipSpec, num_frames: int = DEFAULT_FRAMES, height: int = DEFAULT_SIZE,
                 width: int = DEFAULT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(frames float32 (F, H, W, 3) in [0, 1], centers (F, objects, 2)): `render_clip`'s drawing, per object."""
    if isinstance(spec, ClipSpec):
        spec = SceneSpec.from_clip(spec)
    centers = spec.centers(num_frames)
    frames = np.zeros((num_frames, height, width, 3), dtype=np.float32)
    for k, obj in enumerate(spec.objects):
        color = np.asarray(COLORS[obj.color], dtype=np.float32)
        for f, (cx, cy) in enumerate(centers[:, k]):
            mask = shape_mask(obj.shape, cx, cy, obj.radius, height, width).astype(np.float32)
            frames[f] = np.maximum(frames[f], mask[..., None] * color)
    return frames, centers
