"""The pipeline's stage deployments: Encode, Sketch, Render, Decode. Thin wrappers over `SREngine`.

A job flows as a `StageMessage` (job id, attempt, the handoff state of CPU tensors) from stage to stage by
object reference; only Decode returns something to the driver, and that is small metadata. Each hop carries
what its receiver reads: the prompt embeddings go into the object store once (Encode) and reach both denoising
stages by reference; Decode gets the latents and the family's state only. Sketch and Render run a step-level
batch: requests join and leave at step boundaries, same-shape ones share forward passes, and a fair scheduler
picks each forward (a short job is not held behind long ones; interactive before batch). Each stage reports
start and end to the JobStore, and progress at most once per `progress_interval_s`; the store's answer tells a
stage to stop (a DELETE), so the store sees O(stages) writes per job, not O(steps).
The stages also run in-process inside one `Colocated` replica (colocated.py), sharing a `compute` lock.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Any

from srserve.config import GenerationRequest, ModelSpec
from srserve.pipeline.errors import Cancelled
from srserve.serving.args import EncodeOptions
from srserve.serving.artifacts import ArtifactStore, CheckpointMissing, encode_outputs
from srserve.serving.batch_loop import BatchLoop, Entry
from srserve.serving.calls import describe
from srserve.serving.messages import JobCancelled, StageMessage
from srserve.serving.metrics import StageMetrics
from srserve.serving.reporter import Reporter, Watch
from srserve.serving.stage_base import StageBase, resolve_spec

logger = logging.getLogger("ray.serve")

__all__ = ["Decode", "Encode", "Render", "Sketch", "StageBase", "resolve_spec"]


class Encode(StageBase):
    """Text encoder + the step-0 state (seeded noise, scheduler). Prompt embeddings are cached (LRU)."""

    role, roles, options_model = "encode", ("encode",), EncodeOptions

    def __init__(self, model: str | ModelSpec | None, store: Any, options: dict[str, Any],
                 compute: Any = None, reporter: Reporter | None = None, metrics: StageMetrics | None = None) -> None:
        super().__init__(model, store, options, compute, reporter, metrics)
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        # In a Colocated replica the state stays in memory; across replicas the embeddings go by reference.
        self._by_reference = compute is None
        # The object-store copies of recent embeddings, held here (the owner) so they outlive the jobs that read
        # them: Ray's borrowing protocol, with the reference passed Encode -> Sketch -> Render inside messages
        # while the calls are owned by the ingress, was seen to free one early (ReferenceCountingAssertionError
        # in Render, ~1 job in 150). Also: one put per prompt while it is held.
        self._refs: OrderedDict[tuple, Any] = OrderedDict()

    async def __call__(self, msg: StageMessage) -> StageMessage:
        msg = self._begin(msg)
        with self._scope(msg):
            if msg.resume_from:
                return await self._resume(msg)
            async with self._turn():
                state, key = await asyncio.to_thread(self._encode, msg.request)
            msg = self._end(msg, {})
            if not self._by_reference:
                return replace(msg, state=state)
            return replace(msg, state=state.replace(embeddings=None), embeddings=self._put(key, state.embeddings))

    async def _resume(self, msg: StageMessage) -> StageMessage:
        """A retried job restarts after the stage `msg.resume_from`: the state that stage handed on, from its
        checkpoint, with the prompt embeddings when a denoising stage comes next. They are not checkpointed: a
        pure function of the request, they come from the prompt cache or are encoded again (a fraction of a
        denoising stage), so the steady state writes only the hop states."""
        if self.checkpoints is None or not self._by_reference:
            raise CheckpointMissing(f"job {msg.job_id}: this Encode replica has no checkpoint store")
        state = await asyncio.to_thread(self.checkpoints.load_checkpoint, msg.job_id, msg.resume_from)
        embeddings = None
        if not state.done:
            async with self._turn():
                resolved = self.engine.resolve(msg.request)
                key, value, _ = await asyncio.to_thread(self._embeddings, resolved)
            embeddings = self._put(key, value)
        msg = self._end(msg, {"resumed_from": msg.resume_from, "step": state.step_index})
        return replace(msg, state=state, embeddings=embeddings)

    def _put(self, key: tuple, embeddings: Any) -> Any:
        import ray

        ref = self._refs.get(key)
        if ref is None:
            ref = self._refs[key] = ray.put(embeddings)
            while len(self._refs) > self.options.embeddings_held:
                self._refs.popitem(last=False)
        else:
            self._refs.move_to_end(key)
        return ref

    def _encode(self, request: GenerationRequest) -> tuple[Any, tuple]:
        resolved = self.engine.resolve(request)
        key, embeddings, seconds = self._embeddings(resolved)
        with self.compute:
            began = time.perf_counter()
            state = self.engine.prepare(resolved, embeddings)
            self.metrics.observe_step(seconds + time.perf_counter() - began, 1, "encode")
        return state, key

    def _embeddings(self, resolved: GenerationRequest) -> tuple[tuple, Any, float]:
        """(cache key, prompt embeddings, seconds encoding) of a resolved request: from the LRU cache (0 s), else
        encoded and kept."""
        key = (resolved.prompt, resolved.negative_prompt, resolved.max_sequence_length, resolved.guidance_scale,
               resolved.guidance_scale_2)
        embeddings = self._cache.get(key)
        seconds = 0.0  # in the compute lock: a Colocated replica's wait for the device is not the encode's
        if embeddings is None:
            self.metrics.cache_miss()
            with self.compute:
                began = time.perf_counter()
                embeddings = self.engine.encode(resolved)
                seconds = time.perf_counter() - began
            if self.options.prompt_cache_size:
                self._cache[key] = embeddings
                while len(self._cache) > self.options.prompt_cache_size:
                    self._cache.popitem(last=False)
        else:
            self.metrics.cache_hit()
            self._cache.move_to_end(key)
        return key, embeddings, seconds


class _Denoise(StageBase):
    """Runs a `DenoiseBatch` in one worker thread (`BatchLoop`): admit at step boundaries, step what the fair
    scheduler picks (srserve.pipeline.scheduling), retire finished requests."""

    def __init__(self, model: str | ModelSpec | None, store: Any, options: dict[str, Any],
                 compute: Any = None, reporter: Reporter | None = None, metrics: StageMetrics | None = None) -> None:
        super().__init__(model, store, options, compute, reporter, metrics)
        self._batch = self.engine.new_batch(self.role, max_batch_size=self.options.max_batch_size)
        self._keys = itertools.count()
        # The worker thread: admits at step boundaries, steps what the fair scheduler picks (batch_loop.py).
        self._loop = BatchLoop(self._batch, self.options, self.compute, self.metrics, self.role)

    async def __call__(self, msg: StageMessage) -> StageMessage:
        msg = self._begin(msg)
        if msg.state.done:  # e.g. the adaptive rule ran the sketch to the end: nothing to render
            return self._end(msg, {"step": msg.state.step_index})
        for event in msg.reports:  # what rode here unreported (Encode's events, ...) and this start
            if not event.get("reported"):
                self.reporter.add(event)
        msg = replace(msg, reports=tuple({**e, "reported": True} for e in msg.reports))
        watch = self.reporter.watch(msg.job_id, msg.attempt, self.role)
        with self._scope(msg):
            try:
                msg = await _attach_embeddings(msg)
                state = await self._denoise(msg, watch)
            finally:
                self.reporter.unwatch(watch)
            handed, embeddings = self._handed_on(msg, state)
            info = {"switch_step": state.switch_step, "step": state.step_index, "num_steps": state.num_steps,
                    "first_step_at": watch.first_step_at, **await self._checkpoint(msg, handed)}
            msg = self._end(msg, info)
        self.reporter.add(msg.reports[-1])  # the record shows the stage ended before Decode's result lands
        return replace(msg, state=handed, embeddings=embeddings, transfer=None)

    def _handed_on(self, msg: StageMessage, state: Any) -> tuple[Any, Any]:
        """(the state the next stage gets, the embeddings reference it carries)."""
        if msg.embeddings is None:  # in memory (Colocated): nothing crosses a process
            return state, None
        if state.done:  # the next stage is Decode: latents and the family's state only
            return state.for_decode(), None
        return state.replace(embeddings=None), msg.embeddings

    async def _checkpoint(self, msg: StageMessage, handed: Any) -> dict[str, Any]:
        """Save the handed-on state, so a retry resumes after this stage; `{"checkpoint": role}` (the stage's end
        event takes it to the record) once written. Best effort: a failed write only means a retry starts earlier.
        """
        if self.checkpoints is None or msg.embeddings is None:  # off, or Colocated (one process: nothing to save)
            return {}
        began = time.perf_counter()
        try:
            size = await asyncio.to_thread(self.checkpoints.put_checkpoint, msg.job_id, self.role, handed)
        except Exception as err:
            logger.warning("job %s: %s checkpoint not written: %s", msg.job_id, self.role, describe(err))
            return {}
        return {"checkpoint": self.role, "checkpoint_bytes": size, "checkpoint_s": time.perf_counter() - began}

    async def _denoise(self, msg: StageMessage, watch: Watch) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._loop.submit(Entry(f"{msg.job_id}#{msg.attempt}#{next(self._keys)}", msg.state, watch, msg.priority,
                                loop, future))
        try:
            return await future
        except asyncio.CancelledError:  # the driver gave up on this call: stop at the next step boundary
            watch.stop.set()
            raise
        except Cancelled as err:
            raise JobCancelled(f"job {msg.job_id} cancelled in {self.role}: {err}") from None

    def _record_cost(self, msg: StageMessage, info: dict[str, Any], seconds: float) -> None:
        """Seconds per step while resident in the batch (from the first step's end, so the wait to join is left
        out), the steps run and, for the sketch, the switch step: what the policy needs to price this stage."""
        steps = int(info.get("step") or 0) - msg.state.step_index
        if steps <= 0:  # passed through without a step (e.g. nothing left to render)
            return
        first = info.get("first_step_at")
        step_s = (time.time() - first) / (steps - 1) if first is not None and steps > 1 else seconds / steps
        self.autoscale_stats.finished(step_s * steps, step_seconds=step_s, num_steps=info.get("num_steps"),
                                      switch_step=info.get("switch_step") if self.role == "sketch" else None)

    def record_autoscaling_stats(self) -> dict[str, float]:
        waiting, resident = self._loop.waiting_and_resident()
        return self.autoscale_stats.snapshot(waiting, resident)

    def load(self) -> int:
        """Requests in this replica now (resident in the batch or waiting to join it)."""
        return self._loop.load()

    def _publish_load(self) -> None:
        self._loop.publish_load()

    def __del__(self) -> None:
        if getattr(self, "_loop", None) is not None:
            self._loop.close()


async def _attach_embeddings(msg: StageMessage) -> StageMessage:
    """The state with its prompt embeddings, fetched from the object store when they came by reference."""
    if msg.embeddings is None:
        return msg
    began = time.perf_counter()
    embeddings = await msg.embeddings
    transfer = dict(msg.transfer or {})
    transfer["embeddings_bytes"] = float(sum(t.nbytes for t in  # torch tensors and numpy arrays both have it
                                             (embeddings.prompt_embeds, embeddings.negative_prompt_embeds)
                                             if t is not None))
    transfer["embeddings_s"] = time.perf_counter() - began
    return replace(msg, state=msg.state.replace(embeddings=embeddings), transfer=transfer)


class Sketch(_Denoise):
    """The large model: steps [0, k), k from the request's switch policy."""

    role, roles = "sketch", ("sketch",)


class Render(_Denoise):
    """The small model: steps [k, N)."""

    role, roles = "render", ("render",)


class Decode(StageBase):
    """VAE decode, mp4 encode, artifacts; returns only small metadata to the driver."""

    role, roles = "decode", ("decode",)

    def __init__(self, model: str | ModelSpec | None, store: Any, options: dict[str, Any],
                 artifacts_url: str, compute: Any = None, reporter: Reporter | None = None,
                 metrics: StageMetrics | None = None) -> None:
        super().__init__(model, store, options, compute, reporter, metrics)
        self.artifacts = ArtifactStore(artifacts_url)

    async def __call__(self, msg: StageMessage) -> dict[str, Any]:
        """Small metadata for the driver, with every stage event of the job for `store.complete`.

        A stop (DELETE, superseded attempt: the reporter's answer; or the caller gone) is checked between the
        VAE's chunks and between the artifacts' encodings; the artifacts are written only once all are encoded,
        so a stopped decode writes none. Each worker thread is awaited to its end, the lock held meanwhile."""
        msg = self._begin(msg)
        with self._scope(msg):
            watch = self.reporter.watch(msg.job_id, msg.attempt, self.role)
            try:
                async with self._turn():  # one VAE decode at a time, for the whole of its thread
                    frames = await _to_thread_to_end(watch.stop, self._decode, msg.state, watch.should_cancel)
                stored = await _to_thread_to_end(watch.stop, self._write, msg, frames, watch.should_cancel)
            except Cancelled as err:
                raise JobCancelled(f"job {msg.job_id} cancelled in {self.role}: {err}") from None
            finally:
                self.reporter.unwatch(watch)
            info = {"switch_step": msg.state.switch_step, "num_frames": int(frames.shape[0]), "artifacts": stored}
            return {**info, "reports": list(self._end(msg, info).reports)}

    def _decode(self, state: Any, should_cancel: Any) -> Any:
        with self.compute, self.metrics.step(1, "decode"):
            return self.engine.decode(state, should_cancel)

    def _write(self, msg: StageMessage, frames: Any, should_cancel: Any) -> dict[str, str]:
        """Encode every artifact (mp4, previews, frames), stopping between them, then write them all."""
        encoded = {}
        for name, data in encode_outputs(frames, msg.fps, msg.save_frames):
            if should_cancel():
                raise Cancelled(f"cancelled before writing the artifacts (encoded: {sorted(encoded)})")
            encoded[name] = data
        if should_cancel():
            raise Cancelled("cancelled before writing the artifacts")
        return {name: self.artifacts.put(msg.job_id, name, data) for name, data in encoded.items()}


async def _to_thread_to_end(stop: threading.Event, func: Any, *args: Any) -> Any:
    """`func(*args)` in a worker thread, awaited to its very end: when the caller is cancelled meanwhile, `stop`
    is set (the thread stops at its next check) and the thread is still awaited before the cancellation goes on,
    so a lock held around this call is never released while the thread runs (seen: two decodes overlapping)."""
    work = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        stop.set()
        while not work.done():
            with contextlib.suppress(BaseException):  # cancelled again, or the thread's own error: wait on
                await asyncio.shield(work)
        if not work.cancelled():
            work.exception()  # retrieved: the caller's cancellation is what goes on
        raise
