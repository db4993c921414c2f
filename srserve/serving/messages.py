"""What travels between stages: a `StageMessage` (job id, attempt, request, handoff state), by object reference.

The handoff state is serialised once per hop: its tensors leave as raw buffers (protocol-5 `PickleBuffer`s that
Ray's own pickler keeps out of band, so they are copied into the object store once and never pickled twice), the
rest as a small pickle. The prompt embeddings, which both denoising stages read and nobody changes, travel
separately: Encode puts them into the object store once and the message carries the reference (`embeddings`);
the state crosses with `embeddings=None` and the receiving stage re-attaches them.

Both sides are timed: the receiving stage finds in `msg.transfer` the bytes moved, the sender's serialisation
seconds, its own deserialisation seconds, and the transit between the two (object-store transfer, plus any wait
for a free replica of the receiving stage). `HandoffProbe` counts deserialised messages per process, so a test
can prove the ingress never loads a handoff state.
"""
from __future__ import annotations

import io
import pickle
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from srserve.config import GenerationRequest

WIRE_VERSION = 1


class JobCancelled(RuntimeError):
    """The job was deleted or superseded; the stage stopped at a step boundary."""


class HandoffProbe:
    """Mixin for deployments, for tests and operators: how many StageMessages this process deserialised, and
    whether it imported a module (the ingress must load neither a handoff state nor torch)."""

    loads = 0

    def handoff_loads(self) -> int:
        return HandoffProbe.loads

    def has_imported(self, module: str) -> bool:
        return module in sys.modules


@dataclass(frozen=True)
class StageMessage:
    job_id: str
    attempt: int
    request: GenerationRequest
    fps: int
    save_frames: bool
    state: Any = None  # srserve.pipeline.handoff.HandoffState once encoded (embeddings detached on the wire)
    embeddings: Any = None  # ObjectRef of the PromptEmbeddings, when they travel by reference
    transfer: dict[str, float] | None = None  # how `state` reached this process (None: it did not cross one)
    # Stage events (start, end) riding with the job to Decode, whose result takes them to the job record: the
    # record is whole at completion without a store call per stage transition.
    reports: tuple[dict[str, Any], ...] = ()
    # Scheduling class of the key that created the job ("interactive" before "batch" in the denoising stages).
    priority: str = "interactive"
    # A retried job resumes after the stage whose handed-on state was checkpointed (the artifact store's
    # `checkpoints/<stage>.bin`): Encode, first of every chain, loads that state instead of making step 0.
    resume_from: str | None = None

    def __reduce__(self):
        fields = (self.job_id, self.attempt, self.request, self.fps, self.save_frames, self.embeddings,
                  self.reports, self.priority, self.resume_from)
        if self.state is None:
            return _load_message, (*fields, None, None)
        began = time.perf_counter()
        header, buffers = dump_state(self.state)
        sent = {"bytes": len(header) + sum(b.raw().nbytes for b in buffers),
                "serialize_s": time.perf_counter() - began, "sent_at": time.time()}
        return _load_message, (*fields, (header, *buffers), sent)


def dump_state(state: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """(pickle of the state without tensor data, the tensors' raw buffers), one copy of nothing."""
    out, buffers = io.BytesIO(), []
    _TensorPickler(out, buffers).dump((WIRE_VERSION, state))
    return out.getvalue(), buffers


def load_state(header: bytes, buffers: list[Any]) -> Any:
    """The state `dump_state` wrote. Its tensors own their memory (object-store buffers are read-only); a
    simulated state's numpy arrays, which nothing writes, stay views of the buffers (no copy)."""
    version, state = pickle.loads(header, buffers=buffers)
    expected = _state_version(state)
    if version != WIRE_VERSION or expected is None:
        raise TypeError(f"not a srserve handoff message (wire version {version}, {type(state).__name__})")
    if state.version != expected:
        raise ValueError(f"handoff version {state.version} is not supported (expected {expected})")
    return state


def _state_version(state: Any) -> int | None:
    """The layout version this code reads for the state's class; None for a class that is no handoff state.
    Checked by module first, so a simulated state never imports torch (handoff.py does)."""
    module = type(state).__module__
    if module == "srserve.sim.engine":
        from srserve.sim.engine import SIM_STATE_VERSION, SimState

        return SIM_STATE_VERSION if isinstance(state, SimState) else None
    if module == "srserve.pipeline.handoff":
        from srserve.pipeline.handoff import HANDOFF_VERSION, HandoffState

        return HANDOFF_VERSION if isinstance(state, HandoffState) else None
    return None


class _TensorPickler(pickle.Pickler):
    def __init__(self, out: io.BytesIO, buffers: list[pickle.PickleBuffer]) -> None:
        super().__init__(out, protocol=5, buffer_callback=buffers.append)

    def reducer_override(self, obj: Any) -> Any:
        torch = sys.modules.get("torch")  # not imported: no tensor to meet (a simulated state's are numpy arrays)
        if torch is None or not isinstance(obj, torch.Tensor):
            return NotImplemented  # numpy arrays leave as out-of-band buffers on their own (protocol 5)
        if obj.device.type != "cpu":
            raise ValueError("handoff tensors must be on the CPU (a receiver may have another GPU, or none)")
        flat = obj.detach().contiguous().reshape(-1)
        raw = flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, np.uint8)
        return _tensor, (pickle.PickleBuffer(raw), str(obj.dtype).removeprefix("torch."), tuple(obj.shape))


def _tensor(data: Any, dtype: str, shape: tuple[int, ...]) -> Any:
    import torch

    array = np.frombuffer(data, dtype=np.uint8).copy()  # own the memory: the buffer may be the object store's
    if not array.size:
        return torch.empty(shape, dtype=getattr(torch, dtype))
    return torch.from_numpy(array).view(getattr(torch, dtype)).reshape(shape)


def _load_message(job_id: str, attempt: int, request: GenerationRequest, fps: int, save_frames: bool,
                  embeddings: Any, reports: tuple, priority: str, resume_from: str | None, wire: tuple | None,
                  sent: dict[str, float] | None) -> StageMessage:
    HandoffProbe.loads += 1
    state = transfer = None
    if wire is not None:
        arrived, began = time.time(), time.perf_counter()
        state = load_state(wire[0], list(wire[1:]))
        transfer = {"bytes": sent["bytes"], "serialize_s": sent["serialize_s"],
                    "transit_s": max(0.0, arrived - sent["sent_at"]), "deserialize_s": time.perf_counter() - began}
    return StageMessage(job_id, attempt, request, fps, save_frames, state, embeddings, transfer, reports, priority,
                        resume_from)
