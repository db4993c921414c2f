"""Step-level batching: `DenoiseBatch` advances same-role requests one denoising step at a time.

Requests join (`add`) and leave (finished, cancelled, failed) at step boundaries; same-shape requests share a
forward. A role with a step cache steps each request alone: diffusers decides to skip once per forward for the
whole batch, so a shared forward would tie a request's result to its companions (see `srserve.pipeline.caches`).
`step(keys)` runs one forward for the requests a scheduler chose (`srserve.pipeline.scheduling`); the others stay
resident, paused, their state untouched, and are still checked for cancellation at every boundary. Each request's
latents, scheduler and generator are its own, so pausing it changes nothing in its result.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from srserve.pipeline.caches import step_cache
from srserve.pipeline.errors import Cancelled
from srserve.pipeline.stepping import CancelCheck, StepBoundaries, StepCallback
from srserve.pipeline.families import Family
from srserve.pipeline.families.base import StepInput
from srserve.pipeline.handoff import HandoffState, capture_scheduler, check_version, restore_scheduler, to_cpu
from srserve.pipeline.switch import AdaptiveSwitch, parse_policy



@contextlib.contextmanager
def cancel_between_calls(module: Any, should_cancel: CancelCheck | None, what: str) -> Iterator[None]:
    """Raise `Cancelled` before any call of `module` once `should_cancel()` is true: a VAE calls its decoder once
    per chunk of frames (Wan: each latent frame, CogVideoX: each frame batch, any: each tile), so a decode stops
    between chunks. The module and its results are untouched otherwise."""
    if module is None or should_cancel is None:
        yield
        return
    calls = 0

    def check(*_: Any) -> None:
        nonlocal calls
        if should_cancel():
            raise Cancelled(f"cancelled in {what} after {calls} chunks")
        calls += 1

    handle = module.register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class _Active:
    """One request inside a DenoiseBatch: its live latents, scheduler and generator (no copies per step)."""

    state: HandoffState  # as it joined; what moves lives in the fields below
    latents: torch.Tensor
    scheduler: Any
    generator: torch.Generator
    family_state: dict[str, Any]
    step_index: int
    stop: int  # the segment ends before this step
    on_step: StepCallback | None
    should_cancel: CancelCheck | None
    adaptive: AdaptiveSwitch | None = None  # a sketch under the adaptive rule: it sets `stop`, it holds the diffs
    previous_output: torch.Tensor | None = None  # the last guided output, for the adaptive rule only


class DenoiseBatch(StepBoundaries):
    """Advances requests of one role one denoising step at a time; same-shape requests share a forward pass.

    `add` admits a request at a step boundary, `step` runs one step for every active request and returns the
    ones that finished their segment (state, or the exception that ended them).
    """

    def __init__(self, family: Family, role: str, max_batch_size: int = 8) -> None:
        if role not in ("sketch", "render"):
            raise ValueError(f"role must be sketch or render, got {role!r}")
        self.family, self.role, self.max_batch_size = family, role, max_batch_size
        self.cache = step_cache(family.transformers.get(role))
        self.active: dict[str, _Active] = {}

    @property
    def forward_size(self) -> int:
        """The most requests one forward may carry: 1 with a step cache. Diffusers decides to skip once per forward
        for the whole batch, so a shared forward would tie a request's result to its companions. The price is the
        batching gain: 4 srd-tiny requests stepped alone cost 1.15x (sketch) to 1.4x (render) a shared step on CPU;
        the cache's own per-request bookkeeping is within noise. A cache pays back under load only if it skips more.
        """
        return 1 if self.cache is not None else self.max_batch_size

    def add(self, key: str, state: HandoffState, on_step: StepCallback | None = None,
            should_cancel: CancelCheck | None = None) -> None:
        if key in self.active:
            raise ValueError(f"request {key!r} is already in this batch")
        self._check(state)
        scheduler = restore_scheduler(state, self.family.device)
        generator = torch.Generator("cpu")
        generator.set_state(state.generator_state)
        family_state = to_cpu(state.family_state)  # the family updates it in place; the state stays as it came
        latents, scheduler = self.family.enter_role(self.role, state.latents.to(self.family.device), scheduler,
                                                    state.step_index, family_state)
        item = _Active(state, latents, scheduler, generator, family_state, state.step_index, state.num_steps,
                       on_step, should_cancel)
        if self.role == "sketch":
            if state.switch_step is None:
                item.adaptive = AdaptiveSwitch.for_policy(parse_policy(state.request.switch), state.num_steps)
            else:
                item.stop = state.switch_step
        self.active[key] = item

    def _check(self, state: HandoffState) -> None:
        check_version(state)
        if state.family != self.family.name:
            raise ValueError(f"a {state.family!r} state cannot join a {self.family.name!r} {self.role} batch")
        if state.embeddings is None:
            raise ValueError("the state has no embeddings (shipped apart?): re-attach them with "
                             "state.replace(embeddings=...) before a denoising stage")
        if self.role == "sketch" and state.switch_step is None and state.step_index > 0:
            raise ValueError(f"an adaptive sketch runs from step 0 in one segment; this state is at step "
                             f"{state.step_index} (the rule's history does not cross a handoff)")

    def discard(self, key: str) -> None:
        """Drop a request without a result (its caller gave up); frees its cache state."""
        self._drop(key)

    def _drop(self, key: str) -> _Active | None:
        item = self.active.pop(key, None)
        if self.cache is not None:
            self.cache.release(key)
        return item

    @staticmethod
    def _shape_key(item: _Active) -> tuple:
        emb = item.state.embeddings
        return (tuple(item.latents.shape), tuple(emb.prompt_embeds.shape), emb.negative_prompt_embeds is None)


    def _step_group(self, group: list[tuple[str, _Active]]) -> None:
        inputs = []
        for key, item in group:
            i, request = item.step_index, item.state.request
            sigmas = getattr(item.scheduler, "sigmas", None)
            inputs.append(StepInput(
                latents=item.latents, timestep=item.scheduler.timesteps[i], step_index=i,
                num_steps=item.state.num_steps, sigma=float(sigmas[i]) if sigmas is not None else None,
                embeddings=item.state.embeddings,
                guidance_scale=request.guidance_scale_2 if self.role == "render" else request.guidance_scale,
                key=key,
            ))
        outputs = self.family.predict(self.role, inputs)
        for (_, item), step, output in zip(group, inputs, outputs):
            item.latents = self.family.scheduler_step(item.scheduler, output, step, item.family_state,
                                                      item.generator)
            if item.adaptive is not None:
                self._observe(item, output)
            item.step_index += 1
            if item.on_step is not None:
                item.on_step(item.step_index, item.state.num_steps)

    @staticmethod
    def _observe(item: _Active, output: torch.Tensor) -> None:
        """Feed the adaptive rule once per denoising step, on the guided output."""
        change = None
        if item.previous_output is not None:
            prev = item.previous_output.float()
            change = float((output.float() - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12))
        item.previous_output = output
        if item.adaptive.observe(item.step_index, change):
            item.stop = item.step_index + 1

    def _retire(self, key: str) -> HandoffState:
        item = self._drop(key)
        cls_name, config, sched_state = capture_scheduler(item.scheduler)
        changes: dict[str, Any] = {}
        if item.adaptive is not None:  # the rule decided: the sketch ran to here
            changes = {"switch_step": item.step_index, "switch_diffs": tuple(item.adaptive.diffs)}
        return item.state.replace(
            latents=to_cpu(item.latents), step_index=item.step_index, scheduler_class=cls_name,
            scheduler_config=config, scheduler_state=sched_state, generator_state=item.generator.get_state(),
            family_state=to_cpu(item.family_state), **changes,
        )
