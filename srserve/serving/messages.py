"""What travels between stages: a `StageMessage` (job id, attempt, request, handoff state), by object reference.

The handoff state crosses processes in its checked wire form (`HandoffState.to_bytes`), timed on both sides:
the receiving stage finds in `msg.handoff` the bytes moved, the sender's serialisation seconds, its own
deserialisation seconds, and the transit between the two (object-store transfer, plus any wait for a free replica
of the receiving stage). Deserialising a message is counted per process, so a test can prove the ingress never
loads a handoff state.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from srserve.config import GenerationRequest

_LOADS = [0]  # StageMessages deserialised in this process: the ingress must stay at zero


class JobCancelled(RuntimeError):
    """The job was deleted or superseded; the stage stopped at a step boundary."""


@dataclass(frozen=True)
class StageMessage:
    job_id: str
    attempt: int
    request: GenerationRequest
    fps: int
    save_frames: bool
    state: Any = None  # srserve.pipeline.handoff.HandoffState once encoded
    handoff: dict[str, float] | None = None  # how `state` reached this process (None: it did not cross one)

    def __reduce__(self):
        fields = (self.job_id, self.attempt, self.request, self.fps, self.save_frames)
        if self.state is None:
            return _load_message, (*fields, None, None)
        began = time.perf_counter()
        data = self.state.to_bytes()
        sent = {"bytes": len(data), "serialize_s": time.perf_counter() - began, "sent_at": time.time()}
        return _load_message, (*fields, data, sent)


def _load_message(job_id: str, attempt: int, request: GenerationRequest, fps: int, save_frames: bool,
                  data: bytes | None, sent: dict[str, float] | None) -> StageMessage:
    _LOADS[0] += 1
    state = handoff = None
    if data is not None:
        from srserve.pipeline.handoff import HandoffState

        arrived, began = time.time(), time.perf_counter()
        state = HandoffState.from_bytes(data)
        handoff = {"bytes": sent["bytes"], "serialize_s": sent["serialize_s"],
                   "transit_s": max(0.0, arrived - sent["sent_at"]), "deserialize_s": time.perf_counter() - began}
    return StageMessage(job_id, attempt, request, fps, save_frames, state, handoff)


def handoff_loads() -> int:
    """How many StageMessages this process has deserialised."""
    return _LOADS[0]
