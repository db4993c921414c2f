"""What every family provides to the engine, and the loading helpers they share."""
from __future__ import annotations

import functools
import inspect
import json
import os
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from srserve.config import CacheConfig, GenerationRequest, ModelSpec
from srserve.pipeline.handoff import PromptEmbeddings

ROLES = ("encode", "sketch", "render", "decode")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Defaults:
    num_frames: int
    height: int
    width: int
    num_inference_steps: int


@dataclass
class StepInput:
    """One request's slice of a batched denoising step."""

    latents: torch.Tensor  # one request (batch 1) float32, in the active role's latent space and layout
    timestep: torch.Tensor  # scalar
    step_index: int
    num_steps: int
    sigma: float | None
    embeddings: PromptEmbeddings
    guidance_scale: float


class Family(Protocol):
    name: str
    spec: ModelSpec
    defaults: Defaults
    num_train_timesteps: int

    def encode(self, prompt: str, negative_prompt: str, max_sequence_length: int,
               guidance_scale: float) -> PromptEmbeddings: ...

    def latent_shape(self, request: GenerationRequest) -> tuple[int, ...]: ...

    def new_scheduler(self, role: str) -> Any: ...

    def predict(self, role: str, batch: list[StepInput]) -> list[torch.Tensor]: ...

    def scheduler_step(self, scheduler: Any, output: torch.Tensor, step: StepInput, extras: dict[str, Any],
                       generator: torch.Generator) -> torch.Tensor: ...

    def enter_role(self, role: str, latents: torch.Tensor, scheduler: Any, step_index: int,
                   extras: dict[str, Any]) -> tuple[torch.Tensor, Any]: ...

    def decode(self, latents: torch.Tensor) -> np.ndarray: ...


def role_path(spec: ModelSpec, role: str) -> str:
    """Directory of the transformer a role runs."""
    if role == "sketch":
        return spec.sketch_transformer or os.path.join(spec.base_path, "transformer")
    if role == "render":
        if spec.render_transformer:
            return spec.render_transformer
        # A CogVideoX pair names the small model's own diffusers directory; Wan2.2 layouts use transformer_2.
        base = spec.render_base_path or spec.base_path
        return os.path.join(base, "transformer" if spec.render_base_path else "transformer_2")
    raise ValueError(f"role {role!r} has no transformer")


def load_transformer(cls: Any, spec: ModelSpec, role: str, supports_backend: bool) -> torch.nn.Module:
    model = cls.from_pretrained(role_path(spec, role), torch_dtype=DTYPES[spec.dtype]).to(spec.device).eval()
    model.requires_grad_(False)
    if supports_backend and spec.attention_backend != "native":
        model.set_attention_backend(spec.attention_backend)
    cache = spec.sketch_cache if role == "sketch" else spec.render_cache
    if cache is not None:
        layers = getattr(model.config, "num_layers", 2)
        if cache.kind == "first_block" and layers < 2:
            raise ValueError(f"{role}_cache: FirstBlockCache needs a transformer with >= 2 blocks, it has {layers}")
        model.enable_cache(cache_config(cache))
    return model


def cache_config(cache: CacheConfig) -> Any:
    from diffusers import FirstBlockCacheConfig

    if cache.kind == "first_block":
        return FirstBlockCacheConfig(threshold=cache.threshold)
    raise ValueError(f"unknown cache kind {cache.kind!r}")


def reset_cache(model: torch.nn.Module) -> None:
    """Step-skipping caches keep per-request state; a new request (or a new batch) starts clean."""
    if getattr(model, "_cache_config", None) is not None:
        model._reset_stateful_cache()


def step_accepts_generator(scheduler: Any) -> bool:
    return _step_accepts_generator(type(scheduler))


@functools.cache
def _step_accepts_generator(scheduler_class: type) -> bool:
    # Asked once per denoising step: inspect the class once.
    return "generator" in inspect.signature(scheduler_class.step).parameters


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)


def read_json(*parts: str) -> dict[str, Any]:
    with open(os.path.join(*parts)) as f:
        return json.load(f)
