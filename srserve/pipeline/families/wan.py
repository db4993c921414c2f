"""Wan2.1 / Wan2.2 (T2V): umT5 text encoder, WanTransformer3DModel, AutoencoderKLWan, flow-matching schedulers.

Mirrors diffusers' `WanPipeline` step for step, so that a run here equals a run there.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np
import torch

from srserve.config import GenerationRequest, ModelSpec
from srserve.pipeline.card import model_card
from srserve.pipeline.caches import StepCache, step_cache
from srserve.pipeline.families.base import (
    DTYPES, Defaults, StepInput, load_transformer, read_json, stack, step_accepts_generator,
)
from srserve.pipeline.families.registry import WAN
from srserve.pipeline.handoff import PromptEmbeddings


class WanFamily:
    name = "wan"

    def __init__(self, spec: ModelSpec, roles: tuple[str, ...]) -> None:
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from diffusers.video_processor import VideoProcessor

        self.spec = spec
        self.device = torch.device(spec.device)
        self.scheduler_config = read_json(spec.base_path, "scheduler", "scheduler_config.json")
        self.vae_config = read_json(spec.base_path, "vae", "config.json")
        self.num_train_timesteps = int(self.scheduler_config.get("num_train_timesteps", 1000))
        self.vae_scale_temporal, self.vae_scale_spatial = WAN.vae_scales(self.vae_config)
        self.latent_channels = int(self.vae_config.get("z_dim", 16))
        card = model_card(spec)  # the defaults requests are resolved with
        self.defaults = Defaults(card.default_num_frames, card.default_height, card.default_width,
                                 card.default_steps)
        self.transformers: dict[str, torch.nn.Module] = {}
        for role in ("sketch", "render"):
            if role in roles:
                self.transformers[role] = load_transformer(WanTransformer3DModel, spec, role, WAN.attention_backends)
        self.tokenizer = self.text_encoder = self.vae = None
        if "encode" in roles:
            from transformers import AutoTokenizer, UMT5EncoderModel

            self.tokenizer = AutoTokenizer.from_pretrained(os.path.join(spec.base_path, "tokenizer"))
            self.text_encoder = UMT5EncoderModel.from_pretrained(
                os.path.join(spec.base_path, "text_encoder"), torch_dtype=DTYPES[spec.dtype]
            ).to(self.device).eval()
        if "decode" in roles:
            # diffusers' Wan pipelines keep the VAE in float32 for quality; we do the same.
            self.vae = AutoencoderKLWan.from_pretrained(
                os.path.join(spec.base_path, "vae"), torch_dtype=torch.float32
            ).to(self.device).eval()
            self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_spatial)

    # --- encode -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompt: str, negative_prompt: str, max_sequence_length: int,
               guidance_scale: float) -> PromptEmbeddings:
        if self.text_encoder is None:
            raise RuntimeError("this engine was loaded without the 'encode' role")
        positive = self._t5_embeds(prompt, max_sequence_length)
        negative = self._t5_embeds(negative_prompt, max_sequence_length) if guidance_scale > 1.0 else None
        return PromptEmbeddings(positive, negative)

    def _t5_embeds(self, prompt: str, max_sequence_length: int) -> torch.Tensor:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        inputs = self.tokenizer(
            [prompt_clean(prompt)], padding="max_length", max_length=max_sequence_length, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        ids, mask = inputs.input_ids.to(self.device), inputs.attention_mask.to(self.device)
        seq_len = int(mask.gt(0).sum())
        hidden = self.text_encoder(ids, mask).last_hidden_state[0, :seq_len]
        # Zero the padding, as WanPipeline does: the transformer sees exactly max_sequence_length tokens.
        padded = torch.cat([hidden, hidden.new_zeros(max_sequence_length - seq_len, hidden.size(1))])
        return padded.unsqueeze(0).to("cpu")

    # --- denoise ------------------------------------------------------------------------------------------
    def latent_shape(self, request: GenerationRequest) -> tuple[int, ...]:
        frames = (request.num_frames - 1) // self.vae_scale_temporal + 1
        return (1, self.latent_channels, frames, request.height // self.vae_scale_spatial,
                request.width // self.vae_scale_spatial)

    def new_scheduler(self, role: str) -> Any:
        import diffusers

        cls = getattr(diffusers, self.scheduler_config["_class_name"])
        return cls.from_config(self.scheduler_config)

    @torch.no_grad()
    def predict(self, role: str, batch: list[StepInput]) -> list[torch.Tensor]:
        """Guided model output for each request of a same-shape batch, in one forward per CFG branch."""
        model = self.transformers[role]
        cache = step_cache(model)
        if cache is not None and len(batch) != 1:
            raise ValueError(f"the {role} model has a step cache: it steps one request at a time, got {len(batch)}")
        dtype = model.dtype
        latents = stack([s.latents for s in batch]).to(self.device, dtype)
        timestep = torch.stack([s.timestep for s in batch]).to(self.device)
        cond_embeds = stack([s.embeddings.prompt_embeds for s in batch]).to(self.device, dtype)
        # at scale 1 the guided output is the conditional one: skip the unconditional pass (a render stage run
        # with guidance_scale_2=1 costs half)
        guided = batch[0].embeddings.negative_prompt_embeds is not None and \
            any(s.guidance_scale != 1.0 for s in batch)
        uncond_embeds = stack([s.embeddings.negative_prompt_embeds for s in batch]).to(self.device, dtype) \
            if guided else None
        if cache is not None and cache.batches_cfg:
            # FasterCache reads [uncond, cond] in one forward (it approximates one from the other); unguided, the
            # conditional input stands in for the unconditional one
            both = self._forward(model, cache, batch[0], "cfg", torch.cat([latents, latents]),
                                 torch.cat([timestep, timestep]),
                                 torch.cat([cond_embeds if uncond_embeds is None else uncond_embeds, cond_embeds]))
            uncond, cond = both.chunk(2)
        else:
            cond = self._forward(model, cache, batch[0], "cond", latents, timestep, cond_embeds)
            uncond = None if uncond_embeds is None else \
                self._forward(model, cache, batch[0], "uncond", latents, timestep, uncond_embeds)
        if not guided:
            return list(cond.split(1))
        return [u + s.guidance_scale * (c - u) for c, u, s in zip(cond.split(1), uncond.split(1), batch)]

    @staticmethod
    def _forward(model: torch.nn.Module, cache: StepCache | None, step: StepInput, branch: str,
                 latents: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        scope = contextlib.nullcontext() if cache is None else cache.context(
            step.key, branch, step.step_index, step.num_steps, step.timestep, step.sigma)
        with scope:
            return model(hidden_states=latents, timestep=timestep, encoder_hidden_states=embeds,
                         return_dict=False)[0]

    def scheduler_step(self, scheduler: Any, output: torch.Tensor, step: StepInput, family_state: dict[str, Any],
                       generator: torch.Generator) -> torch.Tensor:
        kwargs = {"generator": generator} if step_accepts_generator(scheduler) else {}
        return scheduler.step(output, step.timestep, step.latents, return_dict=False, **kwargs)[0]

    def enter_role(self, role: str, latents: torch.Tensor, scheduler: Any, step_index: int,
                   family_state: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        # Wan2.1 14B and 1.3B share VAE, text encoder and schedule: the state passes unchanged. A step cache
        # needs no reset: its state is per request (srserve.pipeline.caches).
        return latents, scheduler

    # --- decode -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        if self.vae is None:
            raise RuntimeError("this engine was loaded without the 'decode' role")
        latents = latents.to(self.device, self.vae.dtype)
        z_dim = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(
            latents.device, latents.dtype)
        video = self.vae.decode(latents / inv_std + mean, return_dict=False)[0]
        return self.video_processor.postprocess_video(video, output_type="np")[0].astype(np.float32)
