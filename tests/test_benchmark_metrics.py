"""The serving comparison's metrics (benchmarks/serving_metrics.py): pure functions on job records."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from serving_metrics import busy_fraction, handoff_totals, percentile, phase_metrics, steady_throughput  # noqa: E402


def job(created, stages, completed=None):
    stages = {name: {"start": a, "end": b, "replica": r, "handoff": h} for name, (a, b, r, h) in stages.items()}
    return {"created_at": created, "completed_at": completed or max(s["end"] for s in stages.values()),
            "stages": stages, "switch_step": 3}


def test_percentile_interpolates_like_numpy():
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)


def test_busy_fraction_counts_at_most_the_pool_workers():
    jobs = [job(0, {"encode": (0, 1, "e", None), "render": (1, 3, "r", None), "decode": (2, 4, "d", None)})]
    # One worker: busy whenever any of its stages holds a request (0-4 of a 0-8 window).
    assert busy_fraction(jobs, ["encode", "render", "decode"], 1, (0, 8)) == pytest.approx(0.5)
    # Two workers, two replicas busy 2-3 (render and decode): (1 + 1 + 2 + 1) / (2 * 8).
    assert busy_fraction(jobs, ["encode", "render", "decode"], 2, (0, 8)) == pytest.approx(5 / 16)
    assert busy_fraction(jobs, ["sketch"], 1, (0, 8)) == 0.0


def test_steady_throughput_leaves_out_ramp_and_drain():
    completions = [1.0, 1.5] + [2.0 + i for i in range(10)] + [30.0, 40.0]
    rate, window = steady_throughput(completions, concurrency=2)
    assert window == (1.5, 11.0) and rate == pytest.approx(10 / 9.5)


def test_phase_metrics_handoff_and_latencies():
    h = {"bytes": 100.0, "serialize_s": 0.001, "transit_s": 0.002, "deserialize_s": 0.001}
    rows = [{"status": "completed", "server_latency": 1.0 + i, "latency": 1.2 + i,
             "job": job(10 * i, {"sketch": (10 * i, 10 * i + 0.5, "s", h), "render": (10 * i + 0.5, 10 * i + 1, "r",
                                                                                   h)}, 10 * i + 1 + i)}
            for i in range(3)] + [{"status": "refused"}]
    m = phase_metrics(rows, {"sketch": {"stages": ["sketch"], "workers": 1}})
    assert m["completed"] == 3 and m["refused"] == 1 and m["latency_s"]["p50"] == 2.0
    assert m["latencies"] == [1.0, 2.0, 3.0] and m["submitted"] == 4
    assert m["handoff"]["bytes"] == 200.0 and m["handoff"]["render_seconds"] == pytest.approx(0.004)
    assert handoff_totals({"stages": {"encode": {"handoff": None}}})["bytes"] == 0.0


def test_slo_attainment_uses_the_whole_runs_unloaded_latency():
    from serving_compare import add_slo_attainment

    runs = [{"setup": "large-only", "latencies": [1.0, 3.0], "submitted": 3},
            {"setup": "disaggregated-sr", "latencies": [1.5, 2.5], "submitted": 2}]
    slos = add_slo_attainment(runs, {"large-only": [1.0, 1.2, 1.4], "disaggregated-sr": [1.3]})
    assert slos["2x_large_only_unloaded"] == pytest.approx(2.4)
    assert runs[0]["slo_attainment"]["2x_large_only_unloaded"] == pytest.approx(1 / 3)  # one of three submitted
    assert runs[1]["slo_attainment"] == {"2x_large_only_unloaded": 0.5, "2x_own_unloaded": 1.0}
