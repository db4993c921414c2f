"""The HTTP protocol (OpenAI /v1/videos shaped), its API keys and its FastAPI routes. No Ray here."""
from srserve.api.auth import ANONYMOUS, Caller, KeyRing
from srserve.api.protocol import (
    ApiError, ModelCard, RequestLimits, Video, VideoCreateBody, VideoDeleted, VideoList, resolve_create,
)
from srserve.api.routes import VideoService, create_app

__all__ = ["ANONYMOUS", "ApiError", "Caller", "KeyRing", "ModelCard", "RequestLimits", "Video", "VideoCreateBody",
           "VideoDeleted", "VideoList", "VideoService", "create_app", "resolve_create"]
