"""Calling other deployments: retries while a replica restarts, and which failures a job may retry."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray import exceptions as ray_errors
from ray.serve import exceptions as serve_errors

logger = logging.getLogger("ray.serve")

# A replica or its objects went away: the work itself was fine and can run again elsewhere.
REPLICA_LOST = (ray_errors.RayActorError, ray_errors.ActorUnavailableError, ray_errors.ObjectLostError,
                ray_errors.OwnerDiedError, serve_errors.DeploymentUnavailableError)


class StageStalled(RuntimeError):
    """A running stage stopped sending heartbeats."""


def is_replica_loss(err: BaseException | None) -> bool:
    """True when `err`, or what it wraps, says a replica or an object was lost (retriable)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, REPLICA_LOST + (StageStalled,)):
            return True
        seen.add(id(err))
        err = getattr(err, "cause", None) or err.__cause__
    return False


def describe(err: BaseException) -> str:
    """One line naming the root cause, without Ray's remote tracebacks."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException) and cause is not err:
        err = cause
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:500]


async def call(handle: Any, method: str, *args: Any, retry_s: float = 60.0, **kwargs: Any) -> Any:
    """`await handle.method.remote(...)`, retried with backoff for up to `retry_s` while the replica is away."""
    deadline, delay = time.monotonic() + retry_s, 0.1
    while True:
        try:
            return await getattr(handle, method).remote(*args, **kwargs)
        except REPLICA_LOST + (serve_errors.BackPressureError,) as err:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("call %s failed (%s); retrying in %.1fs", method, describe(err), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
