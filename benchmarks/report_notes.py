"""The "Reading the serving numbers" part of REPORT.md: pool balance, what SR can shorten, serving overhead,
and a pool-sizing model from the measured stage costs (with an M/M/c queueing estimate of the p99 goal)."""
from __future__ import annotations

import math
import statistics

from report_plots import SETUP_LABELS, med


def serving_notes(s: dict) -> list[str]:
    """What the numbers say about the goals that were not met: facts from the run, no tuning."""
    summ, split, cal = s["summary"], s["pool_split"], s["calibration"]
    sr = cal["in_process"]["sr"]
    notes = ["### Reading the serving numbers", ""]
    sat = summ.get("disaggregated-sr", {}).get("saturation", {})
    busy = {p: med(v) for p, v in (sat.get("busy_fraction") or {}).items()}
    if busy.get("sketch") is not None and busy.get("render") is not None:
        notes.append(
            f"- **Pool balance.** At saturation the render pool is busy {busy['render']:.2f} of the time and the "
            f"sketch pool {busy['sketch']:.2f}. Per request the render pool needs "
            f"{split['render_pool_s_per_request']:.3f} s and the sketch pool {split['sketch_pool_s_per_request']:.3f}"
            f" s, so the ideal split is {split['sketch_share']:.2f} : {1 - split['sketch_share']:.2f} of the "
            f"workers; {s['workers']} workers can only be split {split['sketch_workers']} : "
            f"{split['render_workers']}, and the busier pool caps throughput while the other idles. Colocated "
            "replicas run whole requests, so they balance any stage ratio by construction. On compute alone, "
            "disaggregation can at best match colocated throughput, when the worker count lets the pools follow "
            "the ratio (the model below); its gains lie elsewhere (one model per device, pools that scale and "
            "batch on their own), which srd-tiny on two CPU cores does not exercise.")
    notes += sizing_model(s)
    sat = [r for r in s["runs"] if r["phase"] == "saturation" and r.get("cpu_cores")]
    if sat:
        control = statistics.median(sum(v for k, v in r["cpu_cores"].items() if k != "other processes" and (
            not k.startswith("replica ") or k in ("replica Ingress", "replica JobStore"))) for r in sat)
        store = statistics.median(r["cpu_cores"].get("replica JobStore", 0.0) for r in sat)
        rate = statistics.median(r["throughput_rps"] for r in sat if r.get("throughput_rps"))
        notes.append(
            f"- **The serving control plane is not free on {s['machine']['cores']} cores.** At saturation the "
            f"ingress, job store, HTTP proxy, Serve controller, Ray and the load generator use {control:.2f} cores "
            f"(median over setups and repeats), {100 * control / s['machine']['cores']:.0f}% of the machine, which "
            f"the model replicas' workers have to share their cores with. The job store alone uses {store:.2f} "
            f"cores at "
            f"~{rate:.1f} requests/s, about {1e3 * store / rate:.0f} ms of CPU per request: every stage start and "
            "end and every denoising step's progress heartbeat is a store call that rewrites the job's JSON record "
            "in SQLite. On GPUs this runs on the host CPUs, not the devices, so it matters less; here it takes "
            "from the same two cores as the models.")
    workers = s["workers"]
    erlang = erlang_c(workers, 0.8)
    t99 = math.log(erlang / 0.01) / (workers * (1 - 0.8))
    notes.append(
        f"- **p99 at 80% load.** Queueing alone makes the goal hard with Poisson arrivals: in an M/M/{workers} "
        f"queue at utilisation 0.8 the p99 wait is {t99:.1f} mean service times (Erlang C = {erlang:.2f}); "
        "deterministic service roughly halves that. p99 <= 2x unloaded latency at 80% of saturation needs "
        "service that speeds up under load (batching), more workers, or a lower operating load. With "
        f"{s['options']['level_count']} requests per level, p99 is close to the largest latency seen.")
    total = sr["encode_seconds"] + sr["sketch_seconds"] + sr["render_seconds"] + sr["decode_seconds"]
    notes.append(
        f"- **What SR can shorten.** In-process, an SR request spends {sr['decode_seconds']:.3f} s of "
        f"{total:.3f} s ({100 * sr['decode_seconds'] / total:.0f}%) in VAE decode and {sr['encode_seconds']:.3f} s "
        "in encode; SR shortens only denoising. The compute bound N/(k+(N-k)/r) assumes a request is all "
        "denoising, which on srd-tiny (a small VAE against tiny DiTs at 64x64x17) it is far from; on Wan2.1 at "
        "480p decode is a few percent of a request. The bound counting encode and decode is given for context.")
    served = {k: med(summ.get(k, {}).get("unloaded", {}).get("p50")) for k in SETUP_LABELS}
    if all(served.values()):
        notes.append(
            f"- **Serving overhead.** Unloaded, a request takes {served['large-only']:.3f} s served against "
            f"{cal['in_process']['none']['total_seconds']:.3f} s in-process for large-only, and "
            f"{served['colocated-sr']:.3f} s (colocated) / {served['disaggregated-sr']:.3f} s (disaggregated) "
            f"against {sr['total_seconds']:.3f} s for SR. The difference is job-store updates per stage, "
            "progress heartbeats per denoising step, the HTTP proxy and, for disaggregated, the hops between "
            f"replicas; it runs on the same {s['machine']['cores']} cores as the models.")
        stages = [r["stage_seconds_p50"] for r in s["runs"] if r["setup"] == "large-only"
                  and r["phase"] == "unloaded" and r.get("stage_seconds_p50")]
        if stages:
            none = cal["in_process"]["none"]
            served_stage = {k: statistics.median(x[k] for x in stages if x.get(k)) for k in ("sketch", "decode")}
            notes[-1] += (f" Inside the replica too: large-only's sketch stage takes {served_stage['sketch']:.3f} s "
                          f"served against {none['sketch_seconds']:.3f} s in-process, decode "
                          f"{served_stage['decode']:.3f} s against {none['decode_seconds']:.3f} s: the replica "
                          "also sends a job-store heartbeat per denoising step and shares its cores with the "
                          "control plane.")
    return notes + [""]


def erlang_c(servers: int, utilisation: float) -> float:
    """Probability that an arrival waits, in an M/M/c queue with c = `servers`."""
    a = servers * utilisation
    top = a ** servers / math.factorial(servers) / (1 - utilisation)
    return top / (sum(a ** k / math.factorial(k) for k in range(servers)) + top)


def sizing_model(s: dict) -> list[str]:
    """A model, not a measurement: throughput per worker count from the in-process stage costs of this run."""
    split = s["pool_split"]
    t_sketch, t_rest = split["sketch_pool_s_per_request"], split["render_pool_s_per_request"]
    rows = ["", "  Pool sizing, modelled from those in-process stage costs (ignoring serving overhead and batching): "
            "requests/s per setup by worker count W.", "",
            "  | W | best split (sketch + render) | disaggregated | colocated SR | disaggregated / colocated |",
            "  |---|---|---|---|---|"]
    for w in (2, 3, 4, 6, 8):
        best = max(range(1, w), key=lambda k: min(k / t_sketch, (w - k) / t_rest))
        disagg = min(best / t_sketch, (w - best) / t_rest)
        colocated = w / (t_sketch + t_rest)
        rows.append(f"  | {w} | {best} + {w - best} | {disagg:.2f} | {colocated:.2f} | {disagg / colocated:.2f} |")
    return rows
