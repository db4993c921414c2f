"""FastAPI routes of the /v1/videos API, over any `VideoService` (the Ray Serve ingress implements one).

The official `openai` client drives these unchanged: create (multipart form or JSON), retrieve, list, delete
and download_content. Refusals use the OpenAI error shape and name the field.
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Callable, Literal, Protocol

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from srserve.api.protocol import (
    VARIANTS, ApiError, Video, VideoCreateBody, VideoDeleted, VideoList,
)


class Content(Protocol):
    media_type: str
    filename: str

    def chunks(self) -> AsyncIterator[bytes]: ...


class VideoService(Protocol):
    async def create(self, body: VideoCreateBody) -> Video: ...
    async def retrieve(self, video_id: str) -> Video: ...
    async def list(self, after: str | None, limit: int, order: str) -> VideoList: ...
    async def delete(self, video_id: str) -> VideoDeleted: ...
    async def content(self, video_id: str, variant: str) -> Content: ...
    async def job(self, video_id: str) -> dict[str, Any]: ...
    async def models(self) -> list[str]: ...
    async def ready(self) -> dict[str, Any]: ...


_CREATE_SCHEMA = VideoCreateBody.model_json_schema()
_CREATE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _CREATE_SCHEMA},
    "multipart/form-data": {"schema": _CREATE_SCHEMA},
}}}
_ERRORS = {code: {"description": text} for code, text in (
    (404, "unknown video id"), (409, "the video is not completed"),
    (422, "invalid field, named in error.param"), (429, "too many jobs in flight; see Retry-After"))}


RefusalHook = Callable[[int, "str | None"], None]


def create_app(service: VideoService, *, title: str = "srserve", version: str = "0.1.0",
               on_refused: RefusalHook | None = None) -> FastAPI:
    """`on_refused(status, code)` is called for each create (POST /v1/videos) answered with an error."""
    app = FastAPI(title=title, version=version, description="Text-to-video jobs, OpenAI /v1/videos shaped.")
    _install_error_handlers(app, on_refused)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "not ready"}})
    async def readyz() -> dict[str, Any]:
        return await service.ready()

    @app.get("/v1/models", tags=["models"])
    async def list_models() -> dict[str, Any]:
        names = await service.models()
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "srserve"} for n in names]}

    @app.post("/v1/videos", response_model=Video, tags=["videos"], openapi_extra=_CREATE_BODY,
              responses=_ERRORS)
    async def create_video(request: Request) -> Video:
        body = VideoCreateBody.model_validate(await _read_body(request))
        return await service.create(body)

    @app.get("/v1/videos", response_model=VideoList, tags=["videos"])
    async def list_videos(after: str | None = None, limit: int = Query(20, ge=1, le=100),
                          order: Literal["asc", "desc"] = "desc") -> VideoList:
        return await service.list(after, limit, order)

    @app.get("/v1/videos/{video_id}", response_model=Video, tags=["videos"], responses=_ERRORS)
    async def retrieve_video(video_id: str) -> Video:
        return await service.retrieve(video_id)

    @app.delete("/v1/videos/{video_id}", response_model=VideoDeleted, tags=["videos"], responses=_ERRORS)
    async def delete_video(video_id: str) -> VideoDeleted:
        return await service.delete(video_id)

    @app.get("/v1/videos/{video_id}/content", tags=["videos"], responses=_ERRORS,
             response_class=StreamingResponse)
    async def download_video(video_id: str, variant: str = "video") -> StreamingResponse:
        if variant not in VARIANTS:
            raise ApiError(422, f"variant: unknown variant {variant!r}; one of {sorted(VARIANTS)}",
                           param="variant", code="invalid_value")
        content = await service.content(video_id, variant)
        headers = {"Content-Disposition": f'attachment; filename="{content.filename}"'}
        return StreamingResponse(content.chunks(), media_type=content.media_type, headers=headers)

    @app.get("/v1/jobs/{video_id}", tags=["jobs"], responses=_ERRORS)
    async def job_record(video_id: str) -> dict[str, Any]:
        """srserve's full job record: per-stage times and replicas, switch step, attempts, errors."""
        return await service.job(video_id)

    return app


async def _read_body(request: Request) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form()
        return {key: ("<file>" if isinstance(value, UploadFile) else value) for key, value in form.multi_items()}
    try:
        data = await request.json()
    except ValueError:
        raise ApiError(400, "body: expected a JSON object or a multipart form", param="body",
                       code="invalid_body") from None
    if not isinstance(data, dict):
        raise ApiError(400, "body: expected a JSON object", param="body", code="invalid_body")
    return data


def _install_error_handlers(app: FastAPI, on_refused: RefusalHook | None = None) -> None:
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        if on_refused is not None and request.method == "POST" and request.url.path.rstrip("/").endswith(
                "/v1/videos"):
            on_refused(err.status, err.code)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    async def validation_error(_: Request, err: ValidationError | RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        if first.get("type") == "extra_forbidden":
            message = f"{param}: unknown field"
        return await api_error(_, ApiError(422, message, param=param, code=first.get("type")))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(ValidationError, validation_error)
    app.add_exception_handler(RequestValidationError, validation_error)
