"""The /v1/videos protocol: request and response models (the OpenAI `Video` shape) and request validation.

Validation turns a create body into a resolved `GenerationRequest` for one model (its `ModelCard`), or raises
`ApiError` naming the offending field and the limit. The model's own rules are the engine's resolver
(`srserve.pipeline.card.resolve`); this module adds the API's fields and the server's limits. Pure data: no Ray,
no FastAPI, no torch.
"""
from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from srserve.config import GenerationRequest
from srserve.pipeline.card import ModelCard, RequestError, check_shape, resolve

JobStatus = Literal["queued", "in_progress", "completed", "failed"]
VARIANTS = {  # download variant -> (artifact name, media type)
    "video": ("video.mp4", "video/mp4"),
    "thumbnail": ("thumbnail.webp", "image/webp"),
    "spritesheet": ("spritesheet.jpg", "image/jpeg"),
    "npy": ("frames.npy", "application/octet-stream"),
}
_DEFAULT_GUIDANCE = GenerationRequest.model_fields["guidance_scale"].default
_DEFAULT_SEED = GenerationRequest.model_fields["seed"].default
# ASCII digits only (\d takes any script's digits) and at most 5 of them, so int() is cheap and bounded.
_SIZE = re.compile(r" *([0-9]{1,5}) *[xX] *([0-9]{1,5}) *")
_SECONDS = re.compile(r"[0-9]{1,4}(\.[0-9]{1,6})?")  # a plain decimal: no exponent, sign, spaces or NaN
_INTEGER = re.compile(r"[+-]?[0-9]{1,20}")
_NUMBER = re.compile(r"[+-]?[0-9]{1,10}(\.[0-9]{1,10})?")
# Control characters other than tab, newline and carriage return (forms send CRLF), and unpaired surrogates
# (JSON's "\ud800" escapes): neither is text, and a surrogate cannot even be stored as UTF-8.
_NOT_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
QUOTE_CHARS = 100


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """`repr` of a client's value cut to `limit` characters with an ellipsis: an error message never echoes a
    whole oversized input (repr also escapes control characters and surrogates)."""
    text = value if isinstance(value, str) else str(value)
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


class ApiError(Exception):
    """An HTTP refusal in the OpenAI error shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(422, f"{param}: {message}", param=param, code=code)


class RequestLimits(BaseModel):
    """What one request may ask for; anything beyond is refused with 422 naming the field and the limit."""

    model_config = ConfigDict(extra="forbid")
    max_prompt_chars: int = Field(2000, ge=1)
    max_width: int = Field(1280, ge=16)
    max_height: int = Field(1280, ge=16)
    max_frames: int = Field(129, ge=1)
    max_steps: int = Field(100, ge=1)
    max_guidance_scale: float = Field(20.0, ge=0)
    max_fps: int = Field(60, ge=1)


class VideoCreateBody(BaseModel):
    """POST /v1/videos, as JSON or multipart form. srserve's own fields ride along as extra body fields."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(description="what the video shows")
    model: str | None = Field(None, description="a configured model name (GET /v1/models)")
    seconds: str | None = Field(None, description="clip length in seconds; mapped to frames at the model's fps")
    size: str | None = Field(None, description="WIDTHxHEIGHT, e.g. 832x480")
    input_reference: Any = Field(None, description="not supported: text-to-video only")
    negative_prompt: str | None = None
    seed: int | None = Field(None, description="random seed; the same seed gives the same video")
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    guidance_scale_2: float | None = Field(None, description="the render (small) model's guidance; default: the "
                                                             "model's, else guidance_scale")
    switch: str | None = Field(None, description="none | small-only | step:K | ratio:R | adaptive[:THR]")
    num_frames: int | None = Field(None, description="overrides seconds")
    fps: int | None = Field(None, description="output frame rate (default: the model's)")
    deadline_s: float | None = Field(None, gt=0, allow_inf_nan=False, description="refuse the job (429/503 + "
                                     "Retry-After) unless it is projected to finish within this many seconds")

    @field_validator("prompt", "negative_prompt", "model", "seconds", "size", "switch", mode="before")
    @classmethod
    def _text(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return value
        if info.field_name == "seconds" and type(value) in (int, float):  # JSON may send 4 or 2.5 (not a bool)
            value = str(value)
        if not isinstance(value, str):
            raise PydanticCustomError("string_type", "expected a string")
        bad = _NOT_TEXT.search(value)
        if bad:
            raise PydanticCustomError("invalid_characters", "control characters and unpaired surrogates are not "
                                      f"allowed (one at character {bad.start()})")
        return value

    @field_validator("seed", "num_inference_steps", "num_frames", "fps", mode="before")
    @classmethod
    def _integer(cls, value: Any) -> Any:
        """Strict: an int, or (multipart sends text) ASCII digits; never a bool, a float or another script's
        digits. At most 20 digits, so no limit message quotes a huge number."""
        if isinstance(value, str) and _INTEGER.fullmatch(value):
            value = int(value)
        if value is None or (type(value) is int and abs(value) < 10**20):
            return value
        raise PydanticCustomError("int_type", "expected an integer of at most 20 digits")

    @field_validator("guidance_scale", "guidance_scale_2", "deadline_s", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        """Strict: a number (not a bool), or a plain decimal as text; nothing float() would overflow on."""
        if isinstance(value, str) and _NUMBER.fullmatch(value):
            return float(value)
        if value is None or (type(value) is float) or (type(value) is int and abs(value) < 10**10):
            return value
        raise PydanticCustomError("float_type", "expected a number such as 4.5")


class VideoError(BaseModel):
    code: str
    message: str


class Video(BaseModel):
    """The OpenAI `Video` object."""

    id: str
    object: Literal["video"] = "video"
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    model: str
    progress: int = Field(ge=0, le=100)
    prompt: str | None = None
    remixed_from_video_id: str | None = None
    seconds: str
    size: str
    status: JobStatus
    error: VideoError | None = None


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


class ResolvedRequest(BaseModel):
    """A validated create: the engine request plus what the Video object reports."""

    generation: GenerationRequest
    model: str
    fps: int
    seconds: str
    size: str


def resolve_create(body: VideoCreateBody, card: ModelCard, limits: RequestLimits) -> ResolvedRequest:
    """Validate a create body against the model and the limits; ApiError(422) names the field and the limit."""
    if body.input_reference not in (None, ""):
        raise invalid("input_reference", "reference inputs are not supported (text-to-video only)")
    if body.model not in (None, card.name):
        raise ApiError(422, f"model: unknown model {quote(body.model)}; this server serves {card.name!r}",
                       param="model", code="model_not_found")
    prompt = body.prompt.strip()
    if not prompt:
        raise invalid("prompt", "must not be empty")
    _at_most("prompt", len(body.prompt), limits.max_prompt_chars, "characters")
    negative = body.negative_prompt or ""
    _at_most("negative_prompt", len(negative), limits.max_prompt_chars, "characters")
    width, height = _size(body.size, card, limits)
    fps = card.fps if body.fps is None else body.fps
    if not 1 <= fps <= limits.max_fps:
        raise invalid("fps", f"must be between 1 and {limits.max_fps}, got {fps}")
    num_frames, seconds = _frames(body, card, limits, fps)
    steps = card.default_steps if body.num_inference_steps is None else body.num_inference_steps
    if not 1 <= steps <= limits.max_steps:
        raise invalid("num_inference_steps", f"must be between 1 and {limits.max_steps}, got {steps}")
    guidance = _DEFAULT_GUIDANCE if body.guidance_scale is None else body.guidance_scale
    for name, value in (("guidance_scale", guidance), ("guidance_scale_2", body.guidance_scale_2)):
        if value is not None and not (math.isfinite(value) and 0.0 <= value <= limits.max_guidance_scale):
            raise invalid(name, f"must be between 0 and {limits.max_guidance_scale:g}, got {value}")
    seed = _DEFAULT_SEED if body.seed is None else body.seed
    if not 0 <= seed < 2**63:
        raise invalid("seed", f"must be between 0 and 2**63-1, got {seed}")
    try:
        # The shape first: GenerationRequest's own bounds would refuse a small size less clearly.
        check_shape(card, num_frames, height, width)
        generation = resolve(GenerationRequest(
            prompt=body.prompt, negative_prompt=negative, num_inference_steps=steps, num_frames=num_frames,
            height=height, width=width, seed=seed, guidance_scale=guidance, guidance_scale_2=body.guidance_scale_2,
            switch=body.switch), card)
    except RequestError as err:
        if err.param in ("height", "width"):  # the API's field is `size`
            raise invalid("size", f"width and height must be multiples of {card.size_multiple} for this model, "
                                  f"got {width}x{height}") from None
        raise invalid(err.param, err.message) from None
    return ResolvedRequest(generation=generation, model=card.name, fps=fps, seconds=seconds,
                           size=f"{width}x{height}")


def _at_most(param: str, value: int, limit: int, unit: str) -> None:
    if value > limit:
        raise invalid(param, f"at most {limit} {unit} allowed, got {value}")


def _size(text: str | None, card: ModelCard, limits: RequestLimits) -> tuple[int, int]:
    if text is None:
        return card.default_width, card.default_height
    match = _SIZE.fullmatch(text)
    if not match:
        raise invalid("size", f"expected WIDTHxHEIGHT (ASCII digits, at most 5 each) such as "
                              f"{card.default_width}x{card.default_height}, got {quote(text)}")
    width, height = int(match.group(1)), int(match.group(2))
    if not width or not height:
        raise invalid("size", f"width and height must be positive, got {width}x{height}")
    if width > limits.max_width or height > limits.max_height:
        raise invalid("size", f"at most {limits.max_width}x{limits.max_height} allowed, got {width}x{height}")
    return width, height


def _frames(body: VideoCreateBody, card: ModelCard, limits: RequestLimits, fps: int) -> tuple[int, str]:
    """(num_frames, seconds as reported): num_frames wins (the resolver checks it); seconds maps to the nearest
    stride*k+1 frames."""
    s = card.frame_stride
    if body.num_frames is not None:
        frames = body.num_frames
    elif body.seconds is not None:
        if not _SECONDS.fullmatch(body.seconds):
            raise invalid("seconds", f"expected a number of seconds as a plain decimal such as 4 or 2.5, "
                                     f"got {quote(body.seconds)}")
        text = format(Decimal(body.seconds).normalize(), "f")  # reported as a plain decimal: "04.50" -> "4.5"
        seconds = float(text)
        if not seconds > 0:
            raise invalid("seconds", f"must be a positive number, got {text}")
        frames = s * max(0, round((seconds * fps - 1) / s)) + 1
        if frames > limits.max_frames:
            raise invalid("seconds", f"{text}s at {fps} fps is {frames} frames; at most "
                                     f"{limits.max_frames} frames ({limits.max_frames / fps:g}s) allowed")
        return frames, text
    else:
        frames = card.default_num_frames
    _at_most("num_frames", frames, limits.max_frames, "frames")
    return frames, f"{frames / fps:g}"
