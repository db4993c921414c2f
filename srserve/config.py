"""Pure-data configuration: model specs and per-request options. No I/O happens here."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Dtype = Literal["float32", "bfloat16", "float16"]


class CacheConfig(BaseModel):
    """A step-skipping cache added to one transformer through diffusers' `enable_cache`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["first_block"] = "first_block"
    threshold: float = Field(0.05, gt=0, description="FirstBlockCache residual threshold")


class ModelSpec(BaseModel):
    """Where a sketch/render model pair lives and how to run it.

    `base_path` is a diffusers directory holding the shared parts (text encoder, tokenizer, VAE, scheduler).
    The sketch (large) and render (small) transformers default to `base_path/transformer` and
    `base_path/transformer_2` (the Wan2.2 layout that `WanPipeline.save_pretrained` writes).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field("srd-tiny", min_length=1, description="the model name clients ask for")
    family: Literal["wan", "cogvideox"] = "wan"
    base_path: str
    sketch_transformer: str | None = None
    render_transformer: str | None = None
    # CogVideoX only: a diffusers directory with the render model's own VAE and scheduler configs (the 2B and 5B
    # share VAE weights but not the scaling factor nor the noise schedule).
    render_base_path: str | None = None
    dtype: Dtype = "float32"
    device: str = "cpu"
    attention_backend: str = "native"
    sketch_cache: CacheConfig | None = None
    render_cache: CacheConfig | None = None
    # Defaults for requests that leave these out; None falls back to the family's defaults.
    default_num_frames: int | None = Field(None, ge=1)
    default_height: int | None = Field(None, ge=8)
    default_width: int | None = Field(None, ge=8)
    default_steps: int | None = Field(None, ge=1)
    default_switch: str = "adaptive"
    # The render (small) model's classifier-free guidance when a request leaves guidance_scale_2 out; None: the
    # request's guidance_scale, as diffusers' Wan2.2 pipeline does.
    default_guidance_scale_2: float | None = Field(None, ge=0.0, le=50.0)
    use_dynamic_cfg: bool = False  # CogVideoX only: diffusers' dynamic classifier-free guidance
    fps: int = Field(16, ge=1, le=120)


class GenerationRequest(BaseModel):
    """One generation's options. Fields left as None take the model's defaults (see `SREngine.resolve`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    num_inference_steps: int | None = Field(None, ge=1, le=1000)
    num_frames: int | None = Field(None, ge=1, le=1024)
    height: int | None = Field(None, ge=16, le=4096)
    width: int | None = Field(None, ge=16, le=4096)
    seed: int = Field(0, ge=0, lt=2**63)
    guidance_scale: float = Field(5.0, ge=0.0, le=50.0)
    guidance_scale_2: float | None = Field(None, ge=0.0, le=50.0)  # the render stage's (diffusers' Wan2.2 name)
    switch: str | None = None
    max_sequence_length: int = Field(512, ge=1, le=4096)
