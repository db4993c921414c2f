"""The request resolver: a model's card (what a request may ask of it) and `resolve`, which fills a request's
defaults and checks it against the card. No torch: the ingress validates with the same code the engine runs.

    card = model_card(resolve_model_spec(path))          # from the spec and its small JSON configs
    request = resolve(GenerationRequest(prompt="..."), card)   # RequestError(param, message) when it cannot run
"""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from srserve.config import GenerationRequest, ModelSpec
from srserve.pipeline.errors import ModelSpecError, RequestError
from srserve.pipeline.families.registry import family_info, read_config
from srserve.pipeline.switch import parse_policy

__all__ = ["ModelCard", "RequestError", "check_shape", "model_card", "resolve"]


class ModelCard(BaseModel):
    """What requests to one model are resolved and checked against, known without loading weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(min_length=1, description="the model name clients ask for")
    fps: int = Field(ge=1)
    default_num_frames: int = Field(ge=1)
    default_height: int = Field(ge=1)
    default_width: int = Field(ge=1)
    default_steps: int = Field(ge=1)
    default_switch: str = "adaptive"
    default_guidance_scale_2: float | None = None  # None: the request's guidance_scale
    frame_stride: int = Field(4, ge=1, description="num_frames must be stride*k+1 (the VAE's temporal scale)")
    size_multiple: int = Field(16, ge=1, description="height and width multiples (VAE spatial scale x patch 2)")


def model_card(spec: ModelSpec, name: str | None = None) -> ModelCard:
    """The card of a (checked) spec: its own defaults, else its family's; strides from its VAE config."""
    info = family_info(spec.family)
    temporal, spatial = info.vae_scales(read_config(Path(spec.base_path) / "vae" / "config.json", "the VAE"))
    try:
        parse_policy(spec.default_switch)
    except ValueError as err:  # a server setting: not to be reported as the request's fault
        raise ModelSpecError(f"default_switch: {err}") from None
    return ModelCard(
        name=name or spec.name, fps=spec.fps,
        default_num_frames=spec.default_num_frames or info.default_num_frames,
        default_height=spec.default_height or info.default_height,
        default_width=spec.default_width or info.default_width,
        default_steps=spec.default_steps or info.default_steps,
        default_switch=spec.default_switch, default_guidance_scale_2=spec.default_guidance_scale_2,
        frame_stride=temporal, size_multiple=spatial * 2,  # the transformers' patch is 2 x 2 in space
    )


def check_shape(card: ModelCard, num_frames: int, height: int, width: int) -> None:
    """RequestError naming the field when the video shape does not fit the model's strides."""
    m = card.size_multiple
    for param, value in (("height", height), ("width", width)):
        if value < 1 or value % m:
            raise RequestError(param, f"must be a positive multiple of {m} for this model, got {value}")
    s = card.frame_stride
    if num_frames < 1 or (num_frames - 1) % s:
        raise RequestError("num_frames", f"must be {s}k+1 (1, {s + 1}, {2 * s + 1}, ...) for this model, "
                                         f"got {num_frames}")


def resolve(request: GenerationRequest, card: ModelCard) -> GenerationRequest:
    """`request` with the card's defaults filled in, its switch policy in canonical form, checked against the
    model; RequestError (a ValueError) names the field that cannot work."""
    try:
        policy = parse_policy(request.switch or card.default_switch)
    except ValueError as err:
        raise RequestError("switch", str(err)) from None
    resolved = request.model_copy(update={
        "num_inference_steps": request.num_inference_steps or card.default_steps,
        "num_frames": request.num_frames or card.default_num_frames,
        "height": request.height or card.default_height,
        "width": request.width or card.default_width,
        "switch": str(policy),
        # the render stage's guidance: the request's, else the model's, else the sketch stage's (as Wan2.2)
        "guidance_scale_2": next(g for g in (request.guidance_scale_2, card.default_guidance_scale_2,
                                             request.guidance_scale) if g is not None),
    })
    check_shape(card, resolved.num_frames, resolved.height, resolved.width)
    return resolved
