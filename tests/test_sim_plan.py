"""The capacity planner: queueing math, sizing per setup, memory fit, the `srserve plan` command."""
from __future__ import annotations

import json
import math

import pytest

from srserve.cli import main as cli_main
from srserve.sim.costs import CostTable
from srserve.sim.plan import (Planner, PlanRequest, Wait, erlang_c, latency_quantile, mmc_wait, smallest,
                              wait_tail)
from srserve.sim.switching import SwitchDistribution


@pytest.fixture(scope="module")
def table() -> CostTable:
    return CostTable.load(measured=None)


def test_erlang_c_and_waits():
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: P(wait) = rho
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert erlang_c(3, 3.0) == 1.0 and erlang_c(4, 0.0) == 0.0
    w = mmc_wait(1, rate=0.5, mean_service_s=1.0)
    assert w == Wait(0.5, 0.5)
    assert mmc_wait(2, rate=2.0, mean_service_s=1.0) is None  # unstable
    assert wait_tail([w], 2.0) == pytest.approx(0.5 * math.exp(-1.0))
    # two equal-rate waits that always wait: Erlang-2 tail (1 + a t) exp(-a t)
    assert wait_tail([Wait(1, 0.5), Wait(1, 0.5)], 3.0) == pytest.approx((1 + 1.5) * math.exp(-1.5), rel=1e-5)
    assert wait_tail([w], -1.0) == 1.0


def test_latency_quantile():
    assert latency_quantile([(100.0, 1.0)], []) == pytest.approx(100.0, rel=1e-3)
    assert latency_quantile([(10.0, 0.9), (50.0, 0.1)], []) == pytest.approx(50.0, rel=1e-3)
    # M/M/1 sojourn... service fixed 1 s + wait that happens w.p. 0.5 at rate 0.5: p95 = 1 + ln(0.5/0.05)/0.5
    assert latency_quantile([(1.0, 1.0)], [Wait(0.5, 0.5)]) == pytest.approx(1 + math.log(10) / 0.5, rel=1e-3)
    assert smallest(lambda c: c >= 7, 1, 100) == 7 and smallest(lambda c: False, 1, 10) is None


def test_plans_on_equal_h100s(table):
    req = PlanRequest(rate=0.2, slo_p95_s=300, sketch_gpu="h100", render_gpu="h100")
    plans = {p.setup: p for p in Planner(req, table).plan_all()}
    assert set(plans) == {"large-only", "colocated-sr", "disaggregated-sr"}
    for p in plans.values():
        assert p.feasible and p.p95_s <= 300 and p.throughput_rps > req.rate
        assert all(pool.utilization < 1 for pool in p.pools)
        assert p.dollars_per_video == pytest.approx(p.cost_per_hour / (0.2 * 3600))
    # SR needs far fewer GPUs than large-only; colocated SR is the throughput bound on equal GPUs
    assert plans["colocated-sr"].gpus < 0.6 * plans["large-only"].gpus
    assert plans["colocated-sr"].gpus <= plans["disaggregated-sr"].gpus
    sketch, render = plans["disaggregated-sr"].pools
    assert sketch.roles == ("sketch",) and set(render.roles) == {"render", "encode", "decode"}
    # the pools' mean service follows the switch distribution's mean k
    k = SwitchDistribution.load().mean_steps(50)
    assert sketch.mean_service_s == pytest.approx(k * table.step_seconds("wan2.1-t2v-14b", "h100"))
    unloaded = table.text_encode_seconds("h100") + table.vae_decode_seconds("h100") + \
        k * table.step_seconds("wan2.1-t2v-14b", "h100") + (50 - k) * table.step_seconds("wan2.1-t2v-1.3b", "h100")
    assert plans["colocated-sr"].unloaded_s == pytest.approx(unloaded)


def test_more_load_more_gpus(table):
    sizes = [Planner(PlanRequest(rate=r, slo_p95_s=300), table).colocated_sr("h100").gpus for r in (0.05, 0.2, 0.8)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_memory_decides_what_runs_where(table):
    req = PlanRequest(rate=0.1, slo_p95_s=400, sketch_gpu="h100", render_gpu="l4", colocated_gpu="l40s")
    plans = {p.setup: p for p in Planner(req, table).plan_all()}
    assert not plans["colocated-sr"].feasible and "GB" in plans["colocated-sr"].note
    dis = plans["disaggregated-sr"]
    assert [p.name for p in dis.pools] == ["encode", "sketch", "render"]  # an L4 cannot hold umT5 with the rest
    assert "encode on its own pool" in dis.note
    assert "disaggregated-sr (same GPU)" in plans
    no_sketch = Planner(PlanRequest(rate=0.1, slo_p95_s=400, sketch_gpu="l4", render_gpu="l4"), table)
    assert not no_sketch.disaggregated("l4", "l4").feasible


def test_unreachable_slo_is_reported_not_hidden(table):
    plans = Planner(PlanRequest(rate=0.1, slo_p95_s=60), table).plan_all()
    assert all(not p.feasible and "unreachable" in p.note for p in plans)
    assert all(p.gpus > 0 and p.p95_s > 60 for p in plans)


def test_switch_cap_and_fixed_fraction(table):
    base = Planner(PlanRequest(rate=0.2, slo_p95_s=300), table).disaggregated("h100", "h100")
    capped = Planner(PlanRequest(rate=0.2, slo_p95_s=300, switch_cap=10), table).disaggregated("h100", "h100")
    assert capped.pools[0].mean_service_s < base.pools[0].mean_service_s
    assert capped.pools[0].replicas < base.pools[0].replicas
    fixed = Planner(PlanRequest(rate=0.2, slo_p95_s=300), table, SwitchDistribution.fixed(0.3))
    assert fixed.ks == [(15, 1.0)]


def test_cli(capsys):
    assert cli_main(["plan", "--rate", "0.1", "--slo", "300", "--render-gpu", "l40s", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["queueing_model"].startswith("M/M/c")
    assert [p["setup"] for p in out["plans"]] == ["large-only", "colocated-sr", "disaggregated-sr",
                                                  "disaggregated-sr (same GPU)"]
    assert cli_main(["plan", "--rate", "0.1", "--slo", "300", "--switch", "0.25", "--resolution", "720p"]) == 0
    text = capsys.readouterr().out
    assert "720p" in text and "colocated-sr" in text and "$/video" in text
    assert cli_main(["plan", "--rate", "0.1", "--slo", "300", "--sketch-gpu", "tpu"]) == 2
    assert "not in the cost table" in capsys.readouterr().err


def test_the_whole_gpu_split_follows_the_stage_ratio_and_flex_gpus_take_the_remainder():
    from srserve.sim.plan import best_whole_gpu_split

    # sketch 80 s, render 32 s, whole request 112 s: the ideal sketch share 0.71 of 8 GPUs is 5.7
    sizes, rate = best_whole_gpu_split(8, 80.0, 32.0)
    assert sum(sizes.values()) == 8 and "flex" not in sizes
    assert rate == pytest.approx(min(sizes["sketch"] / 80, sizes["render"] / 32)) and rate < 0.9 * 8 / 112
    flexed, with_flex = best_whole_gpu_split(8, 80.0, 32.0, 112.0)
    assert flexed == {"sketch": 5, "render": 2, "flex": 1} and with_flex >= 0.99 * 8 / 112
    # a split that follows the ratio exactly wants no flex GPU
    assert best_whole_gpu_split(7, 80.0, 32.0, 112.0)[0] == {"sketch": 5, "render": 2}
    with pytest.raises(ValueError, match="at least 2 GPUs"):
        best_whole_gpu_split(1, 80.0, 32.0)
