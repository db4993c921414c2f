"""The simulated engine: the real serving stack's engine interface with no weights, no torch and no diffusers, so
a simulated replica costs little more memory than Ray Serve's own (docs/simulation.md, "Memory").

Each step spends the time the named model takes on the named GPU at the request's shape (the cost table),
slept x the spec's time factor. States have the real size: latents (1, 16, 21, 60, 104) float32 at 832x480x81,
prompt embeddings 2 x (1, 512, 4096) bf16 (held as uint16 words: numpy has no bfloat16), the real UniPC
schedule. Nothing is computed on them: the latents pass through unchanged, and they cross the object store as raw
numpy buffers that the receiver reads in place. Decode returns a small placeholder video with the real frame count
(`SimSpec.preview_size`).

The adaptive switch: the sketch's guided outputs are a scalar sequence built so that SRDiffusion's own rule
(`AdaptiveSwitch`) fires after the step drawn for the request: k = the switch distribution's quantile at u, a
uniform draw from the request's seed, scaled to N; the rule's own bounds and a switch cap (`adaptive:...:max=K`)
still apply. Before step k the rule's d_i rises (no drop); from k on it falls by 1e-4 per step (below any
threshold above 1e-4; a smaller threshold switches at the rule's max). Fixed policies (step:K, ratio:R, none)
switch where they say.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from srserve.config import GenerationRequest, ModelSpec
from srserve.pipeline.card import model_card, resolve
from srserve.pipeline.errors import Cancelled
from srserve.pipeline.families.registry import ROLES, SIM, read_config
from srserve.pipeline.stepping import (CancelCheck, GenerationResult, PromptEmbeddings, StepBoundaries,
                                       StepCallback, generate)
from srserve.pipeline.switch import AdaptiveSwitch, fixed_switch_step, parse_policy

SIM_STATE_VERSION = 1
BF16 = np.uint16  # the embeddings' dtype on the wire: two bytes per value, as bf16
RISE, DROP = 1e-5, 1e-4  # per-step change of the rule's d_i before / after the drawn switch step
BASE_CHANGE = 0.05  # the relative change of the outputs at step 1
_TRACES: dict[int, list[tuple[float, float]]] = {}  # target -> the outputs so far (shared by requests)


@dataclass(frozen=True)
class SimState:
    """A simulated request between stages: the fields the serving stack reads of a `HandoffState`."""

    request: GenerationRequest  # resolved
    latents: np.ndarray
    timesteps: tuple[int, ...]
    step_index: int  # the next denoising step to run
    embeddings: PromptEmbeddings | None  # None while shipped apart
    switch_step: int | None  # number of sketch steps; None until the adaptive rule decides
    switch_diffs: tuple[float, ...] = ()
    family: str = "sim"
    version: int = SIM_STATE_VERSION

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.step_index >= self.num_steps

    def replace(self, **changes: Any) -> SimState:
        return dataclasses.replace(self, **changes)

    def for_decode(self) -> SimState:
        return self.replace(embeddings=None, switch_diffs=())

    def nbytes(self) -> int:
        emb = self.embeddings
        parts = [self.latents] + ([emb.prompt_embeds, emb.negative_prompt_embeds] if emb is not None else [])
        return sum(p.nbytes for p in parts if p is not None)


def flow_timesteps(scheduler_config: dict[str, Any], num_steps: int) -> tuple[int, ...]:
    """The timesteps diffusers' UniPCMultistepScheduler sets with `use_flow_sigmas` (Wan's scheduler config), in
    numpy: shifted flow sigmas from 1 down to 1 / num_train_timesteps, times num_train_timesteps, truncated."""
    if not scheduler_config.get("use_flow_sigmas"):
        raise ValueError("the simulated family needs a flow-sigma scheduler config (use_flow_sigmas: true)")
    train, shift = int(scheduler_config.get("num_train_timesteps", 1000)), float(scheduler_config["flow_shift"])
    sigmas = np.linspace(1, 1 / train, num_steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    if abs(sigmas[0] - 1) < 1e-6:
        sigmas[0] -= 1e-6
    return tuple(int(t) for t in (sigmas * train).astype(np.int64))


def seed_uniform(seed: int) -> float:
    """A uniform draw in [0, 1) that is a function of the seed alone: where in the switch distribution a request
    falls."""
    return float(np.random.default_rng(seed).random())


class SimFamily:
    """The simulated model's facts and costs: shapes from its configs, seconds from the cost table."""

    name = "sim"

    def __init__(self, spec: ModelSpec, roles: tuple[str, ...], sleep: Callable[[float], None] = time.sleep) -> None:
        from srserve.sim.spec import load_sim_spec

        def config(*parts: str) -> dict[str, Any]:
            return read_config(os.path.join(spec.base_path, *parts), f"the simulated model's {parts[0]}")

        self.spec, self.roles, self.sleep = spec, tuple(roles), sleep
        self.sim = load_sim_spec(spec)
        self.table = self.sim.cost_table(spec.base_path)
        self.switch = self.sim.switch()
        self.scheduler_config = config("scheduler", "scheduler_config.json")
        vae_config = config("vae", "config.json")
        self.text_dim = int(config("transformer", "config.json").get("text_dim", 4096))
        self.num_train_timesteps = int(self.scheduler_config.get("num_train_timesteps", 1000))
        self.vae_scale_temporal, self.vae_scale_spatial = SIM.vae_scales(vae_config)
        self.latent_channels = int(vae_config.get("z_dim", 16))
        self.simulated_seconds = dict.fromkeys(ROLES, 0.0)

    def spend(self, role: str, seconds: float) -> None:
        self.simulated_seconds[role] += seconds
        if self.sim.time_factor > 0 and seconds > 0:
            self.sleep(seconds * self.sim.time_factor)

    def video_shape(self, latents: np.ndarray) -> tuple[int, int, int]:
        """(frames, height, width) of the video that `latents` decode to."""
        t, h, w = latents.shape[-3:]
        return (int(t) - 1) * self.vae_scale_temporal + 1, int(h) * self.vae_scale_spatial, \
            int(w) * self.vae_scale_spatial

    def latent_shape(self, request: GenerationRequest) -> tuple[int, ...]:
        frames = (request.num_frames - 1) // self.vae_scale_temporal + 1
        return (1, self.latent_channels, frames, request.height // self.vae_scale_spatial,
                request.width // self.vae_scale_spatial)

    def target_switch(self, seed: int, num_steps: int) -> int:
        """The switch step drawn for a request: the switch distribution's quantile at the seed's uniform draw,
        scaled to `num_steps`."""
        return self.switch.quantile_steps(min(seed_uniform(seed), 1.0 - 1e-12), num_steps)

    def step_seconds(self, role: str, batch: list[SimState]) -> float:
        """Simulated seconds of one step of `batch` (same shape) in `role`."""
        scale = (lambda s: s.request.guidance_scale_2) if role == "render" else (lambda s: s.request.guidance_scale)
        guided = batch[0].embeddings.negative_prompt_embeds is not None and any(scale(s) != 1.0 for s in batch)
        return self.table.step_seconds(self.sim.model_for(role), self.sim.gpu_for(role),
                                       self.video_shape(batch[0].latents), batch=len(batch), guided=guided)


def sketch_output(target: int, step_index: int) -> float:
    """The scalar guided output at `step_index` whose relative changes make the adaptive rule fire after
    `target` steps: changes r_i rise (d_i = tanh r_i rises: no drop) until step target - 1, then
    d_i = d_{i-1} - DROP. The value moves up and down by r_i in turn, so it stays near 1 for any N."""
    trace = _TRACES.setdefault(target, [(1.0, BASE_CHANGE)])  # (value, change) at steps 0, 1, ...
    while len(trace) <= step_index:
        i = len(trace)
        value, change = trace[-1]
        if i < target - 1 or i == 1:
            change = BASE_CHANGE + RISE * (i - 1)
        else:
            change = math.atanh(max(math.tanh(change) - DROP, 1e-6))
        trace.append((value * (1.0 + change if i % 2 else 1.0 - change), change))
    return trace[step_index][0]


def relative_change(output: float, previous: float) -> float:
    """mean|o_i - o_{i-1}| / mean|o_{i-1}| of one-value outputs, in float32 as `DenoiseBatch` computes it."""
    out, prev = np.float32(output), np.float32(previous)
    return float(np.abs(out - prev) / max(np.abs(prev), np.float32(1e-12)))


@dataclass
class _Active:
    state: SimState
    step_index: int
    stop: int  # the segment ends before this step
    on_step: StepCallback | None
    should_cancel: CancelCheck | None
    adaptive: AdaptiveSwitch | None = None
    target: int = 0  # the drawn switch step (adaptive sketch)
    previous: float | None = None  # the last guided output (adaptive sketch)

    @property
    def latents(self) -> np.ndarray:
        return self.state.latents  # never changed: nothing is computed


class SimBatch(StepBoundaries):
    """`DenoiseBatch`'s interface over simulated states: same-shape requests share a step, whose cost the table
    gives for the batch's size."""

    def __init__(self, family: SimFamily, role: str, max_batch_size: int = 8) -> None:
        if role not in ("sketch", "render"):
            raise ValueError(f"role must be sketch or render, got {role!r}")
        self.family, self.role, self.forward_size = family, role, max_batch_size
        self.active: dict[str, _Active] = {}

    def add(self, key: str, state: SimState, on_step: StepCallback | None = None,
            should_cancel: CancelCheck | None = None) -> None:
        if key in self.active:
            raise ValueError(f"request {key!r} is already in this batch")
        if not isinstance(state, SimState) or state.version != SIM_STATE_VERSION:
            raise ValueError(f"a simulated {self.role} batch takes SimState version {SIM_STATE_VERSION}, got "
                             f"{type(state).__name__} version {getattr(state, 'version', None)}")
        if state.embeddings is None:
            raise ValueError("the state has no embeddings (shipped apart?): re-attach them before a denoising stage")
        item = _Active(state, state.step_index, state.num_steps, on_step, should_cancel)
        if self.role == "sketch":
            if state.switch_step is None:
                if state.step_index > 0:
                    raise ValueError(f"an adaptive sketch runs from step 0 in one segment; this state is at step "
                                     f"{state.step_index}")
                item.adaptive = AdaptiveSwitch.for_policy(parse_policy(state.request.switch), state.num_steps)
                item.target = self.family.target_switch(state.request.seed, state.num_steps)
            else:
                item.stop = state.switch_step
        self.active[key] = item

    def discard(self, key: str) -> None:
        self._drop(key)

    def _drop(self, key: str) -> _Active | None:
        return self.active.pop(key, None)

    @staticmethod
    def _shape_key(item: _Active) -> tuple:
        emb = item.state.embeddings
        return item.state.latents.shape, emb.prompt_embeds.shape, emb.negative_prompt_embeds is None

    def _step_group(self, group: list[tuple[str, _Active]]) -> None:
        states = [item.state for _, item in group]
        self.family.spend(self.role, self.family.step_seconds(self.role, states))
        for _, item in group:
            if item.adaptive is not None:
                output = sketch_output(item.target, item.step_index)
                change = None if item.previous is None else relative_change(output, item.previous)
                item.previous = output
                if item.adaptive.observe(item.step_index, change):
                    item.stop = item.step_index + 1
            item.step_index += 1
            if item.on_step is not None:
                item.on_step(item.step_index, item.state.num_steps)

    def _retire(self, key: str) -> SimState:
        item = self.active.pop(key)
        changes: dict[str, Any] = {}
        if item.adaptive is not None:
            changes = {"switch_step": item.step_index, "switch_diffs": tuple(item.adaptive.diffs)}
        return item.state.replace(step_index=item.step_index, **changes)


class SimEngine:
    """`SREngine`'s interface for the simulated family: resolve, encode, prepare, a step-level batch, decode."""

    def __init__(self, family: SimFamily) -> None:
        self.family = family
        self.card = model_card(family.spec)

    @classmethod
    def load(cls, spec: ModelSpec, roles: Iterable[str] = ROLES) -> SimEngine:
        from srserve.pipeline.spec import validate_model_spec

        validate_model_spec(spec)
        return cls(SimFamily(spec, tuple(roles)))

    @property
    def spec(self) -> ModelSpec:
        return self.family.spec

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        return resolve(request, self.card)

    def encode(self, request: GenerationRequest) -> PromptEmbeddings:
        request = self.resolve(request)
        self.family.spend("encode", self.family.table.text_encode_seconds(self.family.sim.gpu_for("encode")))
        positive = np.zeros((1, request.max_sequence_length, self.family.text_dim), dtype=BF16)
        guided = max(request.guidance_scale, request.guidance_scale_2) > 1.0
        return PromptEmbeddings(positive, np.zeros_like(positive) if guided else None)

    def prepare(self, request: GenerationRequest, embeddings: PromptEmbeddings | None) -> SimState:
        """Step-0 state: real-size latents (zeros: nothing reads their values), the real schedule."""
        request = self.resolve(request)
        timesteps = flow_timesteps(self.family.scheduler_config, request.num_inference_steps)
        switch_step = fixed_switch_step(parse_policy(request.switch), timesteps, self.family.num_train_timesteps)
        latents = np.zeros(self.family.latent_shape(request), dtype=np.float32)
        return SimState(request, latents, timesteps, 0, embeddings, switch_step)

    def new_batch(self, role: str, max_batch_size: int = 8) -> SimBatch:
        return SimBatch(self.family, role, max_batch_size)

    def decode(self, state: SimState, should_cancel: CancelCheck | None = None) -> np.ndarray:
        if not state.done:
            raise ValueError(f"decode needs a fully denoised state; this one is at step {state.step_index} of "
                             f"{state.num_steps}")
        if should_cancel is not None and should_cancel():
            raise Cancelled("cancelled before decode")
        shape = self.family.video_shape(state.latents)
        self.family.spend("decode", self.family.table.vae_decode_seconds(self.family.sim.gpu_for("decode"), shape))
        height, width = self.family.sim.preview_size
        return np.full((shape[0], height, width, 3), 0.5, dtype=np.float32)

    def generate(self, request: GenerationRequest, on_step: StepCallback | None = None,
                 should_cancel: CancelCheck | None = None) -> GenerationResult:
        """The whole simulated pipeline in this process."""
        return generate(self, request, on_step, should_cancel)


__all__ = ["SimBatch", "SimEngine", "SimFamily", "SimState", "flow_timesteps"]
