"""The HTTP ingress: validates and admits jobs, records them, drives them, and serves their status and files.

It implements `srserve.api.routes.VideoService`; the FastAPI app is built per replica once the handles are
there (`__serve_build_asgi_app__`). It never loads a handoff state: stages pass it among themselves.

Every video belongs to the caller (API key name) that created it: other callers get 404 for it, admins see all.
Admission: the request's cost is estimated per stage (srserve.serving.admission, prices refined from completed
jobs), refused over `max_request_cost_s`, and the JobStore checks the caller's quotas and the deadline atomically.
A periodic sweep removes expired and deleted records and their artifacts.

With `AppArgs.slo`, each replica runs its own SLO controller (srserve.serving.switch_cap) over the jobs it creates
and drives: every `slo.tick_s` it reads the latencies of the jobs completed here and admission's projections,
and each new job's switch is capped by the cap then in force (the record keeps switch_cap, switch_requested and
switch_applied; a client's fixed switch is never overridden).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, AsyncIterator

from ray import serve

from srserve.api.auth import Caller, KeyRing
from srserve.api.protocol import (
    VARIANTS, ApiError, ResolvedRequest, Video, VideoCreateBody, VideoDeleted, VideoList, resolve_create,
)
from srserve.api.routes import create_app
from srserve.control.slo import gauges as slo_gauges
from srserve.pipeline.card import ModelCard, model_card
from srserve.pipeline.spec import resolve_model_spec
from srserve.serving import admission
from srserve.serving.args import AppArgs
from srserve.serving.artifacts import ArtifactStore
# Store calls here answer HTTP requests: bounded, 503 store_unavailable + Retry-After when the store is away.
from srserve.serving.calls import call_for_request as call
from srserve.serving.calls import describe
from srserve.serving.driver import JobDriver
from srserve.serving.job_record import public_record, short_message
from srserve.serving.logs import install_job_filter
from srserve.serving.messages import HandoffProbe
from srserve.serving.metrics import JobMetrics, refusal_reason
from srserve.serving.switch_cap import SwitchCapController

logger = logging.getLogger("ray.serve")
CAPACITY_TTL_S = 30.0  # how long a replica count read from serve.status() is used


def model_info(args: AppArgs) -> ModelCard:
    """The card requests are checked against, from the spec's JSON configs: no engine, no torch. Whether the
    attention backend is installed is the stage replicas' to check (they run the model; this pod does not)."""
    return model_card(resolve_model_spec(args.model, check_backend=False), args.model_name)


def to_video(job: dict[str, Any]) -> Video:
    request, status, error = job["request"], job["status"], job.get("error")
    if status == "cancelled":  # only DELETE cancels, and deleted jobs are not shown; kept for completeness
        status, error = "failed", {"code": "cancelled", "message": "the job was cancelled"}
    if error:  # records written before messages were kept short
        error = {"code": error.get("code", "failed"), "message": short_message(error.get("message", ""))}
    return Video(id=job["id"], created_at=int(job["created_at"]), model=job["model"],
                 completed_at=int(job["completed_at"]) if job.get("completed_at") else None,
                 progress=job["progress"], prompt=request["generation"]["prompt"], seconds=request["seconds"],
                 size=request["size"], status=status, error=error,
                 expires_at=int(job["expires_at"]) if job.get("expires_at") else None)


def not_found(video_id: str) -> ApiError:
    return ApiError(404, f"video_id: no video {video_id[:100]!r}", param="video_id", code="not_found")


def visible(job: dict[str, Any] | None, caller: Caller) -> bool:
    """Whether `caller` may see the job: its own (by key name), or any for an admin."""
    return job is not None and (caller.admin or job.get("tenant", "anonymous") == caller.name)


def refused(refusal: dict[str, Any]) -> ApiError:
    """The ApiError of a refusal from admission (quota, deadline, ceiling)."""
    status, retry = refusal["status"], refusal.get("retry_after_s")
    kind = {429: "rate_limit_error", 503: "server_error"}.get(status, "invalid_request_error")
    return ApiError(status, refusal["message"], param=refusal.get("param"), code=refusal["code"], type=kind,
                    headers={"Retry-After": str(retry)} if retry is not None else None)


def stage_times(reports: Any, attempt: int) -> dict[str, float]:
    """Seconds per stage of one attempt, from the stage events that rode with the job."""
    stages: dict[str, dict[str, float]] = {}
    for event in reports or ():
        if event.get("attempt", attempt) == attempt and event.get("kind") in ("start", "end"):
            stages.setdefault(event["stage"], {})[event["kind"]] = event["at"]
    return admission.stage_seconds(stages)


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
        """`stages`: the handles a job goes through, in order (encode, sketch, render, decode; or colocated), and
        "flex" when the app has flex replicas beside the pools."""
        self.args = AppArgs.model_validate(args)
        self.model = model_info(self.args)
        # Read once here: the args object does no I/O. None: no keys, every caller is ANONYMOUS.
        self.keys = KeyRing.load(self.args.auth.api_keys_file) if self.args.auth else None
        a = self.args.admission
        self.prices = admission.Prices(a.sketch_s_per_token_step, a.render_s_per_token_step, a.encode_s,
                                       a.decode_s_per_token, a.attention_tokens, a.learn_rate)
        self._capacity: tuple[float, dict[str, int]] = (0.0, self._configured_capacity())
        install_job_filter()
        self.jobs = JobMetrics(self.model.name)
        self.switch_cap = self._switch_cap()
        self.store = store
        self.artifacts = ArtifactStore(self.args.artifacts_url)
        # By reference: a stage's response reaches the next stage as an object ref, never resolved here.
        stages = {name: handle.options(_by_reference=True) for name, handle in stages.items()}
        flex = stages.pop("flex", None)
        self.owner = serve.get_replica_context().replica_id.unique_id
        self.driver = JobDriver(store, stages, self.owner, self.args.watchdog, self.args.max_retries,
                                self.args.retry_after_s, on_cancelled=self._drop_artifacts, metrics=self.jobs,
                                on_completed=self._on_completed, artifacts=self.artifacts,
                                flex=flex, flex_slots=self.args.flex_slots())
        self.driver.start()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())
        self._slo_ticker = asyncio.get_running_loop().create_task(self._slo_loop()) if self.switch_cap else None

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self, title=f"srserve ({self.model.name})", on_refused=self._refused, keys=self.keys,
                          api_docs=self.args.api_docs, max_body_bytes=self.args.max_body_bytes)

    async def __del__(self) -> None:
        self._sweeper.cancel()
        if self._slo_ticker is not None:
            self._slo_ticker.cancel()
        await self.driver.stop()

    # --- VideoService -------------------------------------------------------------------------------------
    async def create(self, body: VideoCreateBody, caller: Caller) -> Video:
        resolved = resolve_create(body, self.model, self.args.limits)
        resolved, capped = self._capped(resolved, client_fixed=body.switch is not None)
        generation = resolved.generation.model_dump(mode="json")
        estimate = self.prices.estimate(admission.request_shape(generation, self.model,
                                                                self.args.admission.adaptive_sketch_fraction))
        ceiling = admission.check_ceiling(estimate, self.args.admission.max_request_cost_s, generation,
                                          self.model, resolved.size)
        if ceiling is not None:
            raise refused(ceiling.as_dict())
        now, job_id = time.time(), f"video_{uuid.uuid4().hex}"
        deadline_s, param = self._deadline(body, generation)
        request = {**resolved.model_dump(mode="json"), "save_frames": self.args.save_frames_npy,
                   "priority": caller.priority, "deadline_s": deadline_s}
        record = {"id": job_id, "created_at": now, "model": resolved.model, "request": request,
                  "owner": self.owner, "lease_until": now + self.args.watchdog.lease_s, "tenant": caller.name,
                  "cost": admission.total(estimate), "estimate": estimate, "expires_at": now + self.args.job_ttl_s,
                  **capped}
        quota = {**self.args.auth.quotas.model_dump(), **caller.quota} if self.args.auth else None
        deadline = {"deadline_s": deadline_s, "capacity": await self._stage_capacity(), "param": param,
                    "colocated": self.args.mode == "colocated"} if self.args.admission.check_deadline else None
        created = await call(self.store, "create", record, self.args.max_pending_jobs, self.args.watchdog.lease_s,
                             quota, deadline)
        if created is not None:  # admission's projection of this job's completion, not a record field
            projected = created.pop("projected_s", None)
            if self.switch_cap is not None:
                self.switch_cap.projected(projected)
        if created is not None and "refused" in created:
            raise refused(created["refused"])
        if created is None:
            raise ApiError(429, f"too many jobs in flight (max_pending_jobs={self.args.max_pending_jobs}); "
                                f"retry after {self.args.retry_after_s}s", code="queue_full",
                           type="rate_limit_error", headers={"Retry-After": str(self.args.retry_after_s)})
        self.jobs.created(resolved.generation.switch)
        self.driver.drive(job_id, created)
        return to_video(created)

    def _capped(self, resolved: ResolvedRequest, client_fixed: bool) -> tuple[ResolvedRequest, dict[str, Any]]:
        """The request under the SLO controller's cap, and what its record keeps of it ({} without a controller)."""
        if self.switch_cap is None:
            return resolved, {}
        g = resolved.generation
        result = self.switch_cap.cap(str(g.switch), int(g.num_inference_steps), client_fixed)
        if result.capped:
            resolved = resolved.model_copy(update={"generation": g.model_copy(update={"switch": result.switch})})
        return resolved, result.record()

    def _deadline(self, body: VideoCreateBody, generation: dict[str, Any]) -> tuple[float, str]:
        """The job's deadline (the lowest of job_timeout_s, default_deadline_s and the request's deadline_s) and
        the field a refusal names: deadline_s when the request set it, else the field that costs most."""
        asked = getattr(body, "deadline_s", None)  # an optional create field
        limits = [self.args.watchdog.job_timeout_s, self.args.admission.default_deadline_s]
        deadline = min(v for v in limits if v is not None)
        if asked is not None and asked < deadline:
            return float(asked), "deadline_s"
        return deadline, admission.largest_field(generation, self.model)

    def _refused(self, status: int, code: str | None) -> None:
        """A POST /v1/videos answered with an error (the API's error handlers call this)."""
        code = "quota" if code and code.startswith("quota_") else "deadline" if code == "deadline_unreachable" \
            else code
        self.jobs.refused(code if code in ("quota", "deadline") else refusal_reason(status, code))

    async def retrieve(self, video_id: str, caller: Caller) -> Video:
        job = await self._read(video_id, caller)
        if job is None:
            raise not_found(video_id)
        return to_video(job)

    async def list(self, after: str | None, limit: int, order: str, caller: Caller) -> VideoList:
        tenant = None if caller.admin else caller.name  # in SQL: another key's jobs are not even read
        jobs, has_more = await call(self.store, "list", after, limit, order, tenant)
        videos = [to_video(job) for job in jobs]
        return VideoList(data=videos, has_more=has_more, first_id=videos[0].id if videos else None,
                         last_id=videos[-1].id if videos else None)

    async def delete(self, video_id: str, caller: Caller) -> VideoDeleted:
        before = await call(self.store, "delete", video_id, None if caller.admin else caller.name)
        if before is None:
            raise not_found(video_id)
        self.driver.forget(video_id)
        if before["status"] in ("completed", "failed", "cancelled"):
            await self._drop_artifacts(video_id)
        return VideoDeleted(id=video_id)

    async def content(self, video_id: str, variant: str, caller: Caller) -> _Content:
        job = await self._read(video_id, caller)
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

    async def job(self, video_id: str, caller: Caller) -> dict[str, Any]:
        job = await call(self.store, "get", video_id, True)
        if not visible(job, caller):
            raise not_found(video_id)
        return public_record(job)

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

    async def _read(self, video_id: str, caller: Caller) -> dict[str, Any] | None:
        """A video's record when `caller` may see it: from this replica's driver when it runs (or just ran) the
        job, else the store. The driver's caches hold every tenant's jobs: the check is on whatever came back."""
        job = self.driver.view(video_id)
        if job is None:
            job = await call(self.store, "get", video_id)
        return job if visible(job, caller) else None

    async def _drop_artifacts(self, job_id: str) -> None:
        await asyncio.to_thread(self.artifacts.delete, job_id)

    # --- what admission learns and knows ------------------------------------------------------------------
    def _on_completed(self, job_id: str, attempt: int, result: dict[str, Any]) -> None:
        """The driver's hook after a job completed: its end-to-end latency feeds the SLO controller, then
        `_completed` learns from it."""
        job = self.driver.view(job_id)
        if self.switch_cap is not None and job is not None:
            self.switch_cap.completed(job["created_at"])
        self._completed(job_id, attempt, result)

    def _completed(self, job_id: str, attempt: int, result: dict[str, Any]) -> None:
        """A completed job's stage times refine the prices."""
        job = self.driver.view(job_id)
        if not self.args.admission.learn or job is None:
            return
        shape = admission.request_shape(job["request"]["generation"], self.model,
                                        self.args.admission.adaptive_sketch_fraction)
        self.prices.learn(shape, stage_times(result.get("reports"), attempt), result.get("switch_step"))

    def _configured_capacity(self) -> dict[str, int]:
        """Replicas per stage as configured (autoscaling: its minimum, at least 1)."""
        out = {}
        for name, options in self.args.stages().items():
            scaling = options.autoscaling_config or {}
            out[name] = max(1, int(scaling.get("min_replicas", options.num_replicas) if scaling
                                   else options.num_replicas))
        return out

    async def _stage_capacity(self) -> dict[str, int]:
        """Running replicas per stage from serve.status() (cached CAPACITY_TTL_S), else as configured."""
        read_at, capacity = self._capacity
        if time.monotonic() - read_at < CAPACITY_TTL_S:
            return capacity
        self._capacity = (time.monotonic(), capacity)  # one refresh at a time; the old value meanwhile
        try:
            app = serve.get_replica_context().app_name
            status = await asyncio.to_thread(serve.status)
            deployments = status.applications[app].deployments
            running = {name: sum(n for state, n in (deployments[name.capitalize()].replica_states or {}).items()
                                 if "RUNNING" in str(state)) for name in capacity}
            self._capacity = (time.monotonic(), {n: max(1, v) for n, v in running.items()})
        except Exception as err:  # keep what we had: admission must not fail on a status read
            logger.debug("replica counts not read: %s", describe(err))
        return self._capacity[1]

    # --- the SLO-driven switch point ----------------------------------------------------------------------
    def _switch_cap(self) -> SwitchCapController | None:
        """This replica's controller (None without `slo`); without reference_steps the cap counts the model's
        default steps, and the floor is checked against them here (the args could not read the card)."""
        if self.args.slo is None:
            return None
        try:
            config = self.args.slo.config(self.model.default_steps)
        except ValueError as err:
            raise ValueError(f"slo: {err} (model {self.model.name} defaults to {self.model.default_steps} "
                             f"steps)") from None
        controller = SwitchCapController(config, on_state=lambda state: self.jobs.set_slo(slo_gauges(state)))
        self.jobs.set_slo(controller.gauges())  # the series exist (cap -1: none) before the first tick
        return controller

    async def _slo_loop(self) -> None:
        while True:
            await asyncio.sleep(self.args.slo.tick_s)
            try:
                state = self.switch_cap.tick()
                logger.debug("SLO controller: cap %s (%s)", state.cap, state.reason)
            except Exception as err:  # a failed tick keeps the last cap; the next one tries again
                logger.warning("SLO controller tick failed: %s", describe(err))

    # --- hygiene: expired and deleted records ---------------------------------------------------------------
    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.args.sweep_interval_s)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                logger.warning("sweep of expired jobs failed: %s", describe(err))

    async def sweep(self) -> int:
        """Remove expired records and deleted ones with their artifacts (artifacts first, so nothing is left
        behind if this replica dies halfway); returns how many records were purged."""
        purged, batch = 0, 100
        while True:
            ids = await call(self.store, "expired", None, batch)
            for job_id in ids:
                await self._drop_artifacts(job_id)
                self.driver.forget(job_id)
            done = await call(self.store, "purge", ids)
            purged += done
            if len(ids) < batch or not done:
                return purged
