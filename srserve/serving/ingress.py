"""The HTTP ingress: validates and admits jobs, records them, drives them, and serves their status and files.

It implements `srserve.api.routes.VideoService`; the FastAPI app is built per replica once the handles are
there (`__serve_build_asgi_app__`). It never loads a handoff state: stages pass it among themselves.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator

from ray import serve

from srserve.api.protocol import (
    VARIANTS, ApiError, ModelInfo, Video, VideoCreateBody, VideoDeleted, VideoList, resolve_create,
)
from srserve.api.routes import create_app
from srserve.serving.args import AppArgs
from srserve.serving.artifacts import ArtifactStore
from srserve.serving.calls import call, describe
from srserve.serving.driver import JobDriver
from srserve.serving.messages import handoff_loads

def model_info(engine: Any, name: str | None) -> ModelInfo:
    """What requests are checked against, from a weightless engine (configs only)."""
    family, spec = engine.family, engine.spec
    d = family.defaults
    return ModelInfo(name=name or spec.name, fps=spec.fps, default_num_frames=d.num_frames,
                     default_height=d.height, default_width=d.width, default_steps=d.num_inference_steps,
                     default_switch=spec.default_switch, frame_stride=family.vae_scale_temporal,
                     size_multiple=family.vae_scale_spatial * 2)


def to_video(job: dict[str, Any]) -> Video:
    request, status, error = job["request"], job["status"], job.get("error")
    if status == "cancelled":  # only DELETE cancels, and deleted jobs are not shown; kept for completeness
        status, error = "failed", {"code": "cancelled", "message": "the job was cancelled"}
    return Video(id=job["id"], created_at=int(job["created_at"]), model=job["model"],
                 completed_at=int(job["completed_at"]) if job.get("completed_at") else None,
                 progress=job["progress"], prompt=request["generation"]["prompt"], seconds=request["seconds"],
                 size=request["size"], status=status, error=error)


def not_found(video_id: str) -> ApiError:
    return ApiError(404, f"video_id: no video {video_id!r}", param="video_id", code="not_found")


class _Content:
    def __init__(self, artifacts: ArtifactStore, job_id: str, name: str, media_type: str) -> None:
        self.artifacts, self.job_id, self.name = artifacts, job_id, name
        self.media_type, self.filename = media_type, f"{job_id}-{name}"

    async def chunks(self) -> AsyncIterator[bytes]:
        reader = self.artifacts.read_chunks(self.job_id, self.name)
        while chunk := await asyncio.to_thread(next, reader, b""):
            yield chunk


@serve.ingress()
class Ingress:
    async def __init__(self, store: Any, stages: dict[str, Any], args: dict[str, Any]) -> None:
        """`stages`: the handles a job goes through, in order (encode, sketch, render, decode; or colocated)."""
        from srserve.pipeline.engine import SREngine
        from srserve.pipeline.switch import parse_policy
        from srserve.serving.stages import resolve_spec

        self.args = AppArgs.model_validate(args)
        self.engine = SREngine.load(resolve_spec(self.args.model), roles=())  # configs only, no weights
        self.model = model_info(self.engine, self.args.model_name)
        self.parse_policy = parse_policy
        self.store = store
        self.artifacts = ArtifactStore(self.args.artifacts_url)
        # By reference: a stage's response reaches the next stage as an object ref, never resolved here.
        stages = {name: handle.options(_by_reference=True) for name, handle in stages.items()}
        self.owner = serve.get_replica_context().replica_id.unique_id
        self.driver = JobDriver(store, stages, self.owner, self.args.watchdog, self.args.max_retries,
                                self.args.retry_after_s, on_cancelled=self._drop_artifacts)
        self.driver.start()

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self, title=f"srserve ({self.model.name})")

    async def __del__(self) -> None:
        await self.driver.stop()

    # --- VideoService -------------------------------------------------------------------------------------
    async def create(self, body: VideoCreateBody) -> Video:
        resolved = resolve_create(body, self.model, self.args.limits, self.parse_policy)
        try:
            self.engine.resolve(resolved.generation)
        except ValueError as err:
            param = str(err).split(" ", 1)[0].strip(":")
            raise ApiError(422, str(err), param=param, code="invalid_value") from None
        now, job_id = time.time(), f"video_{uuid.uuid4().hex}"
        request = {**resolved.model_dump(mode="json"), "save_frames": self.args.save_frames_npy}
        record = {"id": job_id, "created_at": now, "model": resolved.model, "request": request,
                  "owner": self.owner, "lease_until": now + self.args.watchdog.lease_s}
        created = await call(self.store, "create", record, self.args.max_pending_jobs)
        if created is None:
            raise ApiError(429, f"too many jobs in flight (max_pending_jobs={self.args.max_pending_jobs}); "
                                f"retry after {self.args.retry_after_s}s", code="queue_full",
                           type="rate_limit_error", headers={"Retry-After": str(self.args.retry_after_s)})
        self.driver.drive(job_id)
        return to_video(created)

    async def retrieve(self, video_id: str) -> Video:
        job = await call(self.store, "get", video_id)
        if job is None:
            raise not_found(video_id)
        return to_video(job)

    async def list(self, after: str | None, limit: int, order: str) -> VideoList:
        jobs, has_more = await call(self.store, "list", after, limit, order)
        videos = [to_video(job) for job in jobs]
        return VideoList(data=videos, has_more=has_more, first_id=videos[0].id if videos else None,
                         last_id=videos[-1].id if videos else None)

    async def delete(self, video_id: str) -> VideoDeleted:
        before = await call(self.store, "delete", video_id)
        if before is None:
            raise not_found(video_id)
        if before["status"] in ("completed", "failed", "cancelled"):
            await self._drop_artifacts(video_id)
        return VideoDeleted(id=video_id)

    async def content(self, video_id: str, variant: str) -> _Content:
        job = await call(self.store, "get", video_id)
        if job is None:
            raise not_found(video_id)
        if job["status"] != "completed":
            raise ApiError(409, f"video {video_id} is {job['status']}; its content is available once completed",
                           param="video_id", code="video_not_ready")
        name, media_type = VARIANTS[variant]
        if name not in job["artifacts"]:
            raise ApiError(404, f"variant: {variant!r} was not stored for this video", param="variant",
                           code="not_found")
        return _Content(self.artifacts, video_id, name, media_type)

    async def job(self, video_id: str) -> dict[str, Any]:
        job = await call(self.store, "get", video_id, True)
        if job is None:
            raise not_found(video_id)
        return job

    async def models(self) -> list[str]:
        return [self.model.name]

    async def ready(self) -> dict[str, Any]:
        try:
            await call(self.store, "ping", retry_s=2.0)
            app = serve.get_replica_context().app_name
            status = await asyncio.to_thread(serve.status)
            statuses = {name: str(getattr(d.status, "value", d.status))
                        for name, d in status.applications[app].deployments.items()}
        except Exception as err:
            raise ApiError(503, f"not ready: {describe(err)}", code="not_ready", type="server_error",
                           headers={"Retry-After": "1"}) from None
        unhealthy = {n: s for n, s in statuses.items() if s not in ("HEALTHY", "UPSCALING", "DOWNSCALING")}
        if unhealthy:
            raise ApiError(503, f"not ready: deployments {unhealthy}", code="not_ready", type="server_error",
                           headers={"Retry-After": "1"})
        return {"status": "ready", "model": self.model.name, "deployments": statuses}

    # --- for operators and tests (handle calls, not HTTP) -------------------------------------------------
    def handoff_loads(self) -> int:
        """StageMessages this ingress process deserialised: zero by design."""
        return handoff_loads()

    async def _drop_artifacts(self, job_id: str) -> None:
        await asyncio.to_thread(self.artifacts.delete, job_id)
