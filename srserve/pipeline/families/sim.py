"""The simulated family: the real serving stack with replicas that load no weights and spend, on each step, the time
the named model takes on the named GPU at the request's shape (the cost table), slept x the spec's time factor.

States have the real size: latents (1, 16, 21, 60, 104) float32 at 832x480x81, prompt embeddings 2 x (1, 512, 4096)
bf16, the real UniPC schedule. Nothing is computed on them: the latents pass through unchanged. Decode returns a
small placeholder video with the real frame count (`SimSpec.preview_size`).

The adaptive switch: the sketch's guided outputs are a scalar sequence built so that SRDiffusion's own rule
(`AdaptiveSwitch`, fed by `DenoiseBatch`) fires after the step drawn for the request: k = the switch distribution's
quantile at u = Phi(first value of the request's initial noise) (uniform per seed), scaled to N; the rule's own
bounds and a switch cap (`adaptive:...:max=K`) still apply. Before step k the rule's d_i rises (no drop); from k on
it falls by 1e-4 per step (below any threshold above 1e-4; a smaller threshold switches at the rule's max). Fixed
policies (step:K, ratio:R, none) switch where they say.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np
import torch

from srserve.config import GenerationRequest, ModelSpec
from srserve.pipeline.card import model_card
from srserve.pipeline.families.base import Defaults, StepInput, read_json
from srserve.pipeline.families.registry import SIM
from srserve.pipeline.handoff import PromptEmbeddings

RISE, DROP = 1e-5, 1e-4  # per-step change of the rule's d_i before / after the drawn switch step
BASE_CHANGE = 0.05  # the relative change of the outputs at step 1
_TRACES: dict[int, list[tuple[float, float]]] = {}  # target -> the outputs so far (shared by requests)


class SimFamily:
    name = "sim"

    def __init__(self, spec: ModelSpec, roles: tuple[str, ...], sleep: Callable[[float], None] = time.sleep) -> None:
        from srserve.sim.spec import load_sim_spec

        self.spec, self.roles, self.sleep = spec, tuple(roles), sleep
        self.device = torch.device("cpu")
        self.sim = load_sim_spec(spec)
        self.table = self.sim.cost_table(spec.base_path)
        self.switch = self.sim.switch()
        self.scheduler_config = read_json(spec.base_path, "scheduler", "scheduler_config.json")
        self.vae_config = read_json(spec.base_path, "vae", "config.json")
        self.text_dim = int(read_json(spec.base_path, "transformer", "config.json").get("text_dim", 4096))
        self.num_train_timesteps = int(self.scheduler_config.get("num_train_timesteps", 1000))
        self.vae_scale_temporal, self.vae_scale_spatial = SIM.vae_scales(self.vae_config)
        self.latent_channels = int(self.vae_config.get("z_dim", 16))
        card = model_card(spec)
        self.defaults = Defaults(card.default_num_frames, card.default_height, card.default_width, card.default_steps)
        self.transformers: dict[str, torch.nn.Module] = {}  # no weights: no step cache either
        self.simulated_seconds = {role: 0.0 for role in ("encode", "sketch", "render", "decode")}

    # --- time ---------------------------------------------------------------------------------------------------
    def _spend(self, role: str, seconds: float) -> None:
        self.simulated_seconds[role] += seconds
        if self.sim.time_factor > 0 and seconds > 0:
            self.sleep(seconds * self.sim.time_factor)

    def _shape(self, latents: torch.Tensor) -> tuple[int, int, int]:
        t, h, w = latents.shape[-3:]
        return (int(t) - 1) * self.vae_scale_temporal + 1, int(h) * self.vae_scale_spatial, \
            int(w) * self.vae_scale_spatial

    # --- encode -------------------------------------------------------------------------------------------------
    def encode(self, prompt: str, negative_prompt: str, max_sequence_length: int,
               guidance_scale: float) -> PromptEmbeddings:
        self._spend("encode", self.table.text_encode_seconds(self.sim.gpu_for("encode")))
        positive = torch.zeros(1, max_sequence_length, self.text_dim, dtype=torch.bfloat16)
        negative = torch.zeros_like(positive) if guidance_scale > 1.0 else None
        return PromptEmbeddings(positive, negative)

    # --- denoise ------------------------------------------------------------------------------------------------
    def latent_shape(self, request: GenerationRequest) -> tuple[int, ...]:
        frames = (request.num_frames - 1) // self.vae_scale_temporal + 1
        return (1, self.latent_channels, frames, request.height // self.vae_scale_spatial,
                request.width // self.vae_scale_spatial)

    def new_scheduler(self, role: str) -> Any:
        import diffusers

        return getattr(diffusers, self.scheduler_config["_class_name"]).from_config(self.scheduler_config)

    def step_seconds(self, role: str, batch: list[StepInput]) -> float:
        """Simulated seconds of one step of `batch` (same shape) in `role`."""
        guided = batch[0].embeddings.negative_prompt_embeds is not None and any(s.guidance_scale != 1.0 for s in batch)
        return self.table.step_seconds(self.sim.model_for(role), self.sim.gpu_for(role), self._shape(batch[0].latents),
                                       batch=len(batch), guided=guided)

    def predict(self, role: str, batch: list[StepInput]) -> list[torch.Tensor]:
        self._spend(role, self.step_seconds(role, batch))
        if role != "sketch":
            return [torch.zeros(1) for _ in batch]
        return [torch.tensor([self._output(self.target_switch(s.latents, s.num_steps), s.step_index)],
                             dtype=torch.float32) for s in batch]

    def target_switch(self, latents: torch.Tensor, num_steps: int) -> int:
        """The switch step drawn for a request: its initial noise's first value, through the normal CDF (uniform
        per seed), into the switch distribution scaled to `num_steps` (latents pass through unchanged)."""
        x = float(latents.reshape(-1)[0])
        u = min(max(0.5 * (1.0 + math.erf(x / math.sqrt(2.0))), 0.0), 1.0 - 1e-12)
        return self.switch.quantile_steps(u, num_steps)

    @staticmethod
    def _output(target: int, step_index: int) -> float:
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

    def scheduler_step(self, scheduler: Any, output: torch.Tensor, step: StepInput, family_state: dict[str, Any],
                       generator: torch.Generator) -> torch.Tensor:
        return step.latents  # nothing is computed: the state keeps its size and passes on

    def enter_role(self, role: str, latents: torch.Tensor, scheduler: Any, step_index: int,
                   family_state: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        return latents, scheduler

    # --- decode -------------------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        shape = self._shape(latents)
        self._spend("decode", self.table.vae_decode_seconds(self.sim.gpu_for("decode"), shape))
        height, width = self.sim.preview_size
        return np.full((shape[0], height, width, 3), 0.5, dtype=np.float32)
