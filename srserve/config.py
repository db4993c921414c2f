"""Pure-data configuration: model specs and per-request options. No I/O happens here."""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Dtype = Literal["float32", "bfloat16", "float16"]


CacheKind = Literal["first_block", "mag", "taylorseer", "pyramid_attention_broadcast", "faster", "sea"]
TimestepRange = tuple[float, float]
# Each kind's parameters with diffusers 0.42.1's defaults (names as in diffusers' *CacheConfig classes), except
# taylorseer's `cache_identifiers`: diffusers' default patterns match no module of WanTransformer3DModel.
CACHE_DEFAULTS: dict[str, dict[str, Any]] = {
    "first_block": {"threshold": 0.05},
    "mag": {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2, "mag_ratios": None, "calibrate": False},
    "taylorseer": {"cache_interval": 5, "disable_cache_before_step": 3, "disable_cache_after_step": None,
                   "max_order": 1, "taylor_factors_dtype": "bfloat16", "use_lite_mode": False,
                   "cache_identifiers": (r"blocks\.\d+\.attn1", r"blocks\.\d+\.attn2", r"blocks\.\d+\.ffn")},
    "pyramid_attention_broadcast": {
        "spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": (100.0, 800.0),
        "cross_attention_block_skip_range": None, "cross_attention_timestep_skip_range": (100.0, 800.0)},
    "faster": {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": (-1.0, 681.0),
               "unconditional_batch_skip_range": 5, "unconditional_batch_timestep_skip_range": (-1.0, 641.0),
               "alpha_low_frequency": 1.1, "alpha_high_frequency": 1.1, "attention_weight": 0.5},
    "sea": {"threshold": 0.25, "residual_order": 1, "retention_steps": 1, "cache_end_steps": 1,
            "max_consecutive_cached": 2, "power_exp": 3.0},
}


class CacheConfig(BaseModel):
    """A step-skipping cache added to one transformer through diffusers' `enable_cache`.

    Only the parameters of `kind` may be given (see `CACHE_DEFAULTS`); the ones left out take diffusers' defaults.
    Steps are global denoising step indices, except taylorseer's, which count the role's own steps (each model
    builds its Taylor factors from its own outputs). Timesteps are the scheduler's (0..1000, noisy to clean).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: CacheKind = "first_block"
    threshold: float | None = Field(None, ge=0, description="first_block / mag / sea: skip below this change")
    # mag: ratios from `srserve.pipeline.caches.calibrate_mag_ratios` (one per step; resampled to other counts)
    mag_ratios: tuple[Annotated[float, Field(gt=0)], ...] | None = Field(None, min_length=2)
    calibrate: bool | None = None
    max_skip_steps: int | None = Field(None, ge=1)
    retention_ratio: float | None = Field(None, ge=0, lt=1)
    # taylorseer
    cache_interval: int | None = Field(None, ge=1)
    disable_cache_before_step: int | None = Field(None, ge=1)
    disable_cache_after_step: int | None = Field(None, ge=1)
    max_order: int | None = Field(None, ge=0, le=4)
    taylor_factors_dtype: Dtype | None = None
    use_lite_mode: bool | None = None
    cache_identifiers: tuple[str, ...] | None = Field(None, min_length=1)
    # pyramid_attention_broadcast and faster
    spatial_attention_block_skip_range: int | None = Field(None, ge=1)
    spatial_attention_timestep_skip_range: TimestepRange | None = None
    cross_attention_block_skip_range: int | None = Field(None, ge=1)
    cross_attention_timestep_skip_range: TimestepRange | None = None
    # faster (it approximates the unconditional branch from the conditional one)
    unconditional_batch_skip_range: int | None = Field(None, ge=1)
    unconditional_batch_timestep_skip_range: TimestepRange | None = None
    alpha_low_frequency: float | None = Field(None, gt=0)
    alpha_high_frequency: float | None = Field(None, gt=0)
    attention_weight: float | None = Field(None, ge=0, le=1)
    # sea
    residual_order: Literal[0, 1] | None = None
    retention_steps: int | None = Field(None, ge=0)
    cache_end_steps: int | None = Field(None, ge=0)
    max_consecutive_cached: int | None = Field(None, ge=0)
    power_exp: float | None = Field(None, gt=0)

    def params(self) -> dict[str, Any]:
        """This kind's parameters and their values."""
        return {name: getattr(self, name) for name in CACHE_DEFAULTS[self.kind]}

    @model_validator(mode="before")
    @classmethod
    def _fill_kind_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("kind", "first_block") not in CACHE_DEFAULTS:
            return data  # the `kind` Literal reports an unknown kind
        kind = data.get("kind", "first_block")
        given = {k: v for k, v in data.items() if v is not None and k != "kind"}
        foreign = sorted(set(given) - set(CACHE_DEFAULTS[kind]))
        if foreign:
            raise ValueError(f"{', '.join(foreign)}: not a parameter of the {kind} cache; its parameters are "
                             f"{', '.join(CACHE_DEFAULTS[kind])}")
        return {"kind": kind, **CACHE_DEFAULTS[kind], **given}

    @model_validator(mode="after")
    def _check(self) -> "CacheConfig":
        if self.kind == "mag" and self.mag_ratios is None and not self.calibrate:
            raise ValueError("mag_ratios: MagCache needs the model's calibrated ratios (calibrate_mag_ratios in "
                             "srserve.pipeline.caches), or calibrate=true to measure them")
        for name in ("spatial_attention_timestep_skip_range", "cross_attention_timestep_skip_range",
                     "unconditional_batch_timestep_skip_range"):
            lo_hi = getattr(self, name)
            if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
                raise ValueError(f"{name}: expected (low, high) with low < high, got {lo_hi}")
        before, after = self.disable_cache_before_step, self.disable_cache_after_step
        if before is not None and after is not None and after <= before:
            raise ValueError(f"disable_cache_after_step ({after}) must be > disable_cache_before_step ({before})")
        for pattern in self.cache_identifiers or ():
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"cache_identifiers: {pattern!r} is not a regular expression: {err}") from None
        return self


class ModelSpec(BaseModel):
    """Where a sketch/render model pair lives and how to run it.

    `base_path` is a diffusers directory holding the shared parts (text encoder, tokenizer, VAE, scheduler).
    The sketch (large) and render (small) transformers default to `base_path/transformer` and
    `base_path/transformer_2` (the Wan2.2 layout that `WanPipeline.save_pretrained` writes).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field("srd-tiny", min_length=1, description="the model name clients ask for")
    family: str = Field("wan", description="a registered family (srserve.pipeline.families.FAMILIES)")
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

    @field_validator("family")
    @classmethod
    def _registered_family(cls, value: str) -> str:
        # Imported on use: this module sits below the pipeline package (the registry is torch-free).
        from srserve.pipeline.families.registry import FAMILIES

        if value not in FAMILIES:
            raise ValueError(f"unknown model family {value!r}; one of {sorted(FAMILIES)}")
        return value


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
