"""The simulated-pool benchmarks' pure parts: piecewise Poisson arrivals (benchmarks/loadgen.py), the load step's
configs and quality reading (benchmarks/load_step.py), the mixed-fleet break-even price (benchmarks/fleets.py)."""
from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from loadgen import LoadSpec, arrival_gaps  # noqa: E402


def arrivals(spec: LoadSpec, n: int = 100000, seed: int = 0) -> list[float]:
    return list(itertools.accumulate(itertools.islice(arrival_gaps(spec, random.Random(seed)), n)))


def test_rate_steps_give_each_step_its_rate_and_end_with_the_last():
    times = arrivals(LoadSpec("http://127.0.0.1", {}, 0, rate_steps=((1000, 1.0), (1000, 2.0), (1000, 0.5))))
    counts = [sum(lo <= t < lo + 1000 for t in times) for lo in (0, 1000, 2000)]
    assert counts[0] == pytest.approx(1000, rel=0.1) and counts[1] == pytest.approx(2000, rel=0.1)
    assert counts[2] == pytest.approx(500, rel=0.15) and max(times) < 3000
    assert all(b >= a for a, b in zip(times, times[1:]))


def test_a_zero_rate_step_is_a_pause_and_plain_poisson_starts_at_once():
    times = arrivals(LoadSpec("http://127.0.0.1", {}, 0, rate_steps=((100, 1.0), (100, 0.0), (100, 1.0))))
    assert not [t for t in times if 100 <= t < 200] and [t for t in times if t >= 200]
    gaps = list(itertools.islice(arrival_gaps(LoadSpec("http://127.0.0.1", {}, 0, poisson_rate=2.0),
                                              random.Random(1)), 2000))
    assert gaps[0] == 0.0 and sum(gaps) / len(gaps) == pytest.approx(0.5, rel=0.1)


def test_the_load_step_configs_are_valid_serving_configs(tmp_path):
    import load_step

    from srserve.serving.args import AppArgs
    from srserve.serving.runner import check_autoscaling

    opts = load_step.parse_args([])
    configs = {s: load_step.app_config(s, opts, "srserve/sim/bundle/wan2.1-sim-h100", tmp_path) for s in
               load_step.SETUPS}
    for setup, config in configs.items():
        assert check_autoscaling(config) is None, setup
        args = AppArgs.model_validate(config["applications"][0]["args"])
        assert args.sketch.max_ongoing_requests == 2
    fixed = AppArgs.model_validate(configs["fixed"]["applications"][0]["args"])
    assert fixed.sketch.autoscaling_config is None and fixed.sketch.num_replicas == opts.sketch_fixed
    assert "autoscaling_policy" not in configs["fixed"]["applications"][0]
    slo = AppArgs.model_validate(configs["autoscale+slo"]["applications"][0]["args"]).slo
    # simulated seconds x the time factor: the controller's clock is the wall's
    assert slo.p95_target_s == pytest.approx(opts.slo * opts.time_factor) and slo.floor_steps == opts.floor_steps
    auto = AppArgs.model_validate(configs["autoscale"]["applications"][0]["args"])
    assert auto.slo is None and auto.sketch.autoscaling_config["max_replicas"] == opts.sketch_max
    # admission prices scaled from the shipped config's time factor to this run's
    shipped = AppArgs.model_validate(load_step.yaml.safe_load(
        (load_step.ROOT / "deployments" / "sim-wan2.1-h100.yaml").read_text())["applications"][0]["args"])
    scale = opts.time_factor / load_step.BUNDLE_TIME_FACTOR
    assert auto.admission.encode_s == pytest.approx(shipped.admission.encode_s * scale)
    assert auto.admission.attention_tokens == shipped.admission.attention_tokens


def test_quality_is_read_at_the_switch_step_scaled_to_the_tables_steps():
    import load_step

    rows = [{"policy": "none", "large_steps_mean": 30.0, "color_acc": 100, "shape_acc": 100, "motion_acc": 100},
            {"policy": "step:6", "large_steps_mean": 6.0, "color_acc": 90, "shape_acc": 100, "motion_acc": 80},
            {"policy": "small-only", "large_steps_mean": 0.0, "color_acc": 50, "shape_acc": 60, "motion_acc": 70},
            {"policy": "adaptive", "large_steps_mean": 8.0, "color_acc": 1, "shape_acc": 1, "motion_acc": 1}]
    assert load_step.quality_at(10, rows) == pytest.approx(80.0)  # 10 of 50 = step 6 of 30: its worst, motion
    assert load_step.quality_at(5, rows) == pytest.approx(65.0)  # step 3 of 30: half way from 50 to 80
    assert load_step.quality_at(50, rows) == 100.0 and load_step.quality_at(0, rows) == 50.0
    assert load_step.quality_at(10, []) is None


def test_the_break_even_price_makes_the_mixed_fleet_cost_the_target():
    import fleets

    from srserve.sim.costs import default_table

    table = default_table()
    plan = fleets.disaggregated(0.2, 400.0, "h100", "l40s", table)
    target = 0.9 * plan.dollars_per_video
    price = fleets.break_even_price(0.2, 400.0, "h100", "l40s", table, target)
    assert 0 < price < table.price("l40s")
    at = fleets.disaggregated(0.2, 400.0, "h100", "l40s", fleets.with_price(table, "l40s", price))
    assert at.dollars_per_video <= target + 1e-9
    assert fleets.break_even_price(0.2, 400.0, "h100", "l40s", table, 1e-6) is None  # below the sketch pool alone


def test_the_memory_goal_reads_the_largest_idle_stage_replica_and_any_torch_import():
    from report_pools import replica_memory
    from sim_memory import memory_mb

    def run(rss: dict[str, float], torch: list[str]) -> dict:
        return {"date": "d", "requests": 4, "concurrency": 2, "torch_imported": torch,
                "rows": [{"deployment": name, "idle": {"rss": v, "pss": v / 2, "anon": v / 2},
                          "loaded": {"rss": 2 * v, "pss": v, "anon": v / 2}} for name, v in rss.items()]}

    small = {"Ingress": 400.0, "Encode": 150.0, "Sketch": 149.0, "Render": 151.0, "Decode": 150.0}
    lines, [(_, measured, met)] = replica_memory(run(small, []), None)
    assert met and measured.startswith("151 MB")  # the Ingress is no simulated replica
    assert not replica_memory(run({**small, "Sketch": 260.0}, []), None)[1][0][2]
    assert not replica_memory(run(small, ["Render"]), run(small, []))[1][0][2]
    own = memory_mb(int(Path("/proc/self").resolve().name))
    assert own is not None and own["rss"] >= own["pss"] > 0 and own["anon"] > 0
