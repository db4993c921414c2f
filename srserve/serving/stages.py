"""The pipeline's stage deployments: Encode, Sketch, Render, Decode. Thin wrappers over `SREngine`.

A job flows as a `StageMessage` (job id, attempt, the handoff state of CPU tensors) from stage to stage by
object reference; only Decode returns something to the driver, and that is small metadata. Sketch and Render
run a step-level batch: requests join and leave at step boundaries and same-shape ones share forward passes.
Each stage reports start, heartbeats (progress) and end to the JobStore, which answers whether to stop.
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
from srserve.serving.calls import call, describe
from srserve.serving.messages import JobCancelled, StageMessage, handoff_loads

logger = logging.getLogger("ray.serve")


def resolve_spec(model: str | ModelSpec | dict[str, Any] | None) -> ModelSpec:
    """`AppArgs.model` (path, inline ModelSpec fields, or None for the bundled model) as a checked spec."""
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


class _Stage:
    role = ""
    roles: tuple[str, ...] = ()  # the engine roles whose weights this stage loads
    options_model: type[StageOptions] = StageOptions

    def __init__(self, model: str | ModelSpec | None, store: Any, options: dict[str, Any],
                 compute: Any = None) -> None:
        self.options = self.options_model.model_validate(options)
        pin_process(self.options.cpu_affinity)
        if self.options.torch_threads:
            import torch

            torch.set_num_threads(self.options.torch_threads)
        # Held around every model computation: a no-op alone, shared by the roles of a Colocated replica.
        self.compute = compute if compute is not None else contextlib.nullcontext()
        self.engine = SREngine.load(resolve_spec(model), roles=self.roles)
        self.store = store
        self.replica = _replica_id()

    async def _begin(self, msg: StageMessage) -> None:
        if await call(self.store, "stage_started", msg.job_id, msg.attempt, self.role, self.replica):
            raise JobCancelled(f"job {msg.job_id} attempt {msg.attempt} stopped before {self.role}")

    async def _end(self, msg: StageMessage, info: dict[str, Any]) -> None:
        if msg.handoff is not None:
            info = {**info, "handoff": msg.handoff}
        if await call(self.store, "stage_finished", msg.job_id, msg.attempt, self.role, info):
            raise JobCancelled(f"job {msg.job_id} attempt {msg.attempt} stopped after {self.role}")

    def handoff_loads(self) -> int:
        return handoff_loads()


class Encode(_Stage):
    """Text encoder + the step-0 state (seeded noise, scheduler). Prompt embeddings are cached (LRU)."""

    role, roles, options_model = "encode", ("encode",), EncodeOptions

    def __init__(self, model: str | ModelSpec | None, store: Any, options: dict[str, Any],
                 compute: Any = None) -> None:
        super().__init__(model, store, options, compute)
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = asyncio.Lock()

    async def __call__(self, msg: StageMessage) -> StageMessage:
        await self._begin(msg)
        async with self._lock:
            state = await asyncio.to_thread(self._encode, msg.request)
        await self._end(msg, {})
        return replace(msg, state=state)

    def _encode(self, request: GenerationRequest) -> Any:
        resolved = self.engine.resolve(request)
        key = (resolved.prompt, resolved.negative_prompt, resolved.max_sequence_length, resolved.guidance_scale,
               resolved.guidance_scale_2)
        embeddings = self._cache.get(key)
        if embeddings is None:
            with self.compute:
                embeddings = self.engine.encode(resolved)
            if self.options.prompt_cache_size:
                self._cache[key] = embeddings
                while len(self._cache) > self.options.prompt_cache_size:
                    self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        with self.compute:
            return self.engine.prepare(resolved, embeddings)


class _Heartbeat:
    """Per-request progress reports from the denoising thread; the store's answer arms `should_cancel`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, store: Any, msg: StageMessage, role: str) -> None:
        self.loop, self.store, self.msg, self.role = loop, store, msg, role
        self.stop = threading.Event()
        self._pending: Any = None

    def on_step(self, step: int, num_steps: int) -> None:
        # One report in flight at a time (a fast model must not flood the store); the last step always goes.
        if self._pending is not None and not self._pending.done() and step < num_steps:
            return
        self._pending = asyncio.run_coroutine_threadsafe(self._report(step, num_steps), self.loop)

    async def _report(self, step: int, num_steps: int) -> None:
        try:
            if await call(self.store, "heartbeat", self.msg.job_id, self.msg.attempt, self.role, step, num_steps,
                          retry_s=5.0):
                self.stop.set()
        except Exception as err:  # progress is best effort; the watchdog covers a silent stage
            logger.warning("heartbeat for %s failed: %s", self.msg.job_id, describe(err))

    def should_cancel(self) -> bool:
        return self.stop.is_set()


class _Denoise(_Stage):
    """Runs a `DenoiseBatch` in one worker thread: admit at step boundaries, step, retire finished requests."""

    def __init__(self, model: str | ModelSpec | None, store: Any, options: dict[str, Any],
                 compute: Any = None) -> None:
        super().__init__(model, store, options, compute)
        self._batch = DenoiseBatch(self.engine.family, self.role, max_batch_size=self.options.max_batch_size)
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._closed = threading.Event()
        self._keys = itertools.count()
        threading.Thread(target=self._loop, name=f"{self.role}-batch", daemon=True).start()

    async def __call__(self, msg: StageMessage) -> StageMessage:
        await self._begin(msg)
        loop = asyncio.get_running_loop()
        future, beat = loop.create_future(), _Heartbeat(loop, self.store, msg, self.role)
        self._inbox.put((f"{msg.job_id}#{msg.attempt}#{next(self._keys)}", msg.state, beat, loop, future))
        try:
            state = await future
        except asyncio.CancelledError:  # the driver gave up on this call: stop at the next step boundary
            beat.stop.set()
            raise
        except Cancelled as err:
            raise JobCancelled(f"job {msg.job_id} cancelled in {self.role}: {err}") from None
        await self._end(msg, {"switch_step": state.switch_step, "step": state.step_index})
        return replace(msg, state=state)

    def load(self) -> int:
        """Requests in this replica now (denoising or waiting to join the batch)."""
        return len(self._batch) + self._inbox.qsize()

    def _loop(self) -> None:
        while not self._closed.is_set():
            try:
                self._admit()
                if self._batch:
                    with self.compute:
                        finished = self._batch.step()
                    for key, result in finished.items():
                        self._resolve(key, result)
            except Exception as err:  # never leave a caller waiting: fail what is in flight, keep serving
                logger.exception("%s batch loop failed", self.role)
                for key in list(self._batch.active):
                    self._batch.active.pop(key, None)
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

    def _add(self, key: str, state: Any, beat: _Heartbeat, loop: asyncio.AbstractEventLoop,
             future: asyncio.Future) -> None:
        self._waiting[key] = (loop, future)
        try:
            with self.compute:
                self._batch.add(key, state, on_step=beat.on_step, should_cancel=beat.should_cancel)
        except Exception as err:
            self._resolve(key, err)

    def _resolve(self, key: str, result: Any) -> None:
        loop, future = self._waiting.pop(key, (None, None))
        if future is not None:
            loop.call_soon_threadsafe(_settle, future, result)

    def __del__(self) -> None:
        self._closed.set()


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
                 artifacts_url: str, compute: Any = None) -> None:
        super().__init__(model, store, options, compute)
        self.artifacts = ArtifactStore(artifacts_url)
        self._lock = asyncio.Lock()

    async def __call__(self, msg: StageMessage) -> dict[str, Any]:
        await self._begin(msg)
        async with self._lock:
            frames = await asyncio.to_thread(self._decode, msg.state)
        stored = await asyncio.to_thread(self.artifacts.write_outputs, msg.job_id, frames, msg.fps, msg.save_frames)
        info = {"switch_step": msg.state.switch_step, "num_frames": int(frames.shape[0]), "artifacts": stored}
        await self._end(msg, info)
        return info

    def _decode(self, state: Any) -> Any:
        with self.compute:
            return self.engine.decode(state)
