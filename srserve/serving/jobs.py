"""Durable job records in SQLite: the single source of truth for every accepted video job.

`SQLiteJobStore` is a plain class (unit-tested without Ray) that `build_app` deploys as a single-replica
deployment. Every mutation is one short locked read-modify-write, so it is safe however Serve schedules calls.
Updates carry the attempt number they belong to: a stage or driver of a superseded attempt is told to stop
(fencing), so a retried job never takes results from a zombie.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

Status = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
TERMINAL = ("completed", "failed", "cancelled")
STAGES = ("encode", "sketch", "render", "decode")


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
    step: int = 0
    num_steps: int = 0
    attempt: int = 0  # pipeline submissions so far
    failures: int = 0  # retriable failures so far (replica died, stage stalled, driver lost)
    owner: str | None = None  # the driver (ingress replica) holding the lease
    lease_until: float = 0.0
    heartbeat_at: float | None = None
    cancel_requested: bool = False
    deleted: bool = False
    stages: dict[str, StageRecord] = Field(default_factory=dict)
    switch_step: int | None = None
    error: dict[str, str] | None = None
    history: list[str] = Field(default_factory=list)  # reasons of earlier failed attempts
    artifacts: dict[str, str] = Field(default_factory=dict)
    completed_at: float | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def stage_progress(stage: str, step: int, num_steps: int, done: bool) -> int:
    """encode 0-5, denoising 5-95 in proportion to steps, decode 95-100 (100 only once completed)."""
    if stage == "encode":
        return 5 if done else 0
    if stage == "decode":
        return 95
    return 5 + (90 * step) // max(num_steps, 1)


class SQLiteJobStore:
    def __init__(self, path: str) -> None:
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(Path(path).expanduser()), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                         "id TEXT UNIQUE NOT NULL, status TEXT NOT NULL, deleted INTEGER NOT NULL, "
                         "lease_until REAL NOT NULL, data TEXT NOT NULL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_active ON jobs (status, lease_until)")

    # --- plumbing -----------------------------------------------------------------------------------------
    def _load(self, job_id: str) -> JobRecord | None:
        row = self._db.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobRecord.model_validate_json(row[0]) if row else None

    def _save(self, job: JobRecord) -> None:
        job.updated_at = time.time()
        self._db.execute("UPDATE jobs SET status = ?, deleted = ?, lease_until = ?, data = ? WHERE id = ?",
                         (job.status, int(job.deleted), job.lease_until, job.model_dump_json(), job.id))

    def _live(self, job_id: str, attempt: int) -> JobRecord | None:
        """The job if `attempt` is still its current, running attempt; None tells the caller to stop."""
        job = self._load(job_id)
        if job is None or job.terminal or job.cancel_requested or job.attempt != attempt:
            return None
        return job

    # --- reads --------------------------------------------------------------------------------------------
    def ping(self) -> bool:
        return True

    def get(self, job_id: str, include_deleted: bool = False) -> dict[str, Any] | None:
        with self._lock:
            job = self._load(job_id)
        return None if job is None or (job.deleted and not include_deleted) else job.model_dump()

    def list(self, after: str | None = None, limit: int = 20, order: str = "desc") -> tuple[list[dict], bool]:
        op, direction = ("<", "DESC") if order == "desc" else (">", "ASC")
        with self._lock:
            where, params = "deleted = 0", []
            if after is not None:
                row = self._db.execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone()
                if row is not None:
                    where, params = f"deleted = 0 AND seq {op} ?", [row[0]]
            rows = self._db.execute(f"SELECT data FROM jobs WHERE {where} ORDER BY seq {direction} LIMIT ?",
                                    (*params, limit + 1)).fetchall()
        jobs = [JobRecord.model_validate_json(r[0]).model_dump() for r in rows[:limit]]
        return jobs, len(rows) > limit

    def count_active(self) -> int:
        with self._lock:
            return self._count_active()

    def _count_active(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'in_progress')").fetchone()[0]

    # --- the driver's side --------------------------------------------------------------------------------
    def create(self, job: dict[str, Any], max_active: int | None = None) -> dict[str, Any] | None:
        """Insert a new job; None when `max_active` jobs are already queued or in progress (admission)."""
        record = JobRecord.model_validate(job)
        record.updated_at = time.time()
        with self._lock:
            if max_active is not None and self._count_active() >= max_active:
                return None
            self._db.execute("INSERT INTO jobs (id, status, deleted, lease_until, data) VALUES (?, ?, 0, ?, ?)",
                             (record.id, record.status, record.lease_until, record.model_dump_json()))
        return record.model_dump()

    def begin_attempt(self, job_id: str, owner: str, lease_s: float) -> dict[str, Any] | None:
        """Start the next pipeline submission; None when the job must not run (finished, cancelled)."""
        with self._lock:
            job = self._load(job_id)
            if job is None or job.terminal:
                return None
            if job.cancel_requested:
                job.status = "cancelled"
                self._save(job)
                return None
            job.attempt += 1
            job.owner, job.lease_until = owner, time.time() + lease_s
            job.stage, job.heartbeat_at = None, None
            self._save(job)
            return job.model_dump()

    def renew(self, owner: str, job_ids: list[str], lease_s: float) -> dict[str, dict[str, Any]]:
        """Extend the leases of the jobs `owner` drives; returns what its watchdog needs of each."""
        now, out = time.time(), {}
        with self._lock:
            for job_id in job_ids:
                job = self._load(job_id)
                if job is None:
                    continue
                if job.owner == owner and not job.terminal:
                    job.lease_until = now + lease_s
                    self._save(job)
                out[job_id] = job.model_dump(include={"status", "stage", "heartbeat_at", "created_at", "owner",
                                                      "cancel_requested", "attempt", "stages"})
        return out

    def claim_orphans(self, owner: str, lease_s: float, max_retries: int,
                      exclude: list[str] = ()) -> list[str]:
        """Take over unfinished jobs whose driver's lease ran out (the ingress died or restarted)."""
        now, claimed = time.time(), []
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE status IN ('queued', 'in_progress') "
                                    "AND lease_until < ?", (now,)).fetchall()
            for (job_id,) in rows:
                job = self._load(job_id)
                if job_id in exclude or job is None:
                    continue
                if job.cancel_requested:
                    job.status = "cancelled"
                elif job.status == "in_progress":
                    self._record_failure(job, f"attempt {job.attempt}: driver {job.owner} was lost", max_retries)
                if not job.terminal:
                    job.owner, job.lease_until = owner, now + lease_s
                    claimed.append(job_id)
                self._save(job)
        return claimed

    def retry_or_fail(self, job_id: str, attempt: int, reason: str, max_retries: int) -> str:
        """After a retriable failure: 'retry' while retries remain, else 'failed'; 'stale' or 'cancelled'."""
        with self._lock:
            job = self._load(job_id)
            if job is None or job.attempt != attempt or job.terminal:
                return "stale"
            if job.cancel_requested:
                job.status = "cancelled"
            else:
                self._record_failure(job, f"attempt {attempt}: {reason}", max_retries)
            self._save(job)
            return "retry" if not job.terminal else job.status

    def _record_failure(self, job: JobRecord, reason: str, max_retries: int) -> None:
        job.failures += 1
        job.history.append(reason)
        job.stage = None
        if job.failures > max_retries:
            job.status = "failed"
            job.completed_at = time.time()
            job.error = {"code": "retries_exhausted",
                         "message": f"gave up after {job.failures} failed attempts; last: {reason}"}

    def fail(self, job_id: str, attempt: int, code: str, message: str) -> bool:
        with self._lock:
            job = self._load(job_id)
            if job is None or job.attempt != attempt or job.terminal:
                return False
            job.status, job.error, job.completed_at = "failed", {"code": code, "message": message}, time.time()
            self._save(job)
            return True

    def complete(self, job_id: str, attempt: int, result: dict[str, Any]) -> str:
        """'completed'; 'deleted' when the job was deleted meanwhile (cancelled now); 'stale' for an old attempt."""
        with self._lock:
            job = self._live(job_id, attempt)
            if job is None:
                current = self._load(job_id)
                if current is not None and current.deleted and current.attempt == attempt and not current.terminal:
                    current.status, current.stage, current.completed_at = "cancelled", None, time.time()
                    self._save(current)
                    return "deleted"
                return "stale"
            job.status, job.progress, job.stage, job.completed_at = "completed", 100, None, time.time()
            job.artifacts = dict(result.get("artifacts", {}))
            if result.get("switch_step") is not None:
                job.switch_step = int(result["switch_step"])
            self._save(job)
            return "completed"

    def mark_cancelled(self, job_id: str, reason: str = "cancelled") -> bool:
        """Record a requested cancellation as done; False (no change) when none was requested."""
        with self._lock:
            job = self._load(job_id)
            if job is None or not job.cancel_requested:
                return False
            if not job.terminal:
                job.status, job.stage, job.completed_at = "cancelled", None, time.time()
                job.error = {"code": "cancelled", "message": reason}
                self._save(job)
            return job.status == "cancelled"

    def delete(self, job_id: str) -> dict[str, Any] | None:
        """Hide the job and ask its stages to stop at the next step boundary; the record stays for audit."""
        with self._lock:
            job = self._load(job_id)
            if job is None or job.deleted:
                return None
            before = job.model_dump()
            job.deleted = True
            if not job.terminal:
                job.cancel_requested = True
            self._save(job)
            return before

    # --- the stages' side: each returns True when the caller must stop -----------------------------------
    def stage_started(self, job_id: str, attempt: int, stage: str, replica: str) -> bool:
        now = time.time()
        with self._lock:
            job = self._live(job_id, attempt)
            if job is None:
                return True
            job.status, job.stage, job.heartbeat_at = "in_progress", stage, now
            job.stages[stage] = StageRecord(start=now, replica=replica, attempt=attempt)
            job.progress = max(job.progress, stage_progress(stage, 0, 1, False))
            self._save(job)
            return False

    def heartbeat(self, job_id: str, attempt: int, stage: str, step: int, num_steps: int) -> bool:
        with self._lock:
            job = self._live(job_id, attempt)
            if job is None:
                return True
            job.heartbeat_at, job.step, job.num_steps = time.time(), step, num_steps
            job.progress = max(job.progress, stage_progress(stage, step, num_steps, False))
            self._save(job)
            return False

    def stage_finished(self, job_id: str, attempt: int, stage: str, info: dict[str, Any]) -> bool:
        with self._lock:
            job = self._live(job_id, attempt)
            if job is None:
                return True
            record = job.stages.get(stage)
            if record is not None and record.attempt == attempt:
                record.end = time.time()
                record.handoff = info.get("handoff")
            job.stage, job.heartbeat_at = None, time.time()
            if info.get("switch_step") is not None:
                job.switch_step = int(info["switch_step"])
            job.step = int(info.get("step", job.step))  # heartbeats are throttled: the last may be missing
            job.progress = max(job.progress, stage_progress(stage, job.step, job.num_steps, True))
            self._save(job)
            return False
