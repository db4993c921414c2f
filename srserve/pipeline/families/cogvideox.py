"""CogVideoX (T2V): T5 text encoder, CogVideoXTransformer3DModel, AutoencoderKLCogVideoX, CogVideoX DDIM/DPM.

Mirrors diffusers' `CogVideoXPipeline` step for step, so that a run here equals a run there. Latents are
(B, T, C, H, W): frames before channels.

CogVideoX-5b (sketch) and -2b (render) share T5 and VAE weights but not the VAE `scaling_factor` (0.7 vs
1.15258426) nor the schedule (`snr_shift_scale` 1.0 vs 3.0). The latents therefore live in one of three spaces,
recorded in `family_state["space"]`: "sketch" or "render" (that model's scaled latents at that model's noise level),
or "vae" (clean, unscaled: the last step divides by the scaling factor, as `decode_latents` does, so that
decoding never depends on which model ran last). Crossing from sketch to render re-times the latents with
`retime_latents`, using the last step's x0 prediction kept in `family_state["pred_original_sample"]` (which is also
the DPM solver's `old_pred_original_sample`).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from srserve.config import GenerationRequest, ModelSpec
from srserve.pipeline.caches import step_cache
from srserve.pipeline.card import model_card
from srserve.pipeline.families.base import (
    DTYPES, Defaults, StepInput, load_transformer, read_json, role_path, stack, step_accepts_generator,
)
from srserve.pipeline.families.registry import COGVIDEOX
from srserve.pipeline.handoff import PromptEmbeddings

X0 = "pred_original_sample"


class CogVideoXFamily:
    name = "cogvideox"

    def __init__(self, spec: ModelSpec, roles: tuple[str, ...]) -> None:
        from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
        from diffusers.video_processor import VideoProcessor

        self.spec = spec
        self.device = torch.device(spec.device)
        self.dtype = DTYPES[spec.dtype]
        # diffusers' `use_dynamic_cfg` (recommended for CogVideoX-5b with DPM).
        self.use_dynamic_cfg = spec.use_dynamic_cfg
        render_base = spec.render_base_path or spec.base_path
        self.vae_config = read_json(spec.base_path, "vae", "config.json")
        self.scheduler_configs = {"sketch": read_json(spec.base_path, "scheduler", "scheduler_config.json")}
        self.scheduler_configs["render"] = _read_json_or(
            self.scheduler_configs["sketch"], render_base, "scheduler", "scheduler_config.json")
        render_vae = read_json(render_base, "vae", "config.json")
        self.scaling = {"sketch": float(self.vae_config.get("scaling_factor", 1.15258426)),
                        "render": float(render_vae.get("scaling_factor", 1.15258426))}
        self.transformer_configs = {r: read_json(role_path(spec, r), "config.json") for r in ("sketch", "render")}
        # The text length is the model's, not the request's: sincos position embeddings (2B) fix it, and the
        # diffusers default (226) is what both checkpoints were trained with. The spec check makes both equal.
        self.text_seq_len = int(self.transformer_configs["sketch"].get("max_text_seq_length", 226))
        self.num_train_timesteps = int(self.scheduler_configs["sketch"].get("num_train_timesteps", 1000))
        self.vae_scale_temporal, self.vae_scale_spatial = COGVIDEOX.vae_scales(self.vae_config)
        self.latent_channels = int(self.transformer_configs["sketch"].get("in_channels", 16))
        card = model_card(spec)  # the defaults requests are resolved with
        self.defaults = Defaults(card.default_num_frames, card.default_height, card.default_width,
                                 card.default_steps)
        self.transformers: dict[str, torch.nn.Module] = {}
        self._input_schedulers: dict[str, Any] = {}
        for role in ("sketch", "render"):
            if role in roles:
                self.transformers[role] = load_transformer(CogVideoXTransformer3DModel, spec, role,
                                                           COGVIDEOX.attention_backends)
                self._input_schedulers[role] = self.new_scheduler(role)
        self._rotary: dict[tuple, Any] = {}
        self.tokenizer = self.text_encoder = self.vae = None
        if "encode" in roles:
            from transformers import AutoTokenizer, T5EncoderModel

            self.tokenizer = AutoTokenizer.from_pretrained(os.path.join(spec.base_path, "tokenizer"))
            self.text_encoder = T5EncoderModel.from_pretrained(
                os.path.join(spec.base_path, "text_encoder"), torch_dtype=self.dtype).to(self.device).eval()
        if "decode" in roles:
            self.vae = AutoencoderKLCogVideoX.from_pretrained(
                os.path.join(spec.base_path, "vae"), torch_dtype=self.dtype).to(self.device).eval()
            self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_spatial)

    # --- encode -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompt: str, negative_prompt: str, max_sequence_length: int,
               guidance_scale: float) -> PromptEmbeddings:
        """T5 embeddings at the model's text length (`max_sequence_length` is not used, see __init__)."""
        if self.text_encoder is None:
            raise RuntimeError("this engine was loaded without the 'encode' role")
        positive = self._t5_embeds(prompt)
        negative = self._t5_embeds(negative_prompt or "") if guidance_scale > 1.0 else None
        return PromptEmbeddings(positive, negative)

    def _t5_embeds(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer([prompt], padding="max_length", max_length=self.text_seq_len, truncation=True,
                             add_special_tokens=True, return_tensors="pt").input_ids
        # No attention mask and no zeroed padding: CogVideoX was trained on the full padded sequence.
        return self.text_encoder(ids.to(self.device))[0].to(self.dtype).to("cpu")

    # --- denoise ------------------------------------------------------------------------------------------
    def latent_shape(self, request: GenerationRequest) -> tuple[int, ...]:
        frames = (request.num_frames - 1) // self.vae_scale_temporal + 1
        patch_t = self.transformer_configs["sketch"].get("patch_size_t")
        if patch_t and frames % patch_t:  # diffusers pads CogVideoX 1.5 latents; we do not (yet)
            raise ValueError(f"num_frames={request.num_frames} gives {frames} latent frames, not a multiple of "
                             f"this model's patch_size_t={patch_t}")
        return (1, frames, self.latent_channels, request.height // self.vae_scale_spatial,
                request.width // self.vae_scale_spatial)

    def new_scheduler(self, role: str) -> Any:
        import diffusers

        config = self.scheduler_configs["render" if role == "render" else "sketch"]
        return getattr(diffusers, config["_class_name"]).from_config(config)

    def _rotary_embeds(self, role: str, latents: torch.Tensor) -> Any:
        model = self.transformers[role]
        if not model.config.use_rotary_positional_embeddings:
            return None
        key = (role, tuple(latents.shape[1:]))
        if key not in self._rotary:
            from diffusers import CogVideoXPipeline

            # diffusers' own code, on a stand-in for the pipeline (it reads only these two attributes).
            owner = SimpleNamespace(vae_scale_factor_spatial=self.vae_scale_spatial, transformer=model)
            self._rotary[key] = CogVideoXPipeline._prepare_rotary_positional_embeddings(
                owner, latents.size(3) * self.vae_scale_spatial, latents.size(4) * self.vae_scale_spatial,
                latents.size(1), self.device)
        return self._rotary[key]

    @torch.no_grad()
    def predict(self, role: str, batch: list[StepInput]) -> list[torch.Tensor]:
        """Guided model output per request; CFG batched as diffusers does: [uncond..., cond...] in one forward."""
        model = self.transformers[role]
        cache = step_cache(model)
        if cache is not None and len(batch) != 1:
            raise ValueError(f"the {role} model has a step cache: it steps one request at a time, got {len(batch)}")
        first = batch[0]
        cfg = first.embeddings.negative_prompt_embeds is not None
        sched = self._input_schedulers[role]
        latents = stack([sched.scale_model_input(s.latents, s.timestep) for s in batch]).to(self.device, self.dtype)
        embeds = stack([s.embeddings.prompt_embeds for s in batch])
        timestep = torch.stack([s.timestep for s in batch]).to(self.device)
        if cfg:
            embeds = torch.cat([stack([s.embeddings.negative_prompt_embeds for s in batch]), embeds])
            latents, timestep = torch.cat([latents, latents]), torch.cat([timestep, timestep])
        # the cache's state is the request's own (named by its batch key), at its own global step
        scope = contextlib.nullcontext() if cache is None else cache.context(
            first.key, "cond_uncond", first.step_index, first.num_steps, first.timestep, first.sigma)
        with scope:
            out = model(hidden_states=latents, encoder_hidden_states=embeds.to(self.device, self.dtype),
                        timestep=timestep, image_rotary_emb=self._rotary_embeds(role, latents),
                        return_dict=False)[0]
        out = out.float()
        if not cfg:
            return list(out.split(1))
        uncond, cond = out.chunk(2)
        return [u + self._guidance(s) * (c - u) for u, c, s in zip(uncond.split(1), cond.split(1), batch)]

    def _guidance(self, step: StepInput) -> float:
        if not self.use_dynamic_cfg:
            return step.guidance_scale
        n, t = step.num_steps, step.timestep.item()  # diffusers' formula, timestep and all
        return 1 + step.guidance_scale * ((1 - math.cos(math.pi * ((n - t) / n) ** 5.0)) / 2)

    def scheduler_step(self, scheduler: Any, output: torch.Tensor, step: StepInput, family_state: dict[str, Any],
                       generator: torch.Generator) -> torch.Tensor:
        params = _step_parameters(type(scheduler))
        kwargs: dict[str, Any] = {"eta": 0.0} if "eta" in params else {}
        if step_accepts_generator(scheduler):
            kwargs["generator"] = generator
        if "old_pred_original_sample" in params:  # CogVideoXDPMScheduler: DPM-Solver++(2M), noise every step
            i = step.step_index
            back = scheduler.timesteps[i - 1] if i > 0 else None
            out = scheduler.step(output, family_state.get(X0), step.timestep, back, step.latents, return_dict=False,
                                 **kwargs)
        else:
            out = scheduler.step(output, step.timestep, step.latents, return_dict=False, **kwargs)
        latents = out[0].to(self.dtype)
        family_state[X0] = out[1] if len(out) > 1 else None
        if step.step_index == step.num_steps - 1:  # clean: leave the model's scaled space (decode_latents)
            latents = 1 / self.scaling[family_state["space"]] * latents
            family_state["space"] = "vae"
        return latents

    def enter_role(self, role: str, latents: torch.Tensor, scheduler: Any, step_index: int,
                   family_state: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        if role not in ("sketch", "render"):
            return latents, scheduler
        if family_state.get(X0) is not None:
            family_state[X0] = family_state[X0].to(self.device)
        space = family_state.get("space")
        if space in (role, "vae"):  # already there, or done
            return latents, scheduler
        target = scheduler if space is None and role == "sketch" else self._scheduler_like(role, scheduler)
        if space is None:  # a fresh request: prepare_latents' `latents * init_noise_sigma`
            latents = (latents * target.init_noise_sigma).to(self.dtype)
        elif step_index == 0:  # still the initial noise
            latents = (latents / scheduler.init_noise_sigma * target.init_noise_sigma).to(self.dtype)
        else:
            scale = self.scaling[role] / self.scaling[space]
            x0 = family_state.get(X0)
            if x0 is None:
                raise ValueError(f"cannot move step-{step_index} latents from {space} to {role}: no x0 prediction")
            latents = retime_latents(latents, x0, noise_level(scheduler, step_index),
                                     noise_level(target, step_index), scale).to(self.dtype)
            family_state[X0] = x0 if scale == 1.0 else x0 * scale
        family_state["space"] = role
        return latents, target

    def _scheduler_like(self, role: str, scheduler: Any) -> Any:
        """The role's scheduler, set to the same number of steps (CogVideoX schedulers carry no step index)."""
        target = self.new_scheduler(role)
        target.set_timesteps(int(scheduler.num_inference_steps), device=scheduler.timesteps.device)
        return target

    # --- decode -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents in the "vae" space (the last denoising step left them there) to (F, H, W, 3) in [0, 1]."""
        if self.vae is None:
            raise RuntimeError("this engine was loaded without the 'decode' role")
        latents = latents.to(self.device, self.vae.dtype).permute(0, 2, 1, 3, 4)  # (B, C, T, H, W)
        video = self.vae.decode(latents).sample
        return self.video_processor.postprocess_video(video=video, output_type="np")[0].astype(np.float32)


def noise_level(scheduler: Any, step_index: int) -> float:
    """alpha_bar of the sample entering `step_index`, where the scheduler's own previous step put it."""
    if step_index == 0:
        return float(scheduler.alphas_cumprod[int(scheduler.timesteps[0])])
    prev = int(scheduler.timesteps[step_index - 1]) - scheduler.config.num_train_timesteps // \
        scheduler.num_inference_steps
    return float(scheduler.final_alpha_cumprod if prev < 0 else scheduler.alphas_cumprod[prev])


def retime_latents(x: torch.Tensor, x0: torch.Tensor, alpha_src: float, alpha_dst: float,
                   scale: float) -> torch.Tensor:
    """Move a noisy latent between two models' latent spaces and schedules.

    x = sqrt(a_src) x0 + sqrt(1 - a_src) eps in the source space defines eps given the x0 prediction; the
    result is sqrt(a_dst) (scale x0) + sqrt(1 - a_dst) eps, with scale = s_dst / s_src (the VAE scaling factors:
    both models see the same VAE latent x0 / s). Equal levels and scale give x back unchanged.
    """
    if scale == 1.0 and alpha_src == alpha_dst:
        return x
    x, x0 = x.double(), x0.to(x.device).double()
    sigma_src = math.sqrt(1.0 - alpha_src)
    eps = (x - math.sqrt(alpha_src) * x0) / sigma_src if sigma_src > 0 else torch.zeros_like(x)
    return (math.sqrt(alpha_dst) * scale * x0 + math.sqrt(1.0 - alpha_dst) * eps).float()


@functools.cache
def _step_parameters(scheduler_class: type) -> frozenset[str]:
    # Asked once per denoising step: inspect the class once (as step_accepts_generator does).
    return frozenset(inspect.signature(scheduler_class.step).parameters)


def _read_json_or(default: dict[str, Any], *parts: str) -> dict[str, Any]:
    path = os.path.join(*parts)
    return read_json(path) if os.path.isfile(path) else default
