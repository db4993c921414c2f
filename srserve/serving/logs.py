"""Job-aware logging: one JSON line per stage transition, and the job id on every line a request produces.

Wiring (the lead's):
- `install_job_filter()` once per replica (`__init__`): every record of the "ray.serve" logger (which the
  stages use, and Serve writes to the replica's log file) gets `job_id` / `attempt` attributes, and text lines
  a `[job <id>]` prefix. Serve's JSON log encoding (`logging_config: {encoding: JSON}`) shows the attributes.
- `with job_context(job_id, attempt):` around the work done for one job (a handler, the driver's task for the
  job, a stage call); asyncio tasks started inside inherit it (contextvars).
- `log_transition(job_id, attempt, stage, replica, seconds, outcome)` at each stage start ("started", seconds 0)
  and end ("ok", "cancelled", "failed", "retry"); `prompt=` is written only with `log_prompts=True` (an
  operator's option, off by default: prompts are user data).
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import time
from typing import Any, Iterator

SERVE_LOGGER = "ray.serve"
OUTCOMES = ("started", "ok", "cancelled", "failed", "retry")
_job: contextvars.ContextVar[tuple[str, int | None] | None] = contextvars.ContextVar("srserve_job", default=None)


@contextlib.contextmanager
def job_context(job_id: str, attempt: int | None = None) -> Iterator[None]:
    """Lines logged inside (and in tasks started inside) carry this job's id."""
    token = _job.set((job_id, attempt))
    try:
        yield
    finally:
        _job.reset(token)


def current_job() -> tuple[str, int | None] | None:
    return _job.get()


class JobIdFilter(logging.Filter):
    """Adds `job_id` and `attempt` to each record ("-" / None outside a job); `prefix` also puts `[job <id>]` in
    front of the message, for text formats that print no extra attributes. Never drops a record."""

    def __init__(self, prefix: bool = True) -> None:
        super().__init__("srserve.job")
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        seen = record.__dict__.get("srserve_job")
        if seen is not None or "job_id" in record.__dict__:  # done by an earlier filter, or set by extra=
            # Serve's handlers strip `job_id` (Ray's own job id, to them) between filters: put it back, once.
            if seen is not None and "job_id" not in record.__dict__:
                record.job_id, record.attempt = seen
            return True
        job = _job.get()
        record.job_id, record.attempt = job if job else ("-", None)
        record.srserve_job = (record.job_id, record.attempt)
        # A transition line stays pure JSON (it names its job itself).
        if job and self.prefix and isinstance(record.msg, str) and not record.__dict__.get("srserve_transition"):
            record.msg = f"[job {job[0]}] {record.msg}"
        return True


def install_job_filter(logger: logging.Logger | str = SERVE_LOGGER, prefix: bool = True) -> JobIdFilter:
    """Put a `JobIdFilter` on `logger` and its handlers (handler filters also see child loggers' records);
    idempotent."""
    target = logging.getLogger(logger) if isinstance(logger, str) else logger
    for owner in (target, *target.handlers):
        for existing in owner.filters:
            if isinstance(existing, JobIdFilter):
                break
        else:
            owner.addFilter(JobIdFilter(prefix))
    return next(f for f in target.filters if isinstance(f, JobIdFilter))


def transition_record(job_id: str, attempt: int, stage: str, replica: str, seconds: float, outcome: str,
                      prompt: str | None = None, log_prompts: bool = False, **fields: Any) -> dict[str, Any]:
    """The JSON object of one transition; `fields` adds small extras (switch_step, batch_size, error...)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"transition outcome {outcome!r}: expected one of {', '.join(OUTCOMES)}")
    out: dict[str, Any] = {"event": "stage_transition", "ts": round(time.time(), 6), "job_id": job_id,
                           "attempt": attempt, "stage": stage, "replica": replica,
                           "seconds": round(float(seconds), 6), "outcome": outcome, **fields}
    if log_prompts and prompt is not None:
        out["prompt"] = prompt
    return out


def log_transition(job_id: str, attempt: int, stage: str, replica: str, seconds: float, outcome: str, *,
                   prompt: str | None = None, log_prompts: bool = False, logger: logging.Logger | None = None,
                   **fields: Any) -> dict[str, Any]:
    """Log one stage transition as one JSON line (INFO; WARNING when failed) and return what was logged."""
    out = transition_record(job_id, attempt, stage, replica, seconds, outcome, prompt, log_prompts, **fields)
    level = logging.WARNING if outcome == "failed" else logging.INFO
    target = logger or logging.getLogger(SERVE_LOGGER)
    target.log(level, "%s", json.dumps(out, default=str),
               extra={"srserve_transition": True, "job_id": job_id, "attempt": attempt})
    return out
