"""Helpers shared by srd-tiny's training stages: clips as tensors, learning-rate schedule, budgets, logging."""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from srserve.tiny.domain import DEFAULT_FRAMES, DEFAULT_SIZE, FORMS, SceneSpec, render_scene, sample_scene


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def clip_tensor(rng: np.random.Generator, frames: int = DEFAULT_FRAMES, spec: SceneSpec | None = None,
                crop: int = DEFAULT_SIZE, forms: tuple[str, ...] = ("core",)) -> torch.Tensor:
    """(3, F, crop, crop) in [-1, 1]: a clip of `spec` (default: a random scene of a form drawn from `forms`),
    cropped around the objects' paths on the 8-pixel latent grid. The core form draws exactly as the first bundle's
    training did."""
    if spec is None:
        form = forms[0] if len(forms) == 1 else str(rng.choice(forms))
        spec = sample_scene(rng, form)  # placed for a whole clip, so a single frame (frames=1) is its frame 0
    video, centers = render_scene(spec, frames, DEFAULT_SIZE, DEFAULT_SIZE)
    if crop < DEFAULT_SIZE:
        mid = centers[:frames].reshape(-1, 2).mean(axis=0) + rng.uniform(-8, 8, size=2)
        x0, y0 = (int(np.clip(round((c - crop / 2) / 8) * 8, 0, DEFAULT_SIZE - crop)) for c in mid)
        video = video[:, y0:y0 + crop, x0:x0 + crop]
    return torch.from_numpy(np.ascontiguousarray(video)).permute(3, 0, 1, 2) * 2 - 1


def parse_forms(text: str) -> tuple[str, ...]:
    """'core,pair,then' -> ('core', 'pair', 'then'), each a known prompt form."""
    forms = tuple(f.strip() for f in text.split(",") if f.strip())
    bad = [f for f in forms if f not in FORMS]
    if not forms or bad:
        raise ValueError(f"forms {text!r}: each of {list(FORMS)}")
    return forms


def lr_at(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


class Budget:
    """Stop at `stop` steps (default: the schedule's `steps`) or after `minutes`, whichever comes first. A run
    cut by the clock is reproduced exactly by the same arguments with `--*-stop` set to the steps it made."""

    def __init__(self, steps: int, minutes: float, stop: int | None = None):
        self.steps, self.seconds, self.start = (stop or steps), minutes * 60, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def done(self, step: int) -> bool:
        return step >= self.steps or self.elapsed() >= self.seconds
