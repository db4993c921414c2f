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


class Unavailable(RuntimeError):
    """A deployment gave no answer within the caller's bound (no live replica, or one restarting)."""


class StageStalled(RuntimeError):
    """A running stage stopped sending heartbeats."""


def is_replica_loss(err: BaseException | None) -> bool:
    """True when `err`, or what it wraps, says a replica or an object was lost (retriable)."""
    return caused_by(err, REPLICA_LOST + (StageStalled,))


def caused_by(err: BaseException | None, kind: type[BaseException] | tuple[type[BaseException], ...]) -> bool:
    """Whether `err`, or what it wraps (Ray's task errors carry the remote one as `cause`), is a `kind`."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
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


async def call(handle: Any, method: str, *args: Any, retry_s: float = 60.0, timeout_s: float | None = None,
               **kwargs: Any) -> Any:
    """`await handle.method.remote(...)`, retried with backoff for up to `retry_s` while the replica is away.

    With `timeout_s`, the whole call (retries included) ends by then: a deployment with no live replica makes
    Serve's router wait for one, so without a bound a caller hangs until the replica is back. Then `Unavailable`.
    """
    began = time.monotonic()
    deadline, delay = began + (retry_s if timeout_s is None else min(retry_s, timeout_s)), 0.1
    while True:
        try:
            response = getattr(handle, method).remote(*args, **kwargs)
            if timeout_s is None:
                return await response
            return await _within(response, began + timeout_s - time.monotonic(), method)
        except REPLICA_LOST + (serve_errors.BackPressureError,) as err:
            if time.monotonic() + delay > deadline:
                if timeout_s is not None:
                    raise Unavailable(f"{method}: {describe(err)}") from err
                raise
            logger.warning("call %s failed (%s); retrying in %.1fs", method, describe(err), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def _within(response: Any, seconds: float, method: str) -> Any:
    """The response's result, or `Unavailable` after `seconds`, the request then withdrawn: one still waiting for
    a replica must not run later (a create the client was told failed)."""
    try:
        return await asyncio.wait_for(_result(response), max(seconds, 0.0))
    except asyncio.TimeoutError:
        await asyncio.to_thread(_cancel, response)  # cancel() may wait for the router's thread: not on the loop
        raise Unavailable(f"{method}: no answer within the bound") from None


async def _result(response: Any) -> Any:
    return await response


def _cancel(response: Any) -> None:
    try:
        response.cancel()
    except Exception:  # finished or failed meanwhile: nothing to withdraw
        pass


# An HTTP request waits at most this long for the job store (retries while it restarts included); once the store
# was found away, requests are answered 503 at once while one of them at a time probes it, every `PROBE_EVERY_S`.
REQUEST_TIMEOUT_S = 5.0  # generous for a loaded machine; a healthy store answers in milliseconds
PROBE_EVERY_S = 1.0
_away: dict[Any, float] = {}  # deployment -> monotonic time before which requests do not wait for it


async def call_for_request(handle: Any, method: str, *args: Any, timeout_s: float = REQUEST_TIMEOUT_S,
                           retry_after_s: int = 5, **kwargs: Any) -> Any:
    """`call` on behalf of an HTTP request: bounded, and 503 `store_unavailable` with Retry-After when the store
    does not answer in time (the client retries; nothing hangs until a restarted replica is back)."""
    retry_s = kwargs.pop("retry_s", None)  # a shorter budget of the caller's is kept; never a longer one
    if retry_s is not None:
        timeout_s = min(timeout_s, retry_s)
    name = getattr(handle, "deployment_name", None)
    key = (getattr(handle, "app_name", None), name) if isinstance(name, str) else id(handle)
    now = time.monotonic()
    if key in _away:
        if now < _away[key]:
            raise _store_unavailable(retry_after_s)
        _away[key] = now + timeout_s + PROBE_EVERY_S  # this request probes; the others meanwhile do not wait
    try:
        result = await call(handle, method, *args, timeout_s=timeout_s, **kwargs)
    except Unavailable as err:
        _away[key] = time.monotonic() + PROBE_EVERY_S
        logger.warning("request call %s: the job store is unavailable (%s)", method, err)
        raise _store_unavailable(retry_after_s) from None
    except Exception:
        _away.pop(key, None)  # it answered (with an error): it is there
        raise
    _away.pop(key, None)
    return result


def _store_unavailable(retry_after_s: int) -> Exception:
    from srserve.api.protocol import ApiError

    return ApiError(503, f"the job store is unavailable; retry after {retry_after_s}s", code="store_unavailable",
                    type="server_error", headers={"Retry-After": str(retry_after_s)})
