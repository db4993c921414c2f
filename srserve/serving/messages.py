"""What travels between stages: a `StageMessage` (job id, attempt, request, handoff state), by object reference.

Deserialising one is counted per process, so a test can prove the ingress never loads a handoff state.
"""
from __future__ import annotations

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

    def __reduce__(self):
        return _load_message, (self.job_id, self.attempt, self.request, self.fps, self.save_frames, self.state)


def _load_message(*fields: Any) -> StageMessage:
    _LOADS[0] += 1
    return StageMessage(*fields)


def handoff_loads() -> int:
    """How many StageMessages this process has deserialised."""
    return _LOADS[0]
