"""A job's record (what the JobStore keeps per job, and what `GET /v1/jobs/{id}` returns) and how stage events
change it: pure functions of the record, no I/O."""
from __future__ import annotations

import re
import time
from typing import Any, Iterable, Literal

from pydantic import BaseModel, Field

Status = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
TERMINAL = ("completed", "failed", "cancelled")


class StageRecord(BaseModel):
    start: float
    end: float | None = None
    replica: str
    attempt: int
    handoff: dict[str, float] | None = None  # bytes, serialize_s, transit_s, deserialize_s of the state received


class JobRecord(BaseModel):
    id: str
    created_at: float
    updated_at: float = 0.0
    status: Status = "queued"
    model: str
    request: dict[str, Any]  # srserve.api.protocol.ResolvedRequest, dumped
    progress: int = 0
    stage: str | None = None  # the stage running now (None between stages)
    stage_started_at: float | None = None
    stage_replica: str | None = None
    step: int = 0
    num_steps: int = 0
    attempt: int = 0  # pipeline submissions so far
    failures: int = 0  # retriable failures so far (replica died, stage stalled, driver lost)
    owner: str | None = None  # the driver (ingress replica) holding the lease (not the tenant)
    tenant: str = "anonymous"  # the API key's name that created the job: only it (and admins) see the job
    cost: float = 0.0  # estimated seconds of stage work, all stages (srserve.serving.admission)
    estimate: dict[str, float] = Field(default_factory=dict)  # the same per stage, and the expected switch fraction
    expires_at: float | None = None  # the record and its videos are removed after this
    lease_until: float = 0.0
    heartbeat_at: float | None = None
    cancel_requested: bool = False
    deleted: bool = False
    stages: dict[str, StageRecord] = Field(default_factory=dict)
    switch_step: int | None = None  # the switch the job got: sketch steps actually run (the sketch stage's end)
    # The SLO controller's part (AppArgs.slo; None without it): the cap in force at create, in this job's steps,
    # the switch policy it asked for (or the model's default) and the one it runs (srserve.control.slo.CapResult).
    switch_cap: int | None = None
    switch_requested: str | None = None
    switch_applied: str | None = None
    checkpoint: str | None = None  # the last stage whose handed-on state was saved (a retry resumes after it)
    error: dict[str, str] | None = None  # {code, message}: a reason code and a short message (see `reason`)
    history: list[str] = Field(default_factory=list)  # reasons of earlier failed attempts
    artifacts: dict[str, str] = Field(default_factory=dict)
    completed_at: float | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


# --- what owners see: reason codes, short messages, no paths ----------------------------------------------------
REASONS = (  # (code, pattern in the failure's text): the first match names it; full texts go to the server log
    ("out_of_memory", re.compile(r"out of memory|OutOfMemory|\bOOM\b", re.I)),
    ("stage_stalled", re.compile(r"sent no heartbeat|StageStalled")),
    ("driver_lost", re.compile(r"driver \S+ was lost")),
    ("replica_lost", re.compile(r"RayActorError|ActorDiedError|ActorUnavailable|ObjectLost|OwnerDied|"
                                r"DeploymentUnavailable|died", re.I)),
    ("timeout", re.compile(r"ran longer than|timed? ?out", re.I)),
)
MAX_MESSAGE = 200
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:/[\w.@+-]+){2,}/?")
_ADDRESS = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b")
_LONG_HEX = re.compile(r"\b[0-9a-f]{24,}\b")


def short_message(text: str) -> str:
    """The first line, without file paths, addresses or long ids, at most MAX_MESSAGE characters."""
    lines = str(text).strip().splitlines()
    line = lines[0] if lines else ""
    line = _ADDRESS.sub("<address>", _PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], line))
    line = _LONG_HEX.sub(lambda m: m.group(0)[:8], line)
    return line if len(line) <= MAX_MESSAGE else line[:MAX_MESSAGE - 3] + "..."


def reason(code: str, text: str) -> dict[str, str]:
    """`{code, message}` for a failure: a generic code is refined from the text (out_of_memory, replica_lost...)."""
    if code in ("generation_failed", "failed"):
        code = next((c for c, pattern in REASONS if pattern.search(str(text))), code)
    return {"code": code, "message": short_message(text)}


def public_record(job: dict[str, Any]) -> dict[str, Any]:
    """The record as `GET /v1/jobs/{id}` shows it: artifacts by name, errors as {code, message}, no lease data."""
    out = {k: v for k, v in job.items() if k not in ("owner", "lease_until", "estimate")}
    out["artifacts"] = sorted(job.get("artifacts") or {})
    if job.get("error"):
        out["error"] = {"code": job["error"].get("code", "failed"),
                        "message": short_message(job["error"].get("message", ""))}
    out["history"] = [short_message(h) for h in job.get("history") or ()]
    return out


def erase_prompt(request: dict[str, Any]) -> dict[str, Any]:
    """A deleted job's request without its prompts (user data is not kept past DELETE)."""
    generation = {**request.get("generation", {}), "prompt": "", "negative_prompt": ""}
    return {**request, "generation": generation}


def stage_progress(stage: str, step: int, num_steps: int, done: bool) -> int:
    """encode 0-5, denoising 5-95 in proportion to steps, decode 95-100 (100 only once completed)."""
    if stage == "encode":
        return 5 if done else 0
    if stage == "decode":
        return 95
    return 5 + (90 * step) // max(num_steps, 1)


def apply_events(job: JobRecord, attempt: int, events: Iterable[dict[str, Any]]) -> bool:
    """Stage events of `attempt` (the job's current one) into the record, in any order and more than once
    (they arrive from several replicas, and ends also ride with the job); True when its stages must stop."""
    for event in events:
        kind, stage, at = event["kind"], event["stage"], event["at"]
        if kind == "start":
            started(job, attempt, stage, event["replica"], at)
        elif kind == "end":
            finished(job, attempt, stage, event.get("info") or {}, at)
        elif kind == "progress" and not job.terminal and job.stage == stage:
            job.heartbeat_at, job.step, job.num_steps = time.time(), event["step"], event["num_steps"]
            job.progress = max(job.progress, stage_progress(stage, job.step, job.num_steps, False))
    return job.terminal or job.cancel_requested

def started(job: JobRecord, attempt: int, stage: str, replica: str, at: float) -> None:
    record = job.stages.get(stage)
    if record is None or record.attempt != attempt:
        job.stages[stage] = StageRecord(start=at, replica=replica, attempt=attempt)
    if job.terminal or (job.stage_started_at is not None and at < job.stage_started_at):
        return  # a later stage has started already
    job.status, job.stage, job.heartbeat_at = "in_progress", stage, time.time()
    job.stage_started_at, job.stage_replica = at, replica
    job.progress = max(job.progress, stage_progress(stage, 0, 1, False))

def finished(job: JobRecord, attempt: int, stage: str, info: dict[str, Any], at: float) -> None:
    record = job.stages.get(stage)
    if record is not None and record.attempt == attempt and record.end is None:
        record.end = at
        record.handoff = info.get("handoff")
    if info.get("switch_step") is not None:
        job.switch_step = int(info["switch_step"])
    if info.get("checkpoint"):
        job.checkpoint = str(info["checkpoint"])
    if info.get("num_steps"):
        job.num_steps = int(info["num_steps"])
    if job.terminal:
        return
    if job.stage == stage:
        job.stage, job.stage_started_at, job.stage_replica, job.heartbeat_at = None, None, None, time.time()
    job.step = int(info.get("step", job.step))  # progress reports are throttled: the last may be missing
    job.progress = max(job.progress, stage_progress(stage, job.step, job.num_steps, True))
