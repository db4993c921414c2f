"""Durable job records in SQLite: the single source of truth for every accepted video job.

`SQLiteJobStore` is a plain class (unit-tested without Ray) that `build_app` deploys as a single-replica
deployment. The record is JSON, written per stage transition (O(stages) per job); the fields that change more
often than that (progress heartbeats, lease renewals, what the watchdog reads) live in their own columns, so
those calls are one small UPDATE, not a load-validate-dump-rewrite of the record. Updates carry the attempt
number they belong to: a stage or driver of a superseded attempt is told to stop (fencing), so a retried job
never takes results from a zombie.

Each record belongs to a tenant (the API key's name); `create` checks the tenant's quotas and the job's deadline
against the jobs in flight under the same lock as the global limit, so concurrent creates cannot overshoot.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from srserve.serving import admission
from srserve.serving.job_record import (  # noqa: F401  (the record's API, re-exported)
    TERMINAL, JobRecord, StageRecord, Status, apply_events, erase_prompt, finished, reason, short_message,
    stage_progress, started)
from srserve.serving.job_table import ACTIVE_SQL, BOOLS, NAMES, SELECT, TERMINAL_SQL, WATCHED, open_table, row_record

logger = logging.getLogger("ray.serve")
T = TypeVar("T")


class Keep:
    """An edit's result that leaves the record unchanged (nothing is written)."""

    def __init__(self, value: Any) -> None:
        self.value = value


def _logged(job_id: str, text: str) -> str:
    """A failure's short message for the record; the full text goes to the server log when it was cut."""
    short = short_message(text)
    if short != text:
        logger.warning("job %s: %s", job_id, text)
    return short


class SQLiteJobStore:
    def __init__(self, path: str) -> None:
        self._lock = threading.RLock()  # reentrant: complete_and_get holds it across complete and get
        self._db = open_table(Path(path).expanduser())

    # --- plumbing -----------------------------------------------------------------------------------------
    def _load(self, job_id: str) -> JobRecord | None:
        row = self._db.execute(f"{SELECT} WHERE id = ?", (job_id,)).fetchone()
        return JobRecord.model_validate(row_record(row)) if row else None

    def _save(self, job: JobRecord) -> None:
        job.updated_at = time.time()
        values = [int(getattr(job, n)) if n in BOOLS else getattr(job, n) for n in NAMES]
        self._db.execute(f"UPDATE jobs SET data = ?, {', '.join(f'{n} = ?' for n in NAMES)} WHERE id = ?",
                         (job.model_dump_json(), *values, job.id))

    def _edit(self, job_id: str, change: Callable[[JobRecord], T], attempt: int | None = None,
              missing: Any = None) -> T:
        """Locked load -> change -> save. With `attempt`, only while it is the job's current, running attempt
        (else `missing`, which tells a stage to stop). `change` returns the result; `Keep(result)` skips the save.
        """
        with self._lock:
            job = self._load(job_id)
            if job is None or (attempt is not None and
                               (job.terminal or job.cancel_requested or job.attempt != attempt)):
                return missing
            result = change(job)
            if isinstance(result, Keep):
                return result.value
            self._save(job)
            return result

    # --- reads --------------------------------------------------------------------------------------------
    def ping(self) -> bool:
        return True

    def get(self, job_id: str, include_deleted: bool = False) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(f"{SELECT} WHERE id = ?", (job_id,)).fetchone()
        job = row_record(row) if row else None
        return None if job is None or (job["deleted"] and not include_deleted) else job

    def list(self, after: str | None = None, limit: int = 20, order: str = "desc",
             tenant: str | None = None) -> tuple[list[dict], bool]:
        """One page of visible jobs; with `tenant`, only its own (an `after` id of another tenant is unknown)."""
        op, direction = ("<", "DESC") if order == "desc" else (">", "ASC")
        mine, params = ("deleted = 0", []) if tenant is None else ("deleted = 0 AND tenant = ?", [tenant])
        with self._lock:
            where = mine
            if after is not None:
                owned = "" if tenant is None else " AND tenant = ?"
                row = self._db.execute(f"SELECT seq FROM jobs WHERE id = ?{owned}", (after, *params)).fetchone()
                if row is not None:
                    where, params = f"{mine} AND seq {op} ?", [*params, row[0]]
            rows = self._db.execute(f"{SELECT} WHERE {where} ORDER BY seq {direction} LIMIT ?",
                                    (*params, limit + 1)).fetchall()
        return [row_record(r) for r in rows[:limit]], len(rows) > limit

    # --- the driver's side --------------------------------------------------------------------------------
    def create(self, job: dict[str, Any], max_active: int | None = None, begin_lease_s: float | None = None,
               quota: dict[str, Any] | None = None, deadline: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Insert a new job; None when `max_active` jobs are already queued or in progress (admission);
        `{"refused": {status, code, message, retry_after_s, param}}` when the tenant's `quota` (max_in_flight,
        max_per_minute, max_cost_in_flight) or the `deadline` ({deadline_s, capacity, colocated, param}) refuses it.

        With `begin_lease_s` the job's first attempt begins at once (as `begin_attempt` would, in the same call).
        """
        record = JobRecord.model_validate(job)
        record.updated_at = time.time()
        if begin_lease_s is not None:
            record.attempt, record.lease_until = 1, record.updated_at + begin_lease_s
        values = [int(getattr(record, n)) if n in BOOLS else getattr(record, n) for n in NAMES]
        projected: dict[str, float] = {}
        with self._lock:
            if max_active is not None and \
                    self._db.execute(f"SELECT COUNT(*) FROM jobs WHERE {ACTIVE_SQL}").fetchone()[0] >= max_active:
                return None
            refusal = self._admit(record, quota, deadline, projected) if quota or deadline else None
            if refusal is not None:
                return {"refused": refusal.as_dict(), **projected}
            self._db.execute(f"INSERT INTO jobs (id, data, {', '.join(NAMES)}) VALUES (?, ?{', ?' * len(NAMES)})",
                             (record.id, record.model_dump_json(), *values))
        return {**record.model_dump(), **projected}

    def _admit(self, job: JobRecord, quota: dict[str, Any] | None, deadline: dict[str, Any] | None,
               projected: dict[str, float]) -> admission.Refusal | None:
        """The tenant's quotas, then the deadline under the current queue (under the lock). With a deadline,
        `projected["projected_s"]` gets the job's projected completion seconds (the caller's SLO controller reads
        it from create's answer; it is not part of the record)."""
        active = [(tenant, cost, progress, json.loads(estimate or "{}")) for tenant, cost, progress, estimate in
                  self._db.execute(f"SELECT tenant, cost, progress, json_extract(data, '$.estimate') FROM jobs "
                                   f"WHERE {ACTIVE_SQL}")]
        now = time.time()
        recent = [r[0] for r in self._db.execute(
            "SELECT created_at FROM jobs WHERE tenant = ? AND created_at > ? ORDER BY created_at",
            (job.tenant, now - admission.WINDOW_S))] if quota else []
        if deadline:
            projected["projected_s"] = admission.projected_completion(
                job.estimate, active, deadline["capacity"], bool(deadline.get("colocated")))
        return admission.admit(job.tenant, job.cost, job.estimate, active, recent, quota, deadline, now)

    def begin_attempt(self, job_id: str, owner: str, lease_s: float) -> dict[str, Any] | None:
        """Start the next pipeline submission; None when the job must not run (finished, cancelled)."""
        def begin(job: JobRecord) -> Any:
            if job.terminal:
                return Keep(None)
            if job.cancel_requested:
                job.status = "cancelled"
                return None
            job.attempt += 1
            job.owner, job.lease_until = owner, time.time() + lease_s
            job.stage, job.stage_started_at, job.stage_replica, job.heartbeat_at = None, None, None, None
            return job.model_dump()

        return self._edit(job_id, begin)

    def renew(self, owner: str, job_ids: list[str], lease_s: float) -> dict[str, dict[str, Any]]:
        """Extend the leases of the jobs `owner` drives; returns what its watchdog reads of each (columns only)."""
        if not job_ids:
            return {}
        marks = ", ".join("?" * len(job_ids))
        with self._lock:
            self._db.execute(f"UPDATE jobs SET lease_until = ? WHERE owner = ? AND {ACTIVE_SQL} AND id IN ({marks})",
                             (time.time() + lease_s, owner, *job_ids))
            rows = self._db.execute(f"SELECT {', '.join(WATCHED)} FROM jobs WHERE id IN ({marks})",
                                    job_ids).fetchall()
        out = {}
        for row in rows:
            job = dict(zip(WATCHED, row))
            for name in BOOLS:
                job[name] = bool(job[name])
            out[job["id"]] = job
        return out

    def watch(self, owner: str, job_ids: list[str], lease_s: float, max_retries: int) -> dict[str, Any]:
        """A driver's watchdog round in one call: `renew` its jobs, then `claim_orphans`."""
        return {"jobs": self.renew(owner, job_ids, lease_s),
                "claimed": self.claim_orphans(owner, lease_s, max_retries, job_ids)}

    def claim_orphans(self, owner: str, lease_s: float, max_retries: int,
                      exclude: list[str] = ()) -> list[str]:
        """Take over unfinished jobs whose driver's lease ran out (the ingress died or restarted)."""
        now = time.time()
        with self._lock:
            rows = self._db.execute(f"SELECT id FROM jobs WHERE {ACTIVE_SQL} AND lease_until < ?", (now,)).fetchall()
        claimed = []
        for (job_id,) in rows:
            if job_id in exclude:
                continue

            def claim(job: JobRecord) -> Any:
                if job.terminal or job.lease_until >= now:  # finished or claimed by another meanwhile
                    return Keep(False)
                if job.cancel_requested:
                    job.status = "cancelled"
                elif job.status == "in_progress":
                    self._record_failure(job, f"attempt {job.attempt}: driver {job.owner} was lost", max_retries)
                if not job.terminal:
                    job.owner, job.lease_until = owner, now + lease_s
                return not job.terminal

            if self._edit(job_id, claim, missing=False):
                claimed.append(job_id)
        return claimed

    def retry_or_fail(self, job_id: str, attempt: int, reason: str, max_retries: int) -> str:
        """After a retriable failure: 'retry' while retries remain, else 'failed'; 'stale' or 'cancelled'."""
        def decide(job: JobRecord) -> Any:
            if job.attempt != attempt or job.terminal:
                return Keep("stale")
            if job.cancel_requested:
                job.status = "cancelled"
            else:
                self._record_failure(job, f"attempt {attempt}: {reason}", max_retries)
            return "retry" if not job.terminal else job.status

        return self._edit(job_id, decide, missing="stale")

    def _record_failure(self, job: JobRecord, text: str, max_retries: int) -> None:
        job.failures += 1
        short = _logged(job.id, text)
        job.history.append(short)
        job.stage = None
        if job.failures > max_retries:
            job.status = "failed"
            job.completed_at = time.time()
            job.error = {"code": "retries_exhausted",
                         "message": f"gave up after {job.failures} failed attempts; last: {short}"[:200]}

    def fail(self, job_id: str, attempt: int, code: str, message: str) -> bool:
        def fail(job: JobRecord) -> Any:
            if job.attempt != attempt or job.terminal:
                return Keep(False)
            job.status, job.error, job.completed_at = "failed", reason(code, message), time.time()
            _logged(job_id, message)
            job.stage = None
            return True

        return self._edit(job_id, fail, missing=False)

    def complete(self, job_id: str, attempt: int, result: dict[str, Any]) -> str:
        """'completed'; 'deleted' when the job was deleted meanwhile (cancelled now); 'stale' for an old attempt.

        `result["reports"]`: stage events that rode with the job to Decode (applied first, so the record is whole).
        """
        def complete(job: JobRecord) -> Any:
            if job.attempt != attempt or job.terminal:
                return Keep("stale")
            apply_events(job, attempt, result.get("reports") or ())
            if job.cancel_requested:
                if not job.deleted:
                    return Keep("stale")
                job.status, job.stage, job.completed_at = "cancelled", None, time.time()
                return "deleted"
            job.status, job.progress, job.stage, job.completed_at = "completed", 100, None, time.time()
            job.artifacts = dict(result.get("artifacts", {}))
            if result.get("switch_step") is not None:
                job.switch_step = int(result["switch_step"])
            return "completed"

        return self._edit(job_id, complete, missing="stale")

    def complete_and_get(self, job_id: str, attempt: int, result: dict[str, Any]) -> tuple[str, dict | None]:
        """`complete`, and the final record when the job completed (else None): the driver answers the client's
        last polls from it, one store call where `complete` then `get` were two."""
        with self._lock:  # the record as `complete` left it, no other write in between
            outcome = self.complete(job_id, attempt, result)
            return outcome, self.get(job_id) if outcome == "completed" else None

    def mark_cancelled(self, job_id: str, reason: str = "cancelled") -> bool:
        """Record a requested cancellation as done; False (no change) when none was requested."""
        def cancel(job: JobRecord) -> Any:
            if not job.cancel_requested:
                return Keep(False)
            if job.terminal:
                return Keep(job.status == "cancelled")
            job.status, job.stage, job.completed_at = "cancelled", None, time.time()
            job.error = {"code": "cancelled", "message": _logged(job_id, reason)}
            return True

        return self._edit(job_id, cancel, missing=False)

    def delete(self, job_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """Hide the job (with `tenant`: only its own), erase its prompts, and ask its stages to stop at the next step
        boundary; the rest of the record stays until `expired` lists it for purging."""
        def delete(job: JobRecord) -> Any:
            if job.deleted or (tenant is not None and job.tenant != tenant):
                return Keep(None)
            before = {"id": job.id, "status": job.status, "tenant": job.tenant}
            job.deleted, job.request = True, erase_prompt(job.request)
            if not job.terminal:
                job.cancel_requested = True
            return before

        return self._edit(job_id, delete)

    # --- hygiene: expiry and purging ----------------------------------------------------------------------
    def expired(self, now: float | None = None, limit: int = 100) -> list[str]:
        """Finished jobs past `expires_at`, and deleted ones out of the quota window: to purge once their
        artifacts are gone (the caller removes those, then calls `purge`)."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                f"SELECT id FROM jobs WHERE {TERMINAL_SQL} AND ((expires_at IS NOT NULL AND expires_at < ?) OR "
                f"(deleted = 1 AND created_at < ?)) LIMIT ?", (now, now - admission.WINDOW_S, limit)).fetchall()
        return [r[0] for r in rows]

    def purge(self, job_ids: list[str]) -> int:
        """Delete finished records for good (after their artifacts were removed)."""
        if not job_ids:
            return 0
        with self._lock:
            cursor = self._db.execute(f"DELETE FROM jobs WHERE {TERMINAL_SQL} AND id IN ({', '.join('?' * len(job_ids))})",
                                      list(job_ids))
        return cursor.rowcount

    # --- the stages' side: each returns True when the caller must stop -----------------------------------
    def report(self, events: list[dict[str, Any]]) -> list[str]:
        """A stage replica's events since its last report, for all its jobs, in one call (O(replicas x time),
        not O(steps)): `{"kind": "start"|"progress"|"end"|"watch", "job", "attempt", "stage", "at", ...}` ("watch" only asks).
        Returns the `job#attempt` keys whose stages must stop (deleted, superseded or already finished)."""
        by_job: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for event in events:
            by_job.setdefault((event["job"], event["attempt"]), []).append(event)
        stop = []
        for (job_id, attempt), job_events in by_job.items():
            if all(e["kind"] == "watch" for e in job_events):
                stopped = not self._running(job_id, attempt)
            elif all(e["kind"] in ("progress", "watch") for e in job_events):
                last = [e for e in job_events if e["kind"] == "progress"][-1]
                stopped = self.heartbeat(job_id, attempt, last["stage"], last["step"], last["num_steps"])
            else:
                stopped = self._edit(job_id, lambda job, evs=job_events, a=attempt: Keep(True)
                                     if job.attempt != a else apply_events(job, a, evs), missing=True)
            if stopped:
                stop.append(f"{job_id}#{attempt}")
        return stop

    def _running(self, job_id: str, attempt: int) -> bool:
        """Whether `attempt` is the job's current attempt and may go on (not finished, not cancelled)."""
        with self._lock:
            row = self._db.execute(f"SELECT 1 FROM jobs WHERE id = ? AND attempt = ? AND {ACTIVE_SQL} "
                                   "AND cancel_requested = 0", (job_id, attempt)).fetchone()
        return row is not None

    def stage_started(self, job_id: str, attempt: int, stage: str, replica: str) -> bool:
        def start(job: JobRecord) -> bool:
            started(job, attempt, stage, replica, time.time())
            return False

        return self._edit(job_id, start, attempt, missing=True)

    def heartbeat(self, job_id: str, attempt: int, stage: str, step: int, num_steps: int) -> bool:
        """Progress from a running stage: one UPDATE of the hot columns (no record rewrite)."""
        with self._lock:
            cursor = self._db.execute(
                f"UPDATE jobs SET heartbeat_at = ?, step = ?, num_steps = ?, progress = MAX(progress, ?) "
                f"WHERE id = ? AND attempt = ? AND {ACTIVE_SQL} AND cancel_requested = 0",
                (time.time(), step, num_steps, stage_progress(stage, step, num_steps, False), job_id, attempt))
        return cursor.rowcount == 0

    def stage_finished(self, job_id: str, attempt: int, stage: str, info: dict[str, Any]) -> bool:
        def finish(job: JobRecord) -> bool:
            finished(job, attempt, stage, info, time.time())
            return False

        return self._edit(job_id, finish, attempt, missing=True)

