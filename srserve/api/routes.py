"""FastAPI routes of the /v1/videos API, over any `VideoService` (the Ray Serve ingress implements one).

The official `openai` client drives these unchanged: create (multipart form or JSON), retrieve, list, delete
and download_content, with its api_key sent as `Authorization: Bearer KEY`. Every answer that is not a success
has the OpenAI error shape and names the field; the edge is bounded (body size, form parts, JSON depth) so a
hostile request costs little and is answered 4xx, never 5xx.
"""
from __future__ import annotations

import json
from typing import Any, AsyncIterator, Callable, Literal, Protocol

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from srserve.api.auth import ANONYMOUS, Caller, KeyRing
from srserve.api.protocol import (
    VARIANTS, ApiError, Video, VideoCreateBody, VideoDeleted, VideoList, quote,
)


class Content(Protocol):
    media_type: str
    filename: str

    def chunks(self) -> AsyncIterator[bytes]: ...


class VideoService(Protocol):
    """What the routes call; `caller` is who asked (ANONYMOUS without keys), for ownership and quotas."""

    async def create(self, body: VideoCreateBody, caller: Caller) -> Video: ...
    async def retrieve(self, video_id: str, caller: Caller) -> Video: ...
    async def list(self, after: str | None, limit: int, order: str, caller: Caller) -> VideoList: ...
    async def delete(self, video_id: str, caller: Caller) -> VideoDeleted: ...
    async def content(self, video_id: str, variant: str, caller: Caller) -> Content: ...
    async def job(self, video_id: str, caller: Caller) -> dict[str, Any]: ...
    async def models(self) -> list[str]: ...
    async def ready(self) -> dict[str, Any]: ...


_CREATE_SCHEMA = VideoCreateBody.model_json_schema()
_CREATE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _CREATE_SCHEMA},
    "multipart/form-data": {"schema": _CREATE_SCHEMA},
}}}
_ERRORS = {code: {"description": text} for code, text in (
    (401, "missing or invalid API key"), (404, "unknown video id"), (409, "the video is not completed"),
    (413, "request body too large"), (422, "invalid field, named in error.param"),
    (429, "too many jobs in flight; see Retry-After"))}
# Form bounds: a create has 13 fields; one file part at most (input_reference, refused by name); a text part is
# at most 64 KiB (a prompt of the largest configurable length fits many times over).
FORM_MAX_FIELDS = 32
FORM_MAX_FILES = 1
FORM_MAX_PART_BYTES = 64 << 10
MAX_JSON_DEPTH = 32  # the create body is flat; deep nesting only costs the parser
_ID = Path(max_length=100, description="a video id, as returned by create")
_TEXT_FIELDS = {name for name in VideoCreateBody.model_fields if name != "input_reference"}

RefusalHook = Callable[[int, "str | None"], None]


def create_app(service: VideoService, *, title: str = "srserve", version: str = "0.1.0",
               on_refused: RefusalHook | None = None, keys: KeyRing | None = None, api_docs: bool = False,
               max_body_bytes: int = 4 << 20) -> FastAPI:
    """The API over `service`. `keys`: the API keys every /v1 route requires (None: every caller is ANONYMOUS);
    `api_docs`: serve /docs, /redoc and /openapi.json; `max_body_bytes`: larger bodies get 413 before parsing.
    `on_refused(status, code)` is called for each create (POST /v1/videos) answered with an error."""
    pages = {"docs_url": "/docs", "redoc_url": "/redoc", "openapi_url": "/openapi.json"}
    app = FastAPI(title=title, version=version, description="Text-to-video jobs, OpenAI /v1/videos shaped.",
                  **{name: url if api_docs else None for name, url in pages.items()})  # None: not served
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    _install_error_handlers(app, on_refused)
    auth = Depends(_authenticator(keys))

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "not ready"}})
    async def readyz() -> dict[str, Any]:
        return await service.ready()

    @app.get("/v1/models", tags=["models"], responses=_ERRORS)
    async def list_models(caller: Caller = auth) -> dict[str, Any]:
        names = await service.models()
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "srserve"} for n in names]}

    @app.post("/v1/videos", response_model=Video, tags=["videos"], openapi_extra=_CREATE_BODY,
              responses=_ERRORS)
    async def create_video(request: Request, caller: Caller = auth) -> Video:
        body = VideoCreateBody.model_validate(await _read_body(request, max_body_bytes))
        return await service.create(body, caller)

    @app.get("/v1/videos", response_model=VideoList, tags=["videos"], responses=_ERRORS)
    async def list_videos(after: str | None = Query(None, max_length=100), limit: int = Query(20, ge=1, le=100),
                          order: Literal["asc", "desc"] = "desc", caller: Caller = auth) -> VideoList:
        return await service.list(after, limit, order, caller)

    @app.get("/v1/videos/{video_id}", response_model=Video, tags=["videos"], responses=_ERRORS)
    async def retrieve_video(video_id: str = _ID, caller: Caller = auth) -> Video:
        return await service.retrieve(video_id, caller)

    @app.delete("/v1/videos/{video_id}", response_model=VideoDeleted, tags=["videos"], responses=_ERRORS)
    async def delete_video(video_id: str = _ID, caller: Caller = auth) -> VideoDeleted:
        return await service.delete(video_id, caller)

    @app.get("/v1/videos/{video_id}/content", tags=["videos"], responses=_ERRORS,
             response_class=StreamingResponse)
    async def download_video(video_id: str = _ID, variant: str = "video", caller: Caller = auth
                             ) -> StreamingResponse:
        if variant not in VARIANTS:
            raise ApiError(422, f"variant: unknown variant {quote(variant)}; one of {sorted(VARIANTS)}",
                           param="variant", code="invalid_value")
        content = await service.content(video_id, variant, caller)
        headers = {"Content-Disposition": f'attachment; filename="{content.filename}"'}
        return StreamingResponse(content.chunks(), media_type=content.media_type, headers=headers)

    @app.get("/v1/jobs/{video_id}", tags=["jobs"], responses=_ERRORS)
    async def job_record(video_id: str = _ID, caller: Caller = auth) -> dict[str, Any]:
        """srserve's job record: per-stage times, switch step, attempts, errors."""
        return await service.job(video_id, caller)

    return app


def _authenticator(keys: KeyRing | None) -> Callable[..., Any]:
    """The dependency every /v1 route takes: the Caller, or 401 in the OpenAI shape."""
    if keys is None:
        async def anonymous() -> Caller:
            return ANONYMOUS
        return anonymous
    bearer = HTTPBearer(auto_error=False, description="an API key of the server's keys file")

    async def authenticate(request: Request, _: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Caller:
        header = request.headers.get("authorization")
        caller = keys.authenticate(header)
        if caller is None:  # the message never repeats what was sent
            raise ApiError(401, "invalid API key" if header else "missing API key: send Authorization: Bearer KEY",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return caller
    return authenticate


def too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"body: larger than the limit of {max_bytes} bytes", param="body", code="body_too_large")


class BodyLimit:
    """ASGI middleware counting request body bytes as they arrive: past `max_bytes` the read fails with 413
    (through the app's error handlers), so a chunked body with no Content-Length is bounded too. Once a response
    has started (a download listening for the client to leave) the excess reads as a disconnect instead."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen, started = 0, False

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    if started:
                        return {"type": "http.disconnect"}
                    raise too_large(self.max_bytes)
            return message

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        await self.app(scope, limited, sending)


async def _read_body(request: Request, max_bytes: int) -> dict[str, Any]:
    """The create body's fields, from JSON or a form; 413 past `max_bytes` (by Content-Length before reading)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isascii() or not length.isdigit() or len(length) > 18):
        raise ApiError(400, "body: Content-Length is not a number", param="body", code="invalid_body")
    if length is not None and int(length) > max_bytes:
        raise too_large(max_bytes)
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        try:
            async with request.form(max_files=FORM_MAX_FILES, max_fields=FORM_MAX_FIELDS,
                                    max_part_size=FORM_MAX_PART_BYTES) as form:
                return _form_fields(form)
        except HTTPException as err:  # starlette's refusal of a malformed or oversized form
            raise ApiError(400, f"body: {err.detail}", param="body", code="invalid_body") from None
    return _parse_json(await request.body())


def _form_fields(form: FormData) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key in _TEXT_FIELDS:  # a file where text is expected is refused, not read as "<file>"
                raise ApiError(422, f"{key}: expected a text value, got a file", param=key, code="invalid_type")
            value = "<file>"  # input_reference (refused by name as unsupported) or an unknown field
        fields[key] = value
    return fields


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_json(raw: bytes) -> dict[str, Any]:
    def refuse(why: str) -> ApiError:
        return ApiError(400, f"body: {why}", param="body", code="invalid_body")
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise refuse(f"nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity, an int past Python's digit limit
        raise refuse("expected a JSON object or a multipart form") from None
    if not isinstance(data, dict):
        raise refuse("expected a JSON object")
    if _depth(data) > MAX_JSON_DEPTH:
        raise refuse(f"nested more than {MAX_JSON_DEPTH} levels deep")
    return data


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


class ErrorResponse(JSONResponse):
    """Errors render as ASCII JSON: a client's unpaired surrogate quoted in a message cannot fail the reply."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


_HTTP_CODES = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


def _param(loc: Any) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    text = ".".join(parts)
    return (text[:100] + "...") if len(text) > 100 else (text or None)


def _install_error_handlers(app: FastAPI, on_refused: RefusalHook | None = None) -> None:
    async def api_error(request: Request, err: ApiError) -> ErrorResponse:
        if on_refused is not None and request.method == "POST" and request.url.path.rstrip("/").endswith(
                "/v1/videos"):
            on_refused(err.status, err.code)
        return ErrorResponse(err.body(), status_code=err.status, headers=err.headers)

    async def validation_error(request: Request, err: ValidationError | RequestValidationError) -> ErrorResponse:
        first = err.errors()[0]
        # No location: the body as a whole (a key pydantic cannot read as text, say).
        param = _param(first.get("loc", ())) or "body"
        text = str(first.get("msg"))[:300]
        message = f"{param}: {text}" if param else text
        if first.get("type") == "extra_forbidden":
            message = f"{param}: unknown field"
        return await api_error(request, ApiError(422, message, param=param, code=first.get("type")))

    async def http_error(request: Request, err: HTTPException) -> ErrorResponse:
        """Starlette's own refusals (no route, wrong method) in the OpenAI shape."""
        return await api_error(request, ApiError(err.status_code, str(err.detail)[:300],
                                                 code=_HTTP_CODES.get(err.status_code), headers=err.headers))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(ValidationError, validation_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    async def internal_error(request: Request, err: Exception) -> ErrorResponse:
        """Anything unexpected: a 500 that says nothing of the cause (the server's log has it)."""
        body = {"error": {"message": "internal error", "type": "server_error", "param": None, "code": "internal_error"}}
        return ErrorResponse(body, status_code=500)

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
