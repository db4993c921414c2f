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

from srserve.config import GenerationRequest, ModelSpec
from srserve.pipeline.families.registry import ROLES, role_path  # noqa: F401  (torch-free home; spec checks use it)
from srserve.pipeline.handoff import PromptEmbeddings

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
    key: str  # the request's key in its batch: names its step-cache state


class Family(Protocol):
    name: str
    spec: ModelSpec
    defaults: Defaults
    num_train_timesteps: int
    transformers: dict[str, torch.nn.Module]  # the loaded roles' models

    def encode(self, prompt: str, negative_prompt: str, max_sequence_length: int,
               guidance_scale: float) -> PromptEmbeddings: ...

    def latent_shape(self, request: GenerationRequest) -> tuple[int, ...]: ...

    def new_scheduler(self, role: str) -> Any: ...

    def predict(self, role: str, batch: list[StepInput]) -> list[torch.Tensor]: ...

    def scheduler_step(self, scheduler: Any, output: torch.Tensor, step: StepInput, family_state: dict[str, Any],
                       generator: torch.Generator) -> torch.Tensor: ...

    def enter_role(self, role: str, latents: torch.Tensor, scheduler: Any, step_index: int,
                   family_state: dict[str, Any]) -> tuple[torch.Tensor, Any]: ...

    def decode(self, latents: torch.Tensor) -> np.ndarray: ...


def load_transformer(cls: Any, spec: ModelSpec, role: str, supports_backend: bool) -> torch.nn.Module:
    model = cls.from_pretrained(role_path(spec, role), torch_dtype=DTYPES[spec.dtype]).to(spec.device).eval()
    model.requires_grad_(False)
    if supports_backend and spec.attention_backend != "native":
        model.set_attention_backend(spec.attention_backend)
    cache = spec.sketch_cache if role == "sketch" else spec.render_cache
    if cache is not None:
        from srserve.pipeline.caches import StepCache

        StepCache.attach(model, cache, f"{role}_cache")
    return model


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
