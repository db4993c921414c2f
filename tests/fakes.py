"""Test doubles shared by several test files."""
from __future__ import annotations

from typing import Any


class _Method:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        async def run() -> Any:
            return self.fn(*args, **kwargs)
        return run()


class FakeStoreHandle:
    """The real SQLite store behind an object shaped like a Serve handle (`await handle.op.remote(...)`)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def __getattr__(self, name: str) -> _Method:
        return _Method(getattr(self.store, name))


class MemoryVideoService:
    """The video service the routes call, with videos in a dict, created through the real `resolve_create`: the
    resolved requests and each call's caller are recorded. Enough to exercise the routes without a cluster."""

    def __init__(self, model: Any, limits: Any) -> None:
        self.model, self.limits = model, limits
        self.videos: dict[str, Any] = {}
        self.requests: list[Any] = []  # what `resolve_create` made of each create
        self.callers: list[tuple[str, Any]] = []  # (method, caller) of every call, in order

    def _find(self, video_id: str) -> Any:
        from srserve.api.protocol import ApiError

        if video_id not in self.videos:  # the id is not quoted: the fuzz tests bound what an error echoes
            raise ApiError(404, "video_id: no such video", param="video_id", code="not_found")
        return self.videos[video_id]

    async def create(self, body: Any, caller: Any) -> Any:
        from srserve.api.protocol import Video, resolve_create

        self.callers.append(("create", caller))
        resolved = resolve_create(body, self.model, self.limits)
        self.requests.append(resolved)
        video = Video(id=f"video_{len(self.videos)}", created_at=1, model=resolved.model, progress=0,
                      seconds=resolved.seconds, size=resolved.size, status="queued", prompt=body.prompt)
        self.videos[video.id] = video
        return video

    async def retrieve(self, video_id: str, caller: Any) -> Any:
        self.callers.append(("retrieve", caller))
        return self._find(video_id)

    async def list(self, after: Any, limit: int, order: str, caller: Any) -> Any:
        from srserve.api.protocol import VideoList

        self.callers.append(("list", caller))
        return VideoList(data=list(self.videos.values())[:limit])

    async def delete(self, video_id: str, caller: Any) -> Any:
        from srserve.api.protocol import VideoDeleted

        self.callers.append(("delete", caller))
        self._find(video_id)
        del self.videos[video_id]
        return VideoDeleted(id=video_id)

    async def content(self, video_id: str, variant: str, caller: Any) -> Any:
        from srserve.api.protocol import ApiError

        self.callers.append(("content", caller))
        self._find(video_id)
        raise ApiError(409, "video_id: not completed", param="video_id", code="video_not_ready")

    async def job(self, video_id: str, caller: Any) -> dict:
        self.callers.append(("job", caller))
        return self._find(video_id).model_dump()

    async def models(self) -> list[str]:
        return [self.model.name]

    async def ready(self) -> dict:
        return {"status": "ready"}
