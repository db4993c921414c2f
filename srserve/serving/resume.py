"""Resuming a job after its last finished stage: which stage a new attempt starts at, and the checkpoints' end.

Sketch and Render save the state they hand on (`ArtifactStore.put_checkpoint`, one write per hop of the bytes the
hop serialises anyway) and say so in their end event (the record's `checkpoint`). A later attempt of the job, a
retry after a replica loss or a takeover after a driver loss, runs Encode, which loads the latest checkpoint
(`StageMessage.resume_from`), then the stages after it. Encode's own output is not saved: it is a pure function of
the request (seeded noise), recomputed in a fraction of a denoising stage, as are the prompt embeddings.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from srserve.serving.calls import describe

logger = logging.getLogger("ray.serve")


def resume_chain(chain: list[str], after: str | None) -> list[str]:
    """The stages a job resuming after stage `after` goes through: Encode (it loads the checkpoint and, when a
    denoising stage follows, the prompt embeddings) and the stages after `after`."""
    if after is None or after not in chain[1:]:
        return chain
    return [chain[0], *chain[chain.index(after) + 1:]]


class Checkpoints:
    """The driver's side of a job's checkpoints (the stages write them; files calls run off the event loop)."""

    def __init__(self, artifacts: Any) -> None:
        self.artifacts = artifacts  # an ArtifactStore (the stages' checkpoint_url is the same artifacts URL)

    async def resume_point(self, job_id: str, chain: list[str]) -> str | None:
        """The last stage of `chain` whose handed-on state is saved (None: start at step 0). The artifact store is
        the truth: a stage's end event may not have reached the record yet when the next stage's replica dies."""
        try:
            saved = set(await asyncio.to_thread(self.artifacts.checkpoints, job_id))
        except Exception as err:  # an unreadable store: the job still runs, from the start
            logger.warning("job %s: checkpoints not listed (%s); starting over", job_id, describe(err))
            return None
        return next((name for name in reversed(chain[1:-1]) if name in saved), None)

    async def drop(self, job_id: str) -> None:
        """Remove them: the job ended (a completed one keeps only its video variants)."""
        try:
            await asyncio.to_thread(self.artifacts.delete_checkpoints, job_id)
        except Exception as err:  # the expiry sweep removes the job's folder later
            logger.warning("job %s: checkpoints not removed: %s", job_id, describe(err))
