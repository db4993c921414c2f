"""The pipeline's stage deployments: Encode, Sketch, Render, Decode. Thin wrappers over `SREngine`.

A job flows as a `StageMessage` (job id, attempt, the handoff state of CPU tensors) from stage to stage by
object reference; only Decode returns something to the driver, and that is small metadata. Each hop carries
what its receiver reads: the prompt embeddings go into the object store once (Encode) and reach both denoising
stages by reference; Decode gets the latents and the family's state only. Sketch and Render run a step-level
batch: requests join and leave at step boundaries and same-shape ones share forward passes. Each stage reports
start and end to the JobStore, and progress at most once per `progress_interval_s`; the store's answer tells a
stage to stop (a DELETE), so the store sees O(stages) writes per job, not O(steps).
The stages also run in-process inside one `Colocated` replica (colocated.py), sharing a `compute` lock.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Any

from ray import serve

from srserve.config import GenerationRequest, ModelSpec
from srserve.pipeline.engine import Cancelled, DenoiseBatch, SREngine
from srserve.pipeline.spec import resolve_model_spec
from srserve.serving.args import EncodeOptions, StageOptions
from srserve.serving.artifacts import ArtifactStore
from srserve.serving.calls import describe
from srserve.serving.gpu import start_gpu_sampler
from srserve.serving.logs import install_job_filter, job_context, log_transition
from srserve.serving.messages import HandoffProbe, JobCancelled, StageMessage
from srserve.serving.metrics import StageMetrics
from srserve.serving.reporter import Reporter, Watch, stage_event

logger = logging.getLogger("ray.serve")


def resolve_spec(model: str | ModelSpec | dict[str, Any]) -> ModelSpec:
    """`AppArgs.model` (a path or inline ModelSpec fields; AppArgs names the bundled model) as a checked spec."""
    return resolve_model_spec(ModelSpec.model_validate(model) if isinstance(model, dict) else model)


def pin_process(cores: list[int] | None) -> None:
    """Pin every thread of this process (and so the threads it starts later) to `cores` (Linux only)."""
    if not cores or not hasattr(os, "sched_setaffinity"):
        return
    try:
        os.sched_setaffinity(0, cores)
    except (OSError, ValueError) as err:
        raise ValueError(f"cpu_affinity {cores}: cannot pin to these cores here ({err})") from None
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that just ended
            os.sched_setaffinity(int(tid), cores)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (unit tests)
        return "local"


class _Stage(HandoffProbe):
    role = ""
    roles: tuple[str, ...] = ()  # the engine roles whose weights this stage loads
    options_model: type[StageOptions] = StageOptions

    def __init__(self, model: str | ModelSpec | None, store: Any, options: dict[str, Any],
                 compute: Any = None, reporter: Reporter | None = None, metrics: StageMetrics | None = None) -> None:
        self.options = self.options_model.model_validate(options)
        install_job_filter()
        pin_process(self.options.cpu_affinity)
        if self.options.torch_threads:
            import torch

            torch.set_num_threads(self.options.torch_threads)
        # Held around every model computation: a no-op alone, shared by the roles of a Colocated replica.
        self.compute = compute if compute is not None else contextlib.nullcontext()
        self.engine = SREngine.load(resolve_spec(model), roles=self.roles)
        self.store = store
        self.reporter = reporter or Reporter(store, self.options.progress_interval_s)
        self.replica = _replica_id()
        # A Colocated replica passes one "colocated" StageMetrics that its roles share.
        self.metrics = metrics or StageMetrics(self.role, self.options.model_name or self.engine.spec.name)
        self._lock = asyncio.Lock()  # encode, decode: one request at a time
        self._queued = self._busy = 0  # encode, decode: waiting for `_lock`, holding it
        start_gpu_sampler(self.options.pool or "none")  # once per process and pool; a daemon thread

    def _begin(self, msg: StageMessage) -> StageMessage:
        """The stage's start event joins those riding with the job (no store call here)."""
        start = stage_event("start", msg.job_id, msg.attempt, self.role, replica=self.replica)
        log_transition(msg.job_id, msg.attempt, self.role, self.replica, 0.0, "started",
                       prompt=msg.request.prompt, log_prompts=self.options.log_prompts)
        return replace(msg, reports=(*msg.reports, start))

    def _end(self, msg: StageMessage, info: dict[str, Any]) -> StageMessage:
        if msg.transfer is not None:
            info = {**info, "handoff": msg.transfer}
            ended = [e["stage"] for e in msg.reports if e["kind"] == "end"]
            self.metrics.observe_handoff(ended[-1] if ended else "other", msg.transfer, self.role)
        self._left(msg, "ok", **{k: v for k, v in info.items() if k in ("switch_step", "step", "num_steps")})
        end = stage_event("end", msg.job_id, msg.attempt, self.role, info=info)
        return replace(msg, reports=(*msg.reports, end), transfer=None)

    def _left(self, msg: StageMessage, outcome: str, **fields: Any) -> None:
        """The request leaves the stage: its latency (from its start event) and its transition line."""
        began = next((e["at"] for e in reversed(msg.reports) if e["kind"] == "start" and e["stage"] == self.role),
                     None)
        seconds = time.time() - began if began is not None else 0.0
        if self.metrics.stage == self.role:  # a Colocated replica times the whole request instead
            self.metrics.observe_stage(seconds, outcome)
        log_transition(msg.job_id, msg.attempt, self.role, self.replica, seconds, outcome, **fields)

    @contextlib.contextmanager
    def _scope(self, msg: StageMessage) -> Any:
        """The stage's work for one job (after `_begin`): lines logged inside carry the job id; a request that
        leaves by an exception is measured and logged as cancelled or failed."""
        with job_context(msg.job_id, msg.attempt):
            try:
                yield
            except BaseException as err:
                cancelled = isinstance(err, (JobCancelled, Cancelled, asyncio.CancelledError))
                self._left(msg, "cancelled" if cancelled else "failed", **({} if cancelled else
                                                                           {"error": describe(err)}))
                raise

    @contextlib.asynccontextmanager
    async def _turn(self) -> Any:
        """Hold the stage's lock (encode, decode: one request at a time), the load gauges following."""
        self._queued += 1
        self._publish_load()
        entered = False
        try:
            async with self._lock:
                self._queued, self._busy, entered = self._queued - 1, self._busy + 1, True
                self._publish_load()
                try:
                    yield
                finally:
                    self._busy -= 1
        finally:
            if not entered:
                self._queued -= 1
            self._publish_load()

    def _publish_load(self) -> None:
        self.metrics.set_load(self._busy, self._queued, part=self.role)


class Encode(_Stage):
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
            async with self._turn():
                state, key = await asyncio.to_thread(self._encode, msg.request)
            msg = self._end(msg, {})
            if not self._by_reference:
                return replace(msg, state=state)
            return replace(msg, state=state.replace(embeddings=None), embeddings=self._put(key, state.embeddings))

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
        with self.compute:
            began = time.perf_counter()
            state = self.engine.prepare(resolved, embeddings)
            self.metrics.observe_step(seconds + time.perf_counter() - began, 1, "encode")
        return state, key


class _Denoise(_Stage):
    """Runs a `DenoiseBatch` in one worker thread: admit at step boundaries, step, retire finished requests."""

    def __init__(self, model: str | ModelSpec | None, store: Any, options: dict[str, Any],
                 compute: Any = None, reporter: Reporter | None = None, metrics: StageMetrics | None = None) -> None:
        super().__init__(model, store, options, compute, reporter, metrics)
        self._batch = DenoiseBatch(self.engine.family, self.role, max_batch_size=self.options.max_batch_size)
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._closed = threading.Event()
        self._keys = itertools.count()
        threading.Thread(target=self._loop, name=f"{self.role}-batch", daemon=True).start()

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
            msg = self._end(msg, {"switch_step": state.switch_step, "step": state.step_index,
                                  "num_steps": state.num_steps, "first_step_at": watch.first_step_at})
        self.reporter.add(msg.reports[-1])  # the record shows the stage ended before Decode's result lands
        if msg.embeddings is None:  # in memory (Colocated): nothing crosses a process
            return replace(msg, state=state, transfer=None)
        if state.done:  # the next stage is Decode: latents and the family's state only
            return replace(msg, state=state.for_decode(), embeddings=None)
        return replace(msg, state=state.replace(embeddings=None), transfer=None)

    async def _denoise(self, msg: StageMessage, watch: Watch) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put((f"{msg.job_id}#{msg.attempt}#{next(self._keys)}", msg.state, watch, loop, future))
        self._publish_load()
        try:
            return await future
        except asyncio.CancelledError:  # the driver gave up on this call: stop at the next step boundary
            watch.stop.set()
            raise
        except Cancelled as err:
            raise JobCancelled(f"job {msg.job_id} cancelled in {self.role}: {err}") from None

    def load(self) -> int:
        """Requests in this replica now (denoising or waiting to join the batch)."""
        return len(self._batch) + self._inbox.qsize()

    def _publish_load(self) -> None:
        self.metrics.set_load(len(self._batch), self._inbox.qsize(), part=self.role)

    def _loop(self) -> None:
        while not self._closed.is_set():
            try:
                self._admit()
                self._publish_load()
                if self._batch:
                    with self.compute, self.metrics.step(len(self._batch), self.role):
                        finished = self._batch.step()
                    for key, result in finished.items():
                        self._resolve(key, result)
                    self._publish_load()
            except Exception as err:  # never leave a caller waiting: fail what is in flight, keep serving
                logger.exception("%s batch loop failed", self.role)
                for key in list(self._batch.active):
                    self._batch.discard(key)  # frees its step-cache state too
                    self._resolve(key, err)

    def _admit(self) -> None:
        """Move waiting requests into the batch; when idle, wait for one, then linger for companions."""
        deadline = time.monotonic()
        if not self._batch:
            try:
                self._add(*self._inbox.get(timeout=0.5))
            except queue.Empty:
                return
            deadline += self.options.batch_wait_timeout_s
        while len(self._batch) < self.options.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                item = self._inbox.get(timeout=remaining) if remaining > 0 else self._inbox.get_nowait()
            except queue.Empty:
                return
            self._add(*item)

    def _add(self, key: str, state: Any, watch: Watch, loop: asyncio.AbstractEventLoop,
             future: asyncio.Future) -> None:
        self._waiting[key] = (loop, future)
        try:
            with self.compute:
                self._batch.add(key, state, on_step=watch.on_step, should_cancel=watch.should_cancel)
        except Exception as err:
            self._resolve(key, err)

    def _resolve(self, key: str, result: Any) -> None:
        loop, future = self._waiting.pop(key, (None, None))
        if future is not None:
            loop.call_soon_threadsafe(_settle, future, result)

    def __del__(self) -> None:
        self._closed.set()


async def _attach_embeddings(msg: StageMessage) -> StageMessage:
    """The state with its prompt embeddings, fetched from the object store when they came by reference."""
    if msg.embeddings is None:
        return msg
    began = time.perf_counter()
    embeddings = await msg.embeddings
    transfer = dict(msg.transfer or {})
    transfer["embeddings_bytes"] = float(sum(t.numel() * t.element_size() for t in
                                             (embeddings.prompt_embeds, embeddings.negative_prompt_embeds)
                                             if t is not None))
    transfer["embeddings_s"] = time.perf_counter() - began
    return replace(msg, state=msg.state.replace(embeddings=embeddings), transfer=transfer)


def _settle(future: asyncio.Future, result: Any) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class Sketch(_Denoise):
    """The large model: steps [0, k), k from the request's switch policy."""

    role, roles = "sketch", ("sketch",)


class Render(_Denoise):
    """The small model: steps [k, N)."""

    role, roles = "render", ("render",)


class Decode(_Stage):
    """VAE decode, mp4 encode, artifacts; returns only small metadata to the driver."""

    role, roles = "decode", ("decode",)

    def __init__(self, model: str | ModelSpec | None, store: Any, options: dict[str, Any],
                 artifacts_url: str, compute: Any = None, reporter: Reporter | None = None,
                 metrics: StageMetrics | None = None) -> None:
        super().__init__(model, store, options, compute, reporter, metrics)
        self.artifacts = ArtifactStore(artifacts_url)

    async def __call__(self, msg: StageMessage) -> dict[str, Any]:
        """Small metadata for the driver, with every stage event of the job for `store.complete`."""
        msg = self._begin(msg)
        with self._scope(msg):
            async with self._turn():
                frames = await asyncio.to_thread(self._decode, msg.state)
            stored = await asyncio.to_thread(self.artifacts.write_outputs, msg.job_id, frames, msg.fps,
                                             msg.save_frames)
            info = {"switch_step": msg.state.switch_step, "num_frames": int(frames.shape[0]), "artifacts": stored}
            return {**info, "reports": list(self._end(msg, info).reports)}

    def _decode(self, state: Any) -> Any:
        with self.compute, self.metrics.step(1, "decode"):
            return self.engine.decode(state)
