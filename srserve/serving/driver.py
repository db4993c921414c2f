"""The job driver inside each ingress replica: submits the stage chain, retries, and watches its jobs.

`decode.remote(render.remote(sketch.remote(encode.remote(msg))))` passes object references, so the handoff
state goes replica to replica and the driver only ever receives Decode's small metadata (in colocated mode the
chain is the single `colocated.remote(msg)`). The driver holds a
lease on each job it drives; a watchdog loop renews the leases, checks heartbeats and deadlines, and takes over
jobs whose driver died (an ingress restart). Every accepted job ends completed, failed or cancelled.

A retried or taken-over job resumes after its last finished stage (resume.py).
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
from dataclasses import replace
from typing import Any, Callable

from ray.serve.exceptions import BackPressureError

from srserve.config import GenerationRequest
from srserve.pipeline.switch import parse_policy
from srserve.serving.args import WatchdogOptions
from srserve.serving.artifacts import CheckpointMissing
from srserve.serving.calls import StageStalled, call, caused_by, describe, is_replica_loss
from srserve.serving.logs import job_context
from srserve.serving.messages import JobCancelled, StageMessage
from srserve.serving.metrics import JobMetrics
from srserve.serving.resume import Checkpoints, resume_chain

logger = logging.getLogger("ray.serve")


FINISHED_TTL_S = 30.0


class JobTimedOut(RuntimeError):
    """The job ran past `watchdog.job_timeout_s` (not retried)."""


class Superseded(RuntimeError):
    """Another driver took the job over (this one lost its lease): stop without touching the record."""


async def cancel_all(responses: list[Any]) -> None:
    """Best-effort cancel of a chain's calls. `cancel()` may wait for a replica assignment: not on the loop."""
    def cancel() -> None:
        for response in responses:
            try:
                response.cancel()
            except Exception:  # already finished or failed: nothing left to cancel
                pass

    await asyncio.to_thread(cancel)


def stages_with_work(stages: list[str], request: GenerationRequest) -> list[str]:
    """The stages a request goes through: a denoising stage that the switch policy leaves no steps is skipped
    (`none` runs no render steps, `small-only` no sketch steps), as colocated mode does in-process."""
    policy = parse_policy(request.switch or "adaptive")
    steps = request.num_inference_steps
    sketch_steps = {"none": steps, "small-only": 0, "step": policy.value}.get(policy.kind)
    skip = set()
    if sketch_steps is not None and steps is not None:
        if sketch_steps <= 0:
            skip.add("sketch")
        elif sketch_steps >= steps:
            skip.add("render")
    return [name for name in stages if name not in skip]


class JobDriver:
    def __init__(self, store: Any, stages: dict[str, Any], owner: str, watchdog: WatchdogOptions,
                 max_retries: int, retry_after_s: float, on_cancelled: Any = None,
                 metrics: JobMetrics | None = None, artifacts: Any = None,
                 on_completed: Callable[[str, int, dict[str, Any]], Any] | None = None,
                 flex: Any = None, flex_slots: int = 0) -> None:
        self.store, self.stages, self.owner = store, stages, owner
        # Flex replicas (Colocated, beside the pools): a job runs whole on one while this driver has fewer than
        # `flex_slots` jobs there; the rest go through the pools.
        self.flex, self.flex_slots, self.flex_jobs = flex, flex_slots if flex is not None else 0, 0
        self.metrics = metrics if metrics is not None else JobMetrics("other")
        self.watchdog, self.max_retries, self.retry_after_s = watchdog, max_retries, retry_after_s
        self.on_cancelled = on_cancelled  # async callable(job_id): clean up a cancelled job's artifacts
        self.on_completed = on_completed  # callable(job_id, attempt, Decode's result), sync or async
        # `artifacts`: the ArtifactStore the stages checkpoint into (None, or colocated: no resuming).
        enabled = artifacts is not None and watchdog.checkpoint_stages and "encode" in stages
        self.checkpoints = Checkpoints(artifacts) if enabled else None
        self._no_resume: set[str] = set()  # jobs whose checkpoint failed to load: their next attempt starts over
        self._cancel_seen: dict[str, float] = {}  # when this driver first saw each job's DELETE
        self._claim_after = 0.0  # monotonic time before which no orphan is claimed (the store was just away)
        self._tasks: dict[str, asyncio.Task] = {}
        self._aborts: dict[str, asyncio.Future] = {}
        # The record of each job driven here as of the last watchdog round (at most `interval_s` old): status
        # polls for these jobs are answered without a store call.
        self._views: dict[str, dict[str, Any]] = {}
        # Jobs that completed here lately, with their final record (from `complete_and_get`): a client's last
        # polls and its download are answered without a store call. Kept `FINISHED_TTL_S`, or until deleted here.
        self._finished: dict[str, tuple[float, dict[str, Any]]] = {}
        self._loop_task: asyncio.Task | None = None

    # --- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        # The in-flight gauges exist from the start (0 on an idle app, or one without flex replicas): their
        # dashboard panels show 0, not "no data".
        self.metrics.set_in_flight(len(self._tasks))
        self.metrics.set_flex_in_flight(self.flex_jobs)
        self._loop_task = asyncio.get_running_loop().create_task(self._watch_loop())

    async def stop(self) -> None:
        for task in [self._loop_task, *self._tasks.values()]:
            if task is not None:
                task.cancel()

    def drive(self, job_id: str, record: dict[str, Any] | None = None) -> None:
        """Run the job to its end in the background (no-op when already driven here)."""
        if job_id not in self._tasks:
            if record is not None:
                self._views[job_id] = record
            with job_context(job_id):  # the task's lines carry the job id (it copies the context)
                self._tasks[job_id] = asyncio.get_running_loop().create_task(self._drive(job_id))
            self.metrics.set_in_flight(len(self._tasks))

    def view(self, job_id: str) -> dict[str, Any] | None:
        """The job's record as of the last watchdog round, when this driver runs it or just completed it
        (None: ask the store)."""
        job = self._views.get(job_id)
        if job is not None:
            return None if job["deleted"] else job
        finished = self._finished.get(job_id)
        if finished is None or time.monotonic() - finished[0] > FINISHED_TTL_S:
            self._finished.pop(job_id, None)
            return None
        return finished[1]

    def forget(self, job_id: str) -> None:
        """Stop answering for the job (it was deleted): the store is the truth for it from now on."""
        self._views.pop(job_id, None)
        self._finished.pop(job_id, None)

    @property
    def active(self) -> list[str]:
        return list(self._tasks)

    # --- one job ------------------------------------------------------------------------------------------
    async def _drive(self, job_id: str) -> None:
        try:
            view = self._views.get(job_id)
            begun = view if view and view["attempt"] >= 1 and view["owner"] == self.owner else None
            while await self._attempt(job_id, begun):
                begun = None
        except asyncio.CancelledError:
            raise
        except Exception:  # the store is unreachable for long: the lease lapses and another driver resumes
            logger.exception("driving job %s failed; its lease will lapse and it will be resumed", job_id)
        finally:
            self._tasks.pop(job_id, None)
            self._aborts.pop(job_id, None)
            self._views.pop(job_id, None)
            self._no_resume.discard(job_id)
            self._cancel_seen.pop(job_id, None)
            self.metrics.set_in_flight(len(self._tasks))

    async def _attempt(self, job_id: str, begun: dict[str, Any] | None = None) -> bool:
        """Run one attempt (`begun`: its record when the store began it already, at create); True to run another."""
        job = begun or await call(self.store, "begin_attempt", job_id, self.owner, self.watchdog.lease_s)
        if job is None:
            return False
        self._views[job_id] = job
        attempt, request = job["attempt"], job["request"]
        policy, created_at = request["generation"].get("switch"), job["created_at"]

        def ended(status: str, reason: Any = None) -> None:
            self.metrics.ended(status, reason, policy, max(0.0, time.time() - created_at))
        msg = StageMessage(job_id, attempt, GenerationRequest.model_validate(request["generation"]),
                           request["fps"], request.get("save_frames", False),
                           priority=request.get("priority", "interactive"))
        msg = replace(msg, resume_from=await self._resume_point(job_id, attempt, msg.request))
        abort = asyncio.get_running_loop().create_future()
        self._aborts[job_id] = abort
        responses, on_flex = self._submit(msg)
        try:
            result = await self._wait(responses, abort, on_flex)
        except Superseded:
            return False
        except BackPressureError:  # a stage queue is full: not the job's fault, try again shortly
            await cancel_all(responses)
            await asyncio.sleep(self.retry_after_s)
            return True
        except JobCancelled as err:  # deleted by a user, or superseded (then the store leaves the record alone)
            if await call(self.store, "mark_cancelled", job_id, describe(err)):
                ended("cancelled", "cancelled")
                await self._cancelled(job_id)
            return False
        except JobTimedOut as err:
            if await call(self.store, "fail", job_id, attempt, "timeout", str(err)):
                ended("failed", "timeout")
                await self._drop_checkpoints(job_id)
            return False
        except Exception as err:
            await cancel_all(responses)
            if msg.resume_from and caused_by(err, CheckpointMissing):  # not the job's fault: start over, no retry spent
                logger.warning("job %s: cannot resume after %s (%s); starting over", job_id, msg.resume_from,
                               describe(err))
                self._no_resume.add(job_id)
                return True
            if not is_replica_loss(err):
                if await call(self.store, "fail", job_id, attempt, "generation_failed", describe(err)):
                    ended("failed", err)
                    await self._drop_checkpoints(job_id)
                return False
            logger.warning("job %s attempt %d lost a replica: %s", job_id, attempt, describe(err))
            verdict = await call(self.store, "retry_or_fail", job_id, attempt, describe(err), self.max_retries)
            if verdict == "retry":
                self.metrics.retried(err)
            elif verdict in ("failed", "cancelled"):
                ended(verdict, "retries_exhausted" if verdict == "failed" else "cancelled")
            if verdict == "cancelled":
                await self._cancelled(job_id)
            elif verdict == "failed":
                await self._drop_checkpoints(job_id)
            return verdict == "retry"
        outcome, final = await call(self.store, "complete_and_get", job_id, attempt, result)
        if outcome == "deleted":
            ended("cancelled", "cancelled")
            await self._cancelled(job_id)  # deleted while finishing: drop what Decode wrote
        elif outcome == "completed":
            self.metrics.completed(policy, created_at, result)
            self._finished[job_id] = (time.monotonic(), final)  # the client's last polls read it from here
            self._views.pop(job_id, None)  # not the running record while the job's last steps below run
            await self._drop_checkpoints(job_id)  # a completed job keeps only its video variants
            await self._completed(job_id, attempt, result)
        return False

    async def _resume_point(self, job_id: str, attempt: int, request: GenerationRequest) -> str | None:
        """Where this attempt starts: after the last checkpointed stage (a first attempt has none saved)."""
        if self.checkpoints is None or attempt <= 1 or job_id in self._no_resume:
            return None
        after = await self.checkpoints.resume_point(job_id, stages_with_work(list(self.stages), request))
        if after is not None:
            logger.info("job %s attempt %d resumes after its %s checkpoint", job_id, attempt, after)
        return after

    async def _drop_checkpoints(self, job_id: str) -> None:
        if self.checkpoints is not None:
            await self.checkpoints.drop(job_id)

    async def _completed(self, job_id: str, attempt: int, result: dict[str, Any]) -> None:
        if self.on_completed is None:
            return
        try:
            done = self.on_completed(job_id, attempt, result)
            if inspect.isawaitable(done):
                await done
        except Exception as err:  # an observer's failure is not the job's
            logger.warning("on_completed for job %s failed: %s", job_id, describe(err))

    def _submit(self, msg: StageMessage) -> tuple[list[Any], bool]:
        """(the calls, whether on a flex replica). A job starting from scratch runs whole on a flex replica when
        this driver has a flex slot free; otherwise the stages are chained by handle, each getting the previous
        one's response, i.e. an object reference."""
        if self.flex_jobs < self.flex_slots and not msg.resume_from:
            self.flex_jobs += 1
            self.metrics.set_flex_in_flight(self.flex_jobs)
            return [self.flex.remote(msg)], True
        responses, previous = [], msg
        for name in resume_chain(stages_with_work(list(self.stages), msg.request), msg.resume_from):
            previous = self.stages[name].remote(previous)
            responses.append(previous)
        return responses, False

    async def _wait(self, responses: list[Any], abort: asyncio.Future, on_flex: bool = False) -> Any:
        """Decode's result, unless the watchdog aborts first (then every call of the chain is cancelled). A flex
        slot is free again once the call has ended either way."""
        async def result() -> Any:
            return await responses[-1]

        task = asyncio.ensure_future(result())
        try:
            done, _ = await asyncio.wait({task, abort}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            task.cancel()
            await cancel_all(responses)
            raise abort.exception()
        finally:
            if on_flex:
                self.flex_jobs -= 1
                self.metrics.set_flex_in_flight(self.flex_jobs)

    async def _cancelled(self, job_id: str) -> None:
        if self.on_cancelled is not None:
            await self.on_cancelled(job_id)
        await self._drop_checkpoints(job_id)

    # --- the watchdog -------------------------------------------------------------------------------------
    async def _watch_loop(self) -> None:
        while True:
            try:
                await self._watch_once()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                logger.warning("job watchdog round failed: %s", describe(err))
                # The store was away: every driver's leases may have lapsed meanwhile. Take no job over for one
                # lease after it is back, so that the other drivers renew theirs first (no needless takeovers).
                self._claim_after = time.monotonic() + self.watchdog.lease_s
            await asyncio.sleep(self.watchdog.interval_s)

    async def _watch_once(self) -> None:
        w = self.watchdog
        self._sweep_finished()
        # Bounded: with no live store replica Serve's router waits for one, and a round must fail, not hang.
        bound = {"retry_s": w.interval_s, "timeout_s": max(w.lease_s / 3, w.interval_s)}
        if time.monotonic() < self._claim_after:
            seen = {"jobs": await call(self.store, "renew", self.owner, self.active, w.lease_s, **bound),
                    "claimed": []}
        else:
            seen = await call(self.store, "watch", self.owner, self.active, w.lease_s, self.max_retries, **bound)
        now = time.time()
        for job_id, job in seen["jobs"].items():
            if job_id in self._views:
                self._views[job_id].update(job)
            problem = self._problem(job, now)
            abort = self._aborts.get(job_id)
            if problem is not None and abort is not None and not abort.done():
                abort.set_exception(problem)
        for job_id in seen["claimed"]:
            logger.info("resuming job %s (its driver's lease lapsed)", job_id)
            self.drive(job_id)

    def _sweep_finished(self) -> None:
        """Forget completed jobs past `FINISHED_TTL_S` whose records nobody read again here (their polls went
        to another ingress replica): each holds a whole record, prompt included."""
        now = time.monotonic()
        for job_id in [j for j, (at, _) in self._finished.items() if now - at > FINISHED_TTL_S]:
            del self._finished[job_id]

    def _problem(self, job: dict[str, Any], now: float) -> BaseException | None:
        w = self.watchdog
        if job["owner"] != self.owner:
            return Superseded(f"job taken over by driver {job['owner']}")
        if job["cancel_requested"]:
            cancelled = self._cancel_problem(job, now)
            if cancelled is not None:
                return cancelled
        # The job's own deadline (admission stored the lowest of job_timeout_s and the request's deadline_s).
        request = (self._views.get(job["id"]) or {}).get("request") or {}
        limit = min(w.job_timeout_s, request.get("deadline_s") or w.job_timeout_s)
        if now - job["created_at"] > limit:
            return JobTimedOut(f"job ran longer than its deadline of {limit:g}s")
        if job["stage"] and job["heartbeat_at"] and now - job["heartbeat_at"] > w.stage_timeout_s:
            return StageStalled(f"stage {job['stage']} on replica {job['stage_replica']} sent no heartbeat for "
                                f"{w.stage_timeout_s:g}s")
        return None

    def _cancel_problem(self, job: dict[str, Any], now: float) -> JobCancelled | None:
        """A deleted job: one waiting between stages is cut loose now; a running stage stops itself at its next
        step boundary (its own JobCancelled says where), and is cut loose only `cancel_grace_s` after this driver
        saw the DELETE (not after its last heartbeat: one slow step must not count as waiting)."""
        seen = self._cancel_seen.setdefault(job["id"], now)
        stage = job["stage"]
        if not stage:
            started = job["status"] != "queued"
            return JobCancelled("cancelled while queued for its next stage" if started else
                                "cancelled before it started")
        if now - seen > self.watchdog.cancel_grace_s:
            return JobCancelled(f"cancelled during {stage}: the stage did not stop within "
                                f"{self.watchdog.cancel_grace_s:g}s of the request")
        return None
