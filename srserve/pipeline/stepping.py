"""What every engine shares, torch-free so that an engine needing no torch (the simulated family's) shares it too:
the step boundary of a step-level batch (`StepBoundaries`), the in-process run (`generate`), its result and
callbacks."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Collection

import numpy as np

from srserve.pipeline.errors import Cancelled
from srserve.pipeline.scheduling import StepView

StepCallback = Callable[[int, int], None]  # (steps done, steps in all) after each denoising step
CancelCheck = Callable[[], bool]  # True: stop at the next step boundary


@dataclass(frozen=True)
class PromptEmbeddings:
    """A prompt's text-encoder output: torch tensors, or in the simulated engine numpy arrays of the same size."""

    prompt_embeds: Any
    negative_prompt_embeds: Any | None


@dataclass(frozen=True)
class GenerationResult:
    frames: np.ndarray  # (F, H, W, 3) float32 in [0, 1]
    switch_step: int
    num_inference_steps: int
    timings: dict[str, float]
    latents: Any  # final latents, before decode (a torch tensor; the simulated engine's: a numpy array)


class StepBoundaries:
    """The step boundary of a step-level batch. A subclass holds its `role`, `active` (key -> an item with
    `state` as it joined, its live `latents`, `step_index`, `stop` and `should_cancel`) and `forward_size`, and
    says how a request is grouped (`_shape_key`), how a group steps (`_step_group`), and how a request leaves with
    a result (`_retire`) or without one (`_drop`)."""

    role: str
    active: dict[str, Any]
    forward_size: int

    def __len__(self) -> int:
        return len(self.active)

    def views(self) -> dict[str, StepView]:
        """What a scheduler needs of each resident request: its group, the size of its steps, how many remain."""
        out = {}
        for key, item in self.active.items():
            emb, request = item.state.embeddings, item.state.request
            scale = request.guidance_scale_2 if self.role == "render" else request.guidance_scale
            branches = 2 if emb.negative_prompt_embeds is not None and scale != 1.0 else 1
            out[key] = StepView(self._shape_key(item), float(math.prod(item.latents.shape) * branches),
                                max(0, item.stop - item.step_index), item.step_index, item.state.num_steps)
        return out

    def step(self, keys: Collection[str] | None = None) -> dict[str, Any]:
        """One step boundary: every resident request that finished its segment or was cancelled leaves, then
        `keys` (default: all) advance one step, same-shape ones in shared forwards. Returns those that left: their
        state, or the exception that ended them."""
        finished: dict[str, Any] = {}
        for key, item in list(self.active.items()):
            if item.step_index >= item.stop:
                finished[key] = self._retire(key)
            elif item.should_cancel is not None and item.should_cancel():
                self._drop(key)
                finished[key] = Cancelled(f"cancelled at step {item.step_index}")
        chosen = [(k, self.active[k]) for k in (self.active if keys is None else keys) if k in self.active]
        for group in self._groups(chosen):
            try:
                self._step_group(group)
            except Exception as err:  # a failing forward fails its requests, not the whole replica
                for key, _ in group:
                    self._drop(key)
                    finished[key] = err
        for key, item in chosen:
            if key in self.active and item.step_index >= item.stop:
                finished[key] = self._retire(key)
        return finished

    def _groups(self, items: list[tuple[str, Any]]) -> list[list[tuple[str, Any]]]:
        """Same-shape requests, in forwards of at most `forward_size`."""
        groups: dict[tuple, list[tuple[str, Any]]] = {}
        for key, item in items:
            groups.setdefault(self._shape_key(item), []).append((key, item))
        size = self.forward_size
        return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]

    def _shape_key(self, item: Any) -> tuple:
        raise NotImplementedError

    def _step_group(self, group: list[tuple[str, Any]]) -> None:
        raise NotImplementedError

    def _retire(self, key: str) -> Any:
        raise NotImplementedError

    def _drop(self, key: str) -> Any:
        raise NotImplementedError


def run_segment(batch: Any, state: Any, on_step: StepCallback | None = None,
                should_cancel: CancelCheck | None = None) -> Any:
    """One request through a batch of its own, to the end of its segment: the state it leaves with."""
    batch.add("request", state, on_step, should_cancel)
    finished: dict[str, Any] = {}
    while batch:
        finished.update(batch.step())
    result = finished["request"]
    if isinstance(result, BaseException):
        raise result
    return result


def generate(engine: Any, request: Any, on_step: StepCallback | None = None,
             should_cancel: CancelCheck | None = None) -> GenerationResult:
    """The SR pipeline in one process, timed per phase: encode, sketch, render, decode."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    state = engine.prepare(request, engine.encode(request))
    timings["encode_seconds"] = time.perf_counter() - start
    for role in ("sketch", "render"):
        began = time.perf_counter()
        state = run_segment(engine.new_batch(role), state, on_step, should_cancel)
        timings[f"{role}_seconds"] = time.perf_counter() - began
    began = time.perf_counter()
    frames = engine.decode(state, should_cancel)
    timings["decode_seconds"] = time.perf_counter() - began
    timings["total_seconds"] = time.perf_counter() - start
    return GenerationResult(frames, int(state.switch_step), state.num_steps, timings, state.latents)
