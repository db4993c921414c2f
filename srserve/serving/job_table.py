"""The SQLite table behind the job store: its columns, its creation and migration, a row as a record's fields.

The record is JSON in `data`; the fields that change more often than a stage transition (progress, leases, what
the watchdog reads) have their own columns, which are the truth (the JSON copy may be older).
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

ACTIVE_SQL = "status IN ('queued', 'in_progress')"
TERMINAL_SQL = "status IN ('completed', 'failed', 'cancelled')"


# Record fields kept in their own columns (the column is the truth; the JSON copy may be older).
COLUMNS = {"status": "TEXT NOT NULL", "deleted": "INTEGER NOT NULL DEFAULT 0",
           "lease_until": "REAL NOT NULL DEFAULT 0", "owner": "TEXT", "attempt": "INTEGER NOT NULL DEFAULT 0",
           "stage": "TEXT", "stage_started_at": "REAL", "stage_replica": "TEXT", "heartbeat_at": "REAL",
           "step": "INTEGER NOT NULL DEFAULT 0", "num_steps": "INTEGER NOT NULL DEFAULT 0",
           "progress": "INTEGER NOT NULL DEFAULT 0", "cancel_requested": "INTEGER NOT NULL DEFAULT 0",
           "created_at": "REAL NOT NULL DEFAULT 0", "tenant": "TEXT NOT NULL DEFAULT 'anonymous'",
           "cost": "REAL NOT NULL DEFAULT 0", "expires_at": "REAL"}
# What a record written before a column existed gets in it when its JSON has no such field.
_DEFAULTS = {"attempt": 0, "step": 0, "num_steps": 0, "progress": 0, "created_at": 0, "lease_until": 0,
             "tenant": "anonymous", "cost": 0.0}
NAMES = tuple(COLUMNS)
SELECT = "SELECT data, " + ", ".join(NAMES) + " FROM jobs"
BOOLS = ("deleted", "cancel_requested")
# What a driver's watchdog reads of each job it drives, every round.
WATCHED = ("id", "status", "stage", "stage_started_at", "stage_replica", "heartbeat_at", "created_at", "owner",
           "cancel_requested", "deleted", "attempt", "progress")


def row_record(row: tuple) -> dict[str, Any]:
    """A `SELECT` row as the record's fields: the JSON, overlaid by the columns (their values are the truth)."""
    data = json.loads(row[0])
    data.update(zip(NAMES, row[1:]))
    for name in BOOLS:
        data[name] = bool(data[name])
    return data


def open_table(path: Path) -> sqlite3.Connection:
    """The store's connection (WAL, autocommit), with the jobs table, its columns and its indexes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
               "id TEXT UNIQUE NOT NULL, data TEXT NOT NULL, "
               + ", ".join(f"{n} {t}" for n, t in COLUMNS.items()) + ")")
    _migrate(db)
    db.execute("CREATE INDEX IF NOT EXISTS jobs_active ON jobs (status, lease_until)")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs (tenant, seq)")  # list, per key
    db.execute("CREATE INDEX IF NOT EXISTS jobs_tenant_created ON jobs (tenant, created_at)")  # quotas
    return db


def _migrate(db: sqlite3.Connection) -> None:
    """Stores written before the hot fields had columns: add them, filled from each record's JSON."""
    have = {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
    missing = [n for n in NAMES if n not in have]
    if not missing:
        return
    for name in missing:
        kind = COLUMNS[name].replace("NOT NULL ", "")
        db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
    for job_id, data in db.execute("SELECT id, data FROM jobs").fetchall():
        record = json.loads(data)
        values = [int(bool(record.get(n))) if n in BOOLS else record.get(n, _DEFAULTS.get(n)) for n in missing]
        db.execute(f"UPDATE jobs SET {', '.join(f'{n} = ?' for n in missing)} WHERE id = ?", (*values, job_id))
