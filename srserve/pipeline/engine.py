"""The SR engine: encode -> sketch (large model, steps [0, k)) -> render (small model, [k, N)) -> decode.

Every stage works on a `HandoffState` and returns a new one, so the same code runs in one process
(`SREngine.generate`) or across Ray Serve replicas. Denoising goes through `DenoiseBatch`, which advances any
number of same-role requests one step at a time (requests join and leave at step boundaries).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch

from srserve.config import GenerationRequest, ModelSpec
from srserve.pipeline.families import ROLES, Family, load_family
from srserve.pipeline.families.base import StepInput
from srserve.pipeline.handoff import HandoffState, PromptEmbeddings, capture_scheduler, restore_scheduler, to_cpu
from srserve.pipeline.switch import AdaptiveSwitch, fixed_switch_step, parse_policy

StepCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]


class Cancelled(RuntimeError):
    """Raised at a step boundary when the request's `should_cancel` returned True."""


@dataclass(frozen=True)
class GenerationResult:
    frames: np.ndarray  # (F, H, W, 3) float32 in [0, 1]
    switch_step: int
    num_inference_steps: int
    timings: dict[str, float]
    latents: torch.Tensor  # final latents, before decode


class SREngine:
    def __init__(self, family: Family) -> None:
        self.family = family

    @classmethod
    def load(cls, spec: ModelSpec, roles: Iterable[str] = ROLES) -> "SREngine":
        from srserve.pipeline.spec import validate_model_spec

        validate_model_spec(spec)
        return cls(load_family(spec, roles))

    @property
    def spec(self) -> ModelSpec:
        return self.family.spec

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """The request with the model's defaults filled in and its values checked against the model."""
        d = self.family.defaults
        resolved = request.model_copy(update={
            "num_inference_steps": request.num_inference_steps or d.num_inference_steps,
            "num_frames": request.num_frames or d.num_frames,
            "height": request.height or d.height,
            "width": request.width or d.width,
            "switch": request.switch or self.spec.default_switch,
            "guidance_scale_2": next(g for g in (request.guidance_scale_2, self.spec.default_guidance_scale_2,
                                                 request.guidance_scale) if g is not None),
        })
        parse_policy(resolved.switch)
        check_shape(resolved, self.family)
        return resolved

    # --- stages -------------------------------------------------------------------------------------------
    def encode(self, request: GenerationRequest) -> PromptEmbeddings:
        request = self.resolve(request)
        # negative embeddings are needed if either stage guides
        return self.family.encode(request.prompt, request.negative_prompt, request.max_sequence_length,
                                  max(request.guidance_scale, request.guidance_scale_2))

    def prepare(self, request: GenerationRequest, embeddings: PromptEmbeddings) -> HandoffState:
        """Step-0 state: seeded noise drawn as diffusers does, the scheduler set to N steps."""
        from diffusers.utils.torch_utils import randn_tensor

        request = self.resolve(request)
        generator = torch.Generator("cpu").manual_seed(request.seed)
        latents = randn_tensor(self.family.latent_shape(request), generator=generator, dtype=torch.float32)
        scheduler = self.family.new_scheduler("sketch")
        scheduler.set_timesteps(request.num_inference_steps, device=self.family.device)
        if hasattr(scheduler, "set_begin_index"):  # CogVideoX's schedulers have no begin index
            scheduler.set_begin_index(0)
        policy = parse_policy(request.switch)
        timesteps = scheduler.timesteps.to("cpu")
        switch_step = fixed_switch_step(policy, timesteps.tolist(), self.family.num_train_timesteps)
        cls_name, config, sched_state = capture_scheduler(scheduler)
        return HandoffState(
            request=request, family=self.family.name, latents=latents, step_index=0, timesteps=timesteps,
            scheduler_class=cls_name, scheduler_config=config, scheduler_state=sched_state,
            embeddings=embeddings, generator_state=generator.get_state(), switch_policy=str(policy),
            switch_step=switch_step,
        )

    def sketch(self, state: HandoffState, on_step: StepCallback | None = None,
               should_cancel: CancelCheck | None = None) -> HandoffState:
        return self._run("sketch", state, on_step, should_cancel)

    def render(self, state: HandoffState, on_step: StepCallback | None = None,
               should_cancel: CancelCheck | None = None) -> HandoffState:
        return self._run("render", state, on_step, should_cancel)

    def decode(self, state: HandoffState) -> np.ndarray:
        return self.family.decode(state.latents)

    def _run(self, role: str, state: HandoffState, on_step: StepCallback | None,
             should_cancel: CancelCheck | None) -> HandoffState:
        batch = DenoiseBatch(self.family, role)
        batch.add("request", state, on_step, should_cancel)
        finished: dict[str, HandoffState | BaseException] = {}
        while batch:
            finished.update(batch.step())
        result = finished["request"]
        if isinstance(result, BaseException):
            raise result
        return result

    def generate(self, request: GenerationRequest, on_step: StepCallback | None = None,
                 should_cancel: CancelCheck | None = None) -> GenerationResult:
        """The in-process SR pipeline."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        embeddings = self.encode(request)
        state = self.prepare(request, embeddings)
        timings["encode_seconds"] = time.perf_counter() - start
        for role in ("sketch", "render"):
            began = time.perf_counter()
            state = self._run(role, state, on_step, should_cancel)
            timings[f"{role}_seconds"] = time.perf_counter() - began
        began = time.perf_counter()
        frames = self.decode(state)
        timings["decode_seconds"] = time.perf_counter() - began
        timings["total_seconds"] = time.perf_counter() - start
        return GenerationResult(frames, int(state.switch_step), state.num_steps, timings, state.latents)


def check_shape(request: GenerationRequest, family: Family) -> None:
    """ValueError naming the field when the video shape does not fit the model's strides."""
    spatial = family.vae_scale_spatial * 2  # the transformers' patch size is (1, 2, 2)
    for name in ("height", "width"):
        value = getattr(request, name)
        if value % spatial:
            raise ValueError(f"{name} must be a multiple of {spatial} for this model, got {value}")
    if (request.num_frames - 1) % family.vae_scale_temporal:
        raise ValueError(f"num_frames must be {family.vae_scale_temporal}k+1 for this model, "
                         f"got {request.num_frames}")


@dataclass
class _Active:
    """One request inside a DenoiseBatch: live scheduler and generator, no copies per step."""

    state: HandoffState
    latents: torch.Tensor
    scheduler: Any
    generator: torch.Generator
    stop: int
    extras: dict[str, Any]
    step_index: int
    on_step: StepCallback | None
    should_cancel: CancelCheck | None
    adaptive: AdaptiveSwitch | None = None
    previous_output: torch.Tensor | None = None
    switch_step: int | None = None
    diffs: list[float] = field(default_factory=list)


class DenoiseBatch:
    """Advances requests of one role one denoising step at a time; same-shape requests share a forward pass.

    `add` admits a request at a step boundary, `step` runs one step for every active request and returns the
    ones that finished their segment (state, or the exception that ended them).
    """

    def __init__(self, family: Family, role: str, max_batch_size: int = 8) -> None:
        if role not in ("sketch", "render"):
            raise ValueError(f"role must be sketch or render, got {role!r}")
        self.family, self.role, self.max_batch_size = family, role, max_batch_size
        self.active: dict[str, _Active] = {}

    def __len__(self) -> int:
        return len(self.active)

    def add(self, key: str, state: HandoffState, on_step: StepCallback | None = None,
            should_cancel: CancelCheck | None = None) -> None:
        if key in self.active:
            raise ValueError(f"request {key!r} is already in this batch")
        device = self.family.device
        scheduler = restore_scheduler(state, device)
        generator = torch.Generator("cpu")
        generator.set_state(state.generator_state)
        extras = to_cpu(state.family_state)
        latents, scheduler = self.family.enter_role(self.role, state.latents.to(device), scheduler,
                                                    state.step_index, extras)
        item = _Active(state, latents, scheduler, generator, state.num_steps, extras, state.step_index, on_step,
                       should_cancel, previous_output=state.previous_output, switch_step=state.switch_step,
                       diffs=list(state.switch_diffs))
        if self.role == "sketch":
            if state.switch_step is None:
                policy = parse_policy(state.switch_policy)
                item.adaptive = AdaptiveSwitch.for_policy(policy, state.num_steps)
                item.adaptive.diffs = list(state.switch_diffs)
            else:
                item.stop = state.switch_step
        self.active[key] = item

    def step(self) -> dict[str, HandoffState | BaseException]:
        finished: dict[str, HandoffState | BaseException] = {}
        for key, item in list(self.active.items()):
            if item.step_index >= item.stop:
                finished[key] = self._retire(key)
            elif item.should_cancel is not None and item.should_cancel():
                del self.active[key]
                finished[key] = Cancelled(f"cancelled at step {item.step_index}")
        for group in self._groups():
            try:
                self._step_group(group)
            except Exception as err:  # a failing forward fails its requests, not the whole replica
                for key, _ in group:
                    self.active.pop(key, None)
                    finished[key] = err
        for key, item in list(self.active.items()):
            if item.step_index >= item.stop:
                finished[key] = self._retire(key)
        return finished

    def _groups(self) -> list[list[tuple[str, _Active]]]:
        groups: dict[tuple, list[tuple[str, _Active]]] = {}
        for key, item in self.active.items():
            emb = item.state.embeddings
            shape_key = (tuple(item.latents.shape), tuple(emb.prompt_embeds.shape),
                         emb.negative_prompt_embeds is None)
            groups.setdefault(shape_key, []).append((key, item))
        return [g[i:i + self.max_batch_size] for g in groups.values() for i in range(0, len(g), self.max_batch_size)]

    def _step_group(self, group: list[tuple[str, _Active]]) -> None:
        inputs = []
        for _, item in group:
            i, request = item.step_index, item.state.request
            sigmas = getattr(item.scheduler, "sigmas", None)
            inputs.append(StepInput(
                latents=item.latents, timestep=item.scheduler.timesteps[i], step_index=i,
                num_steps=item.state.num_steps, sigma=float(sigmas[i]) if sigmas is not None else None,
                embeddings=item.state.embeddings,
                guidance_scale=request.guidance_scale_2 if self.role == "render" else request.guidance_scale,
            ))
        outputs = self.family.predict(self.role, inputs)
        for (_, item), step, output in zip(group, inputs, outputs):
            item.latents = self.family.scheduler_step(item.scheduler, output, step, item.extras, item.generator)
            if item.adaptive is not None:
                self._observe(item, output)
            item.previous_output = output
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
        if item.adaptive.observe(item.step_index, change):
            item.stop = item.step_index + 1
            item.switch_step = item.stop
        item.diffs = list(item.adaptive.diffs)

    def _retire(self, key: str) -> HandoffState:
        item = self.active.pop(key)
        cls_name, config, sched_state = capture_scheduler(item.scheduler)
        switch_step = item.switch_step
        if self.role == "sketch" and switch_step is None:
            switch_step = item.step_index
        return item.state.replace(
            latents=to_cpu(item.latents), step_index=item.step_index, scheduler_class=cls_name,
            scheduler_config=config, scheduler_state=sched_state, generator_state=item.generator.get_state(),
            switch_step=switch_step, switch_diffs=tuple(item.diffs),
            previous_output=to_cpu(item.previous_output) if self.role == "sketch" else None,
            family_state=to_cpu(item.extras),
        )
