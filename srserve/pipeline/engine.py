"""The SR engine: encode -> sketch (large model, steps [0, k)) -> render (small model, [k, N)) -> decode.

The phases of diffusers' `WanPipeline.__call__`, each a stage that returns what the next one takes: resolve the
request (check inputs, defaults), encode the prompt, prepare timesteps and latents (a step-0 `HandoffState`),
denoise (sketch then render, through `DenoiseBatch`), decode. The same code runs in one process
(`SREngine.generate`) or across Ray Serve replicas, the state pickled in between.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from srserve.config import GenerationRequest, ModelSpec
from srserve.pipeline.batch import DenoiseBatch, cancel_between_calls
from srserve.pipeline.errors import Cancelled, ModelSpecError
from srserve.pipeline.families import ROLES, Family, family_info, load_family
from srserve.pipeline.handoff import HandoffState, PromptEmbeddings, capture_scheduler
from srserve.pipeline.stepping import CancelCheck, GenerationResult, StepCallback, generate, run_segment
from srserve.pipeline.switch import fixed_switch_step, parse_policy

__all__ = ["CancelCheck", "Cancelled", "DenoiseBatch", "GenerationResult", "SREngine", "StepCallback"]


class SREngine:
    def __init__(self, family: Family) -> None:
        from srserve.pipeline.card import model_card

        self.family = family
        self.card = model_card(family.spec)  # defaults and strides, read once from the spec's configs

    @classmethod
    def load(cls, spec: ModelSpec, roles: Iterable[str] = ROLES) -> "SREngine":
        from srserve.pipeline.spec import validate_model_spec

        validate_model_spec(spec)
        engine = family_info(spec.family).engine
        if engine != f"{__name__}:{cls.__name__}":
            raise ModelSpecError(f"the {spec.family} family runs on its own engine ({engine}): load it with "
                                 "srserve.pipeline.families.load_engine")
        return cls(load_family(spec, roles))

    @property
    def spec(self) -> ModelSpec:
        return self.family.spec

    # --- 1. check inputs ----------------------------------------------------------------------------------
    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """The request with the model's defaults filled in and checked: `srserve.pipeline.card.resolve`, the
        resolver the ingress runs too (RequestError, a ValueError, names the field)."""
        from srserve.pipeline.card import resolve

        return resolve(request, self.card)  # idempotent: a resolved request comes back as it was

    # --- 2. encode the prompt -----------------------------------------------------------------------------
    def encode(self, request: GenerationRequest) -> PromptEmbeddings:
        request = self.resolve(request)
        # negative embeddings are needed if either stage guides
        return self.family.encode(request.prompt, request.negative_prompt, request.max_sequence_length,
                                  max(request.guidance_scale, request.guidance_scale_2))

    # --- 3. timesteps and latents -------------------------------------------------------------------------
    def prepare(self, request: GenerationRequest, embeddings: PromptEmbeddings | None) -> HandoffState:
        """Step-0 state: seeded noise drawn as diffusers does, the scheduler set to N steps. `embeddings` may be
        None when they travel apart (attach them before a denoising stage)."""
        from diffusers.utils.torch_utils import randn_tensor

        request = self.resolve(request)
        generator = torch.Generator("cpu").manual_seed(request.seed)
        latents = randn_tensor(self.family.latent_shape(request), generator=generator, dtype=torch.float32)
        scheduler = self.family.new_scheduler("sketch")
        scheduler.set_timesteps(request.num_inference_steps, device=self.family.device)
        if hasattr(scheduler, "set_begin_index"):  # CogVideoX's schedulers have no begin index
            scheduler.set_begin_index(0)
        timesteps = scheduler.timesteps.to("cpu")
        switch_step = fixed_switch_step(parse_policy(request.switch), timesteps.tolist(),
                                        self.family.num_train_timesteps)
        cls_name, config, sched_state = capture_scheduler(scheduler)
        return HandoffState(
            request=request, family=self.family.name, latents=latents, step_index=0, timesteps=timesteps,
            scheduler_class=cls_name, scheduler_config=config, scheduler_state=sched_state,
            embeddings=embeddings, generator_state=generator.get_state(), switch_step=switch_step,
        )

    def new_batch(self, role: str, max_batch_size: int = 8) -> DenoiseBatch:
        """A step-level batch of this engine's `role` (what a Sketch or Render replica runs)."""
        return DenoiseBatch(self.family, role, max_batch_size=max_batch_size)

    # --- 4. the denoising loop: the large model's steps, then the small model's ---------------------------
    def sketch(self, state: HandoffState, on_step: StepCallback | None = None,
               should_cancel: CancelCheck | None = None) -> HandoffState:
        return self._run("sketch", state, on_step, should_cancel)

    def render(self, state: HandoffState, on_step: StepCallback | None = None,
               should_cancel: CancelCheck | None = None) -> HandoffState:
        return self._run("render", state, on_step, should_cancel)

    def _run(self, role: str, state: HandoffState, on_step: StepCallback | None,
             should_cancel: CancelCheck | None) -> HandoffState:
        return run_segment(self.new_batch(role), state, on_step, should_cancel)

    # --- 5. decode ----------------------------------------------------------------------------------------
    def decode(self, state: HandoffState, should_cancel: CancelCheck | None = None) -> np.ndarray:
        """Frames of a fully denoised state (whole, or `state.for_decode()`: decode reads only the latents).
        `should_cancel` is checked before each chunk the VAE decodes (raising `Cancelled`)."""
        if not state.done:
            raise ValueError(f"decode needs a fully denoised state; this one is at step {state.step_index} of "
                             f"{state.num_steps}")
        if should_cancel is not None and should_cancel():
            raise Cancelled("cancelled before decode")
        decoder = getattr(getattr(self.family, "vae", None), "decoder", None)
        with cancel_between_calls(decoder, should_cancel, "decode"):
            return self.family.decode(state.latents)

    # --- all of it in one process ---------------------------------------------------------------------------
    def generate(self, request: GenerationRequest, on_step: StepCallback | None = None,
                 should_cancel: CancelCheck | None = None) -> GenerationResult:
        """The in-process SR pipeline."""
        return generate(self, request, on_step, should_cancel)
