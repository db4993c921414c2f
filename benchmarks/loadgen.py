"""Load generator for the /v1/videos API: open-loop Poisson arrivals or closed-loop concurrency.

Bounded in count and time, loopback only by default. Writes one JSON record per request (submit, first seen
running, completion, status, and the server's job record from `GET /v1/jobs/{id}` with its per-stage times,
replicas and handoffs) to JSONL or CSV. `server_latency` (job created -> completed, from the job record) does not
depend on the polling interval; `latency` (submit -> first poll that saw the job finished) does.

    python benchmarks/loadgen.py --url http://127.0.0.1:8000 --poisson 0.5 --count 20 --out runs/load.jsonl
    python benchmarks/loadgen.py --url http://127.0.0.1:8000 --concurrency 4 --count 20 --out runs/load.csv
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import httpx

TERMINAL = {"completed", "failed", "cancelled"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Record:
    index: int
    submitted_at: float
    accepted: bool = False
    http_status: int | None = None
    job_id: str | None = None
    started_at: float | None = None  # first poll that saw in_progress
    finished_at: float | None = None
    status: str | None = None
    error: str | None = None
    job: dict[str, Any] = field(default_factory=dict)

    @property
    def latency(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.submitted_at

    @property
    def server_latency(self) -> float | None:
        if self.status != "completed" or not self.job.get("completed_at"):
            return None
        return self.job["completed_at"] - self.job["created_at"]


@dataclass(frozen=True)
class LoadSpec:
    url: str
    body: dict[str, Any]
    count: int
    poisson_rate: float | None = None  # requests per second (open loop)
    rate_steps: tuple[tuple[float, float], ...] = ()  # open loop, piecewise: (seconds, requests per second) in turn
    concurrency: int | None = None  # in flight at once (closed loop)
    time_limit_s: float = 600.0
    poll_s: float = 0.25
    seed: int = 0
    prompts: tuple[str, ...] = ()  # request i uses prompts[i % len] (default: the body's prompt)
    first_index: int = 0  # request i gets seed body.seed + first_index + i, so runs can continue a sequence

    def body_for(self, index: int) -> dict[str, Any]:
        body = dict(self.body, seed=self.body.get("seed", 0) + self.first_index + index)
        if self.prompts:
            body["prompt"] = self.prompts[(self.first_index + index) % len(self.prompts)]
        return body


async def run_one(client: httpx.AsyncClient, spec: LoadSpec, index: int, deadline: float) -> Record:
    record = Record(index, time.time())
    try:
        response = await client.post("/v1/videos", json=spec.body_for(index))
        record.http_status = response.status_code
        if response.status_code != 200:
            record.status, record.error = "refused", response.text[:300]
            return record
        record.accepted, record.job_id = True, response.json()["id"]
        while time.time() < deadline:
            job = (await client.get(f"/v1/videos/{record.job_id}")).json()
            record.job = job
            if job["status"] == "in_progress" and record.started_at is None:
                record.started_at = time.time()
            if job["status"] in TERMINAL:
                record.finished_at, record.status = time.time(), job["status"]
                full = await client.get(f"/v1/jobs/{record.job_id}")  # stage times, replicas, handoffs
                if full.status_code == 200:
                    record.job = full.json()
                return record
            await asyncio.sleep(spec.poll_s)
        record.status = "timeout"
    except httpx.HTTPError as err:
        record.status, record.error = "http_error", repr(err)
    return record


async def run_load(spec: LoadSpec) -> list[Record]:
    host = urlparse(spec.url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"refusing to load {host!r}: the load generator targets loopback only")
    rng = random.Random(spec.seed)
    deadline = time.time() + spec.time_limit_s
    async with httpx.AsyncClient(base_url=spec.url, timeout=30.0) as client:
        if spec.concurrency:
            queue = iter(range(spec.count))
            records: list[Record] = []

            async def worker() -> None:
                for index in queue:
                    if time.time() >= deadline:
                        return
                    records.append(await run_one(client, spec, index, deadline))

            await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
            return sorted(records, key=lambda r: r.index)
        tasks = []
        for index, gap in zip(range(spec.count), arrival_gaps(spec, rng)):
            if time.time() >= deadline:
                break
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(run_one(client, spec, index, deadline)))
        return list(await asyncio.gather(*tasks))


def arrival_gaps(spec: LoadSpec, rng: random.Random) -> Iterator[float]:
    """Seconds to wait before each request: Poisson at `poisson_rate` (the first at once), or through
    `rate_steps` in turn (Poisson within each step; the gaps end with the last step)."""
    if not spec.rate_steps:
        yield 0.0
        while True:
            yield rng.expovariate(spec.poisson_rate)
    now, begin = 0.0, 0.0
    for duration, rate in spec.rate_steps:
        end = begin + duration
        t = max(now, begin)  # memoryless: the next arrival of this step counts from its start
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= end:
                break
            yield t - now
            now = t
        begin = end


def write_records(records: list[Record], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [dict(asdict(r), latency=r.latency, server_latency=r.server_latency) for r in records]
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "job"] + ["job"])
            writer.writeheader()
            for row in rows:
                writer.writerow(dict(row, job=json.dumps(row["job"])))
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--poisson", type=float, help="open loop: arrival rate, requests/second")
    mode.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--time-limit", type=float, default=600.0)
    parser.add_argument("--body", default='{"prompt": "a red circle moving right"}', help="JSON create body")
    parser.add_argument("--out", required=True, help=".jsonl or .csv")
    args = parser.parse_args(argv)
    spec = LoadSpec(args.url, json.loads(args.body), args.count, args.poisson, args.concurrency, args.time_limit)
    records = asyncio.run(run_load(spec))
    write_records(records, args.out)
    done = [r.latency for r in records if r.status == "completed"]
    print(json.dumps({"requests": len(records), "completed": len(done),
                      "median_latency_s": sorted(done)[len(done) // 2] if done else None}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
