"""The SLO-driven switch controller: lower the cap under pressure (not below the floor, one move per interval),
hold in the hysteresis band, lift as load falls; the cap applied to requests without overriding a client's choice."""
from __future__ import annotations

import math

import pytest

from srserve.control.autoscale import StageInput
from srserve.control.slo import (SLOConfig, SLOInput, SLOState, apply_cap, gauges, observed_p95, p95, project_p95,
                                 update)
from srserve.pipeline.switch import parse_policy

CFG = SLOConfig(p95_target_s=300.0, floor_steps=8, reference_steps=50, step=2, interval_s=30.0, min_samples=5)


def test_p95_nearest_rank():
    assert p95([]) is None
    assert p95(list(range(1, 101))) == 95
    assert p95([5.0]) == 5.0


def test_pressure_lowers_the_cap_one_step_per_interval_down_to_the_floor():
    state = SLOState()
    caps = []
    for t in range(0, 600, 10):  # projected p95 far above the SLO the whole time
        state = update(SLOInput(now=float(t), projected_p95_s=500.0), CFG, state)
        caps.append(state.cap)
    assert caps[0] == CFG.ceiling - 2 == 28  # 60% of 50 steps, less one step
    changes = [t for t, (a, b) in enumerate(zip([None] + caps, caps)) if a != b]
    assert all(b - a >= 3 for a, b in zip(changes, changes[1:]))  # >= 30 s apart (ticks of 10 s)
    assert min(c for c in caps if c is not None) == CFG.floor_steps and caps[-1] == 8
    assert state.threatened and state.reason == "at floor"


def test_hold_in_the_band_and_lift_as_load_falls():
    state = SLOState(cap=20, last_change_at=0.0)
    held = update(SLOInput(now=100.0, projected_p95_s=0.8 * 300), CFG, state)  # between relax (0.7) and threaten
    assert held.cap == 20 and held.reason == "hold"
    caps = []
    for t in range(100, 1000, 30):
        state = update(SLOInput(now=float(t), projected_p95_s=100.0), CFG, state)
        caps.append(state.cap)
    assert caps[:3] == [22, 24, 26] and caps[-1] is None  # lifted once at the ceiling (30)
    assert gauges(state)["srserve_switch_cap_steps"] == -1


def test_observed_latencies_count_only_after_the_last_change():
    lat = [(float(t), 400.0) for t in range(0, 100)]  # all slow, finished before t = 100
    inp = SLOInput(now=150.0, latencies=lat)
    assert observed_p95(inp, CFG, since=None) == 400.0
    assert observed_p95(inp, CFG, since=120.0) is None  # too few since the change: no stale pressure
    state = update(inp, CFG, SLOState(cap=20, last_change_at=120.0))
    assert state.cap == 20 and state.reason == "no signal"
    fresh = SLOInput(now=200.0, latencies=lat + [(float(t), 100.0) for t in range(150, 200, 5)])
    assert update(fresh, CFG, SLOState(cap=20, last_change_at=120.0)).cap == 22


def test_config_checks():
    with pytest.raises(ValueError, match="hysteresis"):
        SLOConfig(p95_target_s=10, floor_steps=4, relax_ratio=0.95, threaten_ratio=0.9)
    with pytest.raises(ValueError, match="floor_steps"):
        SLOConfig(p95_target_s=10, floor_steps=0)


def test_apply_cap_to_adaptive_default_and_client():
    r = apply_cap("adaptive", 12, 50, CFG, client_fixed=False)
    assert r.capped and r.switch == "adaptive:0.01:max=12" and r.cap_steps == 12
    assert parse_policy(r.switch).bounds(50) == (5, 12)
    # a client's adaptive is a bound, not a fixed point: it is capped too, its own min kept
    r = apply_cap("adaptive:0.02:min=6:max=30", 12, 50, CFG, client_fixed=True)
    assert r.switch == "adaptive:0.02:min=6:max=12"
    # never below the policy's own min
    r = apply_cap("adaptive:0.02:min=14", 10, 50, CFG, client_fixed=True)
    assert parse_policy(r.switch).bounds(50) == (14, 14)
    # a cap above the rule's own max changes nothing
    r = apply_cap("adaptive", 40, 50, CFG, client_fixed=False)
    assert not r.capped and r.switch == "adaptive:0.01"
    assert apply_cap("adaptive", None, 50, CFG, client_fixed=False).record() == {
        "switch_cap": None, "switch_requested": "adaptive:0.01", "switch_applied": "adaptive:0.01"}


def test_a_clients_fixed_switch_is_never_overridden():
    for switch in ("step:30", "ratio:0.8", "none", "small-only"):
        r = apply_cap(switch, 8, 50, CFG, client_fixed=True)
        assert not r.capped and r.switch == str(parse_policy(switch))
    # the same fixed policy as the model's default (not the client's): step:K is capped
    assert apply_cap("step:30", 8, 50, CFG, client_fixed=False).switch == "step:8"
    assert apply_cap("none", 8, 50, CFG, client_fixed=False).switch == "none"


def test_cap_scales_with_the_requests_steps():
    assert apply_cap("adaptive", 12, 25, CFG, client_fixed=False).cap_steps == 6
    assert apply_cap("adaptive", 12, 100, CFG, client_fixed=False).switch.endswith(":max=24")


def test_projection_from_queues():
    stages = {"sketch": StageInput(replicas=2, queued=4, in_flight=2, step_seconds=5.0),
              "render": StageInput(replicas=1, queued=0, in_flight=1, step_seconds=0.85)}
    proj = project_p95(stages, switch_step=16, num_steps=50, tail_factor=1.0)
    # ahead of a new request: the queue, plus one when every server is busy
    assert proj == pytest.approx(((4 + 1) / 2 + 1) * 80 + ((0 + 1) / 1 + 1) * 34 * 0.85)
    # an earlier switch projects a shorter latency: the lever the controller pulls
    assert project_p95(stages, switch_step=10, num_steps=50) < project_p95(stages, switch_step=16, num_steps=50)
    assert project_p95({"decode": StageInput(replicas=1)}, None, None) is None
    g = gauges(SLOState(cap=12, threatened=True, projected_p95_s=proj))
    assert g["srserve_switch_cap_steps"] == 12 and g["srserve_slo_threatened"] == 1.0
    assert math.isnan(g["srserve_slo_observed_p95_seconds"])
