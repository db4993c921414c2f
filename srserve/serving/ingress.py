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
    VARIANTS, ApiError, Video, VideoCreateBody, VideoDeleted, VideoList, resolve_create,
)
from srserve.api.routes import create_app
from srserve.pipeline.card import ModelCard, model_card
from srserve.pipeline.spec import resolve_model_spec
from srserve.serving.args import AppArgs
from srserve.serving.artifacts import ArtifactStore
from srserve.serving.calls import call, describe
from srserve.serving.driver import JobDriver
from srserve.serving.logs import install_job_filter
from srserve.serving.messages import HandoffProbe
from srserve.serving.metrics import JobMetrics, refusal_reason


def model_info(args: AppArgs) -> ModelCard:
    """The card requests are checked against, from the spec's JSON configs: no engine, no torch. Whether the
    attention backend is installed is the stage replicas' to check (they run the model; this pod does not)."""
    return model_card(resolve_model_spec(args.model, check_backend=False), args.model_name)


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
class Ingress(HandoffProbe):
    async def __init__(self, store: Any, stages: dict[str, Any], args: dict[str, Any]) -> None:
        """`stages`: the handles a job goes through, in order (encode, sketch, render, decode; or colocated)."""
        self.args = AppArgs.model_validate(args)
        self.model = model_info(self.args)
        install_job_filter()
        self.jobs = JobMetrics(self.model.name)
        self.store = store
        self.artifacts = ArtifactStore(self.args.artifacts_url)
        # By reference: a stage's response reaches the next stage as an object ref, never resolved here.
        stages = {name: handle.options(_by_reference=True) for name, handle in stages.items()}
        self.owner = serve.get_replica_context().replica_id.unique_id
        self.driver = JobDriver(store, stages, self.owner, self.args.watchdog, self.args.max_retries,
                                self.args.retry_after_s, on_cancelled=self._drop_artifacts, metrics=self.jobs)
        self.driver.start()

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self, title=f"srserve ({self.model.name})", on_refused=self._refused)

    async def __del__(self) -> None:
        await self.driver.stop()

    # --- VideoService -------------------------------------------------------------------------------------
    async def create(self, body: VideoCreateBody) -> Video:
        resolved = resolve_create(body, self.model, self.args.limits)
        now, job_id = time.time(), f"video_{uuid.uuid4().hex}"
        request = {**resolved.model_dump(mode="json"), "save_frames": self.args.save_frames_npy}
        record = {"id": job_id, "created_at": now, "model": resolved.model, "request": request,
                  "owner": self.owner, "lease_until": now + self.args.watchdog.lease_s}
        created = await call(self.store, "create", record, self.args.max_pending_jobs, self.args.watchdog.lease_s)
        if created is None:
            raise ApiError(429, f"too many jobs in flight (max_pending_jobs={self.args.max_pending_jobs}); "
                                f"retry after {self.args.retry_after_s}s", code="queue_full",
                           type="rate_limit_error", headers={"Retry-After": str(self.args.retry_after_s)})
        self.jobs.created(resolved.generation.switch)
        self.driver.drive(job_id, created)
        return to_video(created)

    def _refused(self, status: int, code: str | None) -> None:
        """A POST /v1/videos answered with an error (the API's error handlers call this)."""
        self.jobs.refused(refusal_reason(status, code))

    async def retrieve(self, video_id: str) -> Video:
        job = await self._read(video_id)
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
        self.driver.forget(video_id)
        if before is None:
            raise not_found(video_id)
        if before["status"] in ("completed", "failed", "cancelled"):
            await self._drop_artifacts(video_id)
        return VideoDeleted(id=video_id)

    async def content(self, video_id: str, variant: str) -> _Content:
        job = await self._read(video_id)
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

    async def _read(self, video_id: str) -> dict[str, Any] | None:
        """A video's record: from this replica's driver when it runs (or just ran) the job, else the store."""
        job = self.driver.view(video_id)
        if job is None:
            job = await call(self.store, "get", video_id)
            self.driver.remember(job)
        return job

    async def _drop_artifacts(self, job_id: str) -> None:
        await asyncio.to_thread(self.artifacts.delete, job_id)
