"""Metrics of one load phase, from the load generator's records and the server's job records (pure functions).

Latency is the server's (job created -> completed), so the client's polling interval does not enter it. Busy
fractions come from the stage intervals of the job records: a worker is busy while any request is inside one of
its stages (denoising, or waiting in its batch); a pool of W workers counts at most W busy at a time.
"""
from __future__ import annotations

import os
import statistics
from typing import Any, Iterable

STAGES = ("encode", "sketch", "render", "decode")


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def spread(values: Iterable[float | None]) -> dict[str, float] | None:
    xs = [v for v in values if v is not None]
    if not xs:
        return None
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "n": len(xs)}


def steady_throughput(completions: list[float], concurrency: int) -> tuple[float | None, tuple[float, float]]:
    """Completions per second between the ramp-up and the drain of a closed-loop run, and that window.

    The first and last `concurrency` completions are left out (the pipeline filling and emptying).
    """
    ts = sorted(completions)
    first, last = concurrency - 1, len(ts) - concurrency - 1
    if last - first < 2:
        first, last = 0, len(ts) - 1
    if last <= first or ts[last] <= ts[first]:
        return None, (ts[0] if ts else 0.0, ts[-1] if ts else 0.0)
    return (last - first) / (ts[last] - ts[first]), (ts[first], ts[last])


def busy_fraction(jobs: list[dict[str, Any]], stages: Iterable[str], workers: int,
                  window: tuple[float, float]) -> float | None:
    """Time-average of min(workers, replicas with a request inside `stages`) / workers over `window`."""
    start, end = window
    if end <= start:
        return None
    wanted = set(stages)
    events = []
    for job in jobs:
        for name, record in (job.get("stages") or {}).items():
            if name not in wanted or record.get("end") is None:
                continue
            a, b = max(record["start"], start), min(record["end"], end)
            if b > a:
                events += [(a, 1, record["replica"]), (b, -1, record["replica"])]
    events.sort(key=lambda e: (e[0], e[1]))
    active: dict[str, int] = {}
    busy, last = 0.0, start
    for t, delta, replica in events:
        busy += min(workers, len(active)) * (t - last)
        last = t
        active[replica] = active.get(replica, 0) + delta
        if active[replica] == 0:
            del active[replica]
    return busy / (workers * (end - start))


def handoff_totals(job: dict[str, Any]) -> dict[str, float]:
    """Bytes and seconds (serialise + transit + deserialise) of the states this job moved between processes."""
    out = {"bytes": 0.0, "seconds": 0.0, "render_bytes": 0.0, "render_seconds": 0.0, "render_serialize_s": 0.0,
           "render_transit_s": 0.0, "render_deserialize_s": 0.0, "render_embeddings_s": 0.0}
    for name, record in (job.get("stages") or {}).items():
        h = record.get("handoff")
        if not h:
            continue
        # the embeddings a denoising stage fetches by reference count as part of its hop
        seconds = h["serialize_s"] + h["transit_s"] + h["deserialize_s"] + h.get("embeddings_s", 0.0)
        moved = h["bytes"] + h.get("embeddings_bytes", 0.0)
        out["bytes"] += moved
        out["seconds"] += seconds
        if name == "render":  # the sketch -> render handoff proper
            out["render_bytes"], out["render_seconds"] = float(moved), seconds
            for part in ("serialize_s", "transit_s", "deserialize_s", "embeddings_s"):
                out[f"render_{part}"] = h.get(part, 0.0)
    return out


def phase_metrics(records: list[dict[str, Any]], pools: dict[str, dict[str, Any]],
                  concurrency: int | None = None) -> dict[str, Any]:
    """Everything the report needs of one phase. `records`: loadgen rows (with `job` = the job record)."""
    done = [r for r in records if r["status"] == "completed" and r.get("server_latency") is not None]
    submits = [r["submitted_at"] for r in records if r.get("submitted_at") is not None]
    lat = [r["server_latency"] for r in done]
    jobs = [r["job"] for r in done]
    completions = [j["completed_at"] for j in jobs]
    out: dict[str, Any] = {
        "submitted": len(records), "completed": len(done),
        "refused": sum(r["status"] == "refused" for r in records),
        "failed": sum(r["status"] not in ("completed", "refused") for r in records),
        "latency_s": {q: percentile(lat, v) for q, v in (("p50", 50), ("p90", 90), ("p99", 99))} | {
            "mean": statistics.mean(lat) if lat else None, "max": max(lat) if lat else None},
        "client_latency_p50_s": percentile([r["latency"] for r in done if r.get("latency") is not None], 50),
        "latencies": lat,
        "arrival_rps": (len(submits) - 1) / (max(submits) - min(submits)) if len(submits) > 1
        and max(submits) > min(submits) else None,
        "switch_steps": [j.get("switch_step") for j in jobs],
    }
    if not done:
        return out
    if concurrency:
        out["throughput_rps"], window = steady_throughput(completions, concurrency)
    else:
        window = (min(j["created_at"] for j in jobs), max(completions))
        out["throughput_rps"] = len(done) / (window[1] - window[0]) if window[1] > window[0] else None
    out["window_s"] = [window[0], window[1]]
    out["busy_fraction"] = {name: busy_fraction(jobs, pool["stages"], pool["workers"], window)
                            for name, pool in pools.items()}
    out["stage_busy_fraction"] = {s: busy_fraction(jobs, [s], 1, window) for s in STAGES}
    out["stage_seconds_p50"] = {s: percentile([j["stages"][s]["end"] - j["stages"][s]["start"] for j in jobs
                                               if s in j["stages"] and j["stages"][s]["end"]], 50) for s in STAGES}
    handoffs = [handoff_totals(j) for j in jobs]
    out["handoff"] = {key: percentile([h[key] for h in handoffs], 50) for key in handoffs[0]}
    out["handoff_fraction_of_latency_p50"] = percentile(
        [h["seconds"] / x for h, x in zip(handoffs, lat) if x > 0], 50)
    return out


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    """{pid: (command line, CPU seconds so far)} of every process on the machine (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile
            continue
        out[int(pid)] = (cmd, (int(fields[11]) + int(fields[12])) / ticks)  # utime + stime
    return out


def cpu_role(cmd: str, pid: int, driver: int) -> str:
    """What a process is, for the CPU breakdown: a deployment of the app under test, Serve, Ray, or else."""
    if pid == driver:
        return "load generator + driver"
    if cmd.startswith("ray::ServeReplica:"):
        return "replica " + cmd.split(":")[-1].split()[0].split(".")[0]
    if cmd.startswith("ray::ProxyActor"):
        return "serve proxy"
    if cmd.startswith("ray::ServeController"):
        return "serve controller"
    if any(name in cmd for name in ("raylet", "gcs_server", "ray/dashboard", "log_monitor", "ray/autoscaler",
                                    "default_worker.py", "runtime_env", "ray::IDLE")):
        return "ray core"
    return "other processes"


def cpu_cores(before: dict, after: dict, seconds: float, driver: int) -> dict[str, float]:
    """Cores used per role between two snapshots (processes that started in between count from zero)."""
    used: dict[str, float] = {}
    for pid, (cmd, total) in after.items():
        delta = total - before.get(pid, (cmd, 0.0))[1]
        if delta > 0:
            role = cpu_role(cmd, pid, driver)
            used[role] = used.get(role, 0.0) + delta / seconds
    return dict(sorted(used.items(), key=lambda kv: -kv[1]))
