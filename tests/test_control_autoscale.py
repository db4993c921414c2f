"""Stage-ratio autoscaling on recorded inputs: needs, coupling through the switch step, delays, hysteresis, the
Serve adapter (with Serve's own wrapper and context classes; no Ray cluster)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from srserve.control import autoscale as a
from srserve.control.autoscale import (AutoscaleConfig, PipelineInput, StageInput, StageRatioPolicy, StageStats,
                                       decide, stage_need)

FAST = AutoscaleConfig(upscale_delay_s=0, downscale_delay_s=0, cooldown_s=0)


def _inputs(now=0.0, rate=0.1, k=16.0, n=50.0, **stages):
    base = {"sketch": StageInput(replicas=2, min_replicas=1, max_replicas=16, step_seconds=5.0),
            "render": StageInput(replicas=2, min_replicas=1, max_replicas=16, step_seconds=0.85)}
    base.update(stages)
    return PipelineInput(now=now, stages=base, arrival_rate=rate, switch_step=k, num_steps=n)


def test_need_follows_flow_and_the_switch_step():
    inp = _inputs(rate=0.1, k=16)
    sketch, _ = stage_need("sketch", inp, FAST)
    render, _ = stage_need("render", inp, FAST)
    assert sketch == pytest.approx(0.1 * 16 * 5.0 / 0.8)
    assert render == pytest.approx(0.1 * 34 * 0.85 / 0.8)
    # an earlier switch (a cap) moves work from sketch to render, in the same decision
    sketch2, _ = stage_need("sketch", _inputs(rate=0.1, k=10), FAST)
    render2, _ = stage_need("render", _inputs(rate=0.1, k=10), FAST)
    assert sketch2 < sketch and render2 > render
    replicas, _, why = decide(_inputs(rate=0.1, k=16), FAST, {})
    assert replicas == {"sketch": math.ceil(sketch), "render": math.ceil(render)}
    assert why["sketch"].cost_s == pytest.approx(80.0)


def test_backlog_is_drained_and_upstream_queues_count_downstream():
    cfg = AutoscaleConfig(upscale_delay_s=0, downscale_delay_s=0, cooldown_s=0, drain_horizon_s=100)
    inp = _inputs(rate=0.0, sketch=StageInput(replicas=1, max_replicas=16, queued=10, step_seconds=5.0))
    sketch, _ = stage_need("sketch", inp, cfg)
    render, _ = stage_need("render", inp, cfg)
    assert sketch == pytest.approx(10 * 80 / 100)
    assert render == pytest.approx(10 * 34 * 0.85 / 100)  # what waits at sketch will reach render
    uncoupled = AutoscaleConfig(upscale_delay_s=0, downscale_delay_s=0, cooldown_s=0, couple=False)
    assert stage_need("render", inp, uncoupled)[0] == 0


def test_without_costs_the_policy_follows_occupancy():
    inp = PipelineInput(now=0, stages={"decode": StageInput(replicas=1, max_replicas=4, in_flight=3, queued=1)})
    need, cost = stage_need("decode", inp, FAST)
    assert cost is None and need == pytest.approx(4 / 0.8)
    # measured seconds per request are used when the stage has no step seconds
    inp = PipelineInput(now=0, arrival_rate=0.5,
                        stages={"decode": StageInput(replicas=1, max_replicas=4, seconds_per_request=3.0)})
    assert stage_need("decode", inp, FAST) == (pytest.approx(0.5 * 3 / 0.8), 3.0)


def test_bounds_and_never_zero_with_work():
    inp = _inputs(rate=10.0)
    replicas, _, _ = decide(inp, FAST, {})
    assert replicas == {"sketch": 16, "render": 16}
    busy = PipelineInput(now=0, stages={"render": StageInput(replicas=1, min_replicas=0, max_replicas=4, queued=1,
                                                             seconds_per_request=1.0)})
    assert decide(busy, FAST, {})[0]["render"] == 1
    empty = PipelineInput(now=0, stages={"render": StageInput(replicas=2, min_replicas=0, max_replicas=4)})
    assert decide(empty, FAST, {})[0]["render"] == 0


def test_delays_and_cooldown():
    cfg = AutoscaleConfig(upscale_delay_s=30, downscale_delay_s=120, cooldown_s=60)
    stage = StageInput(replicas=2, max_replicas=16, step_seconds=5.0)
    state: dict = {}
    high = lambda t, r: PipelineInput(now=t, stages={"sketch": StageInput(**{**stage.__dict__, "replicas": r})},
                                      arrival_rate=0.1, switch_step=16, num_steps=50)  # need 10
    r = 2
    for t in (0, 10, 29):
        reps, state, why = decide(high(t, r), cfg, state)
        assert reps["sketch"] == 2 and "waiting" in why["sketch"].reason
    reps, state, _ = decide(high(30, r), cfg, state)
    assert reps["sketch"] == 10
    # the load drops at once: down waits for downscale_delay_s (and the cooldown)
    low = lambda t, r: PipelineInput(now=t, stages={"sketch": StageInput(**{**stage.__dict__, "replicas": r})},
                                     arrival_rate=0.01, switch_step=16, num_steps=50)  # need 1
    r = 10
    for t in (31, 100, 150):
        reps, state, _ = decide(low(t, r), cfg, state)
        assert reps["sketch"] == 10
    reps, state, _ = decide(low(151, r), cfg, state)
    assert reps["sketch"] == 2  # ceil(need 1.0 + hysteresis 0.5)
    # a wish that goes away resets its timer
    reps, state, _ = decide(high(152, 2), cfg, state)
    reps, state, _ = decide(low(170, 2), cfg, state)
    reps, state, _ = decide(high(200, 2), cfg, state)
    assert reps["sketch"] == 2 and state["sketch"].pending_since == 200


def _replay(cfg, needs):
    """Run the policy over a recorded need trace (one tick a second, two stages); the change times per stage."""
    state: dict = {}
    replicas = {"sketch": 3, "render": 3}
    changes: dict[str, list[int]] = {"sketch": [], "render": []}
    for t, need in enumerate(needs):
        stages = {"sketch": StageInput(replicas=replicas["sketch"], max_replicas=8, step_seconds=5.0),
                  "render": StageInput(replicas=replicas["render"], max_replicas=8, step_seconds=80 / 34)}
        # the rate at which both stages need `need` replicas (k = 16 of N = 50: 80 s of work each)
        inp = PipelineInput(now=float(t), stages=stages, arrival_rate=need * 0.8 / 80, switch_step=16, num_steps=50)
        new, state, _ = decide(inp, cfg, state)
        for s in new:
            if new[s] != replicas[s]:
                changes[s].append(t)
        replicas = new
    return changes


def _jitter(n, amplitude, seed=12345):
    out = []
    for _ in range(n):
        seed = (1103515245 * seed + 12345) % 2**31
        out.append((seed / 2**31 - 0.5) * 2 * amplitude)
    return out


@pytest.mark.parametrize("period,swing", [(None, 0.0), (20, 0.5), (70, 0.7), (150, 1.0)])
def test_load_hovering_at_a_threshold_changes_at_most_once_per_delay(period, swing):
    """30 minutes of a need hovering at the up threshold of 3 replicas (3.1, +-0.3 jitter every second, plus a swing
    of the given period): the policy changes a stage at most once per upscale delay; without delays and hysteresis
    the same trace flaps hundreds of times."""
    cfg = AutoscaleConfig(upscale_delay_s=30, downscale_delay_s=60)
    needs = [3.1 + (swing * math.sin(2 * math.pi * t / period) if period else 0.0) + j
             for t, j in enumerate(_jitter(1800, 0.3))]
    for s, times in _replay(cfg, needs).items():
        gaps = [b - a_ for a_, b in zip(times, times[1:])]
        assert all(g >= cfg.upscale_delay_s for g in gaps), (s, times)
        assert len(times) <= 1800 / cfg.upscale_delay_s
    naive = AutoscaleConfig(upscale_delay_s=0, downscale_delay_s=0, cooldown_s=0, up_tolerance=0,
                            down_hysteresis=0)
    assert len(_replay(naive, needs)["sketch"]) > 100


def test_a_swinging_load_is_followed_with_changes_spaced_by_the_delay():
    """A need swinging between 1.5 and 4.5 replicas over 10-minute periods, with +-0.3 jitter: the stages follow it
    up and down, and consecutive changes are at least a delay apart."""
    cfg = AutoscaleConfig(upscale_delay_s=30, downscale_delay_s=60)
    needs = [3.0 + 1.5 * math.sin(2 * math.pi * t / 600) + j for t, j in enumerate(_jitter(1800, 0.3))]
    changes = _replay(cfg, needs)
    for s, times in changes.items():
        assert len(times) >= 4, (s, times)  # up and down, every period
        gaps = [b - a_ for a_, b in zip(times, times[1:])]
        assert all(g >= cfg.upscale_delay_s for g in gaps), (s, times)


def test_hysteresis_band_holds_a_need_between_thresholds():
    for need_target, replicas in ((2.05, 2), (2.6, 3), (1.6, 2)):
        stages = {"sketch": StageInput(replicas=replicas, max_replicas=8, step_seconds=5.0)}
        inp = PipelineInput(now=0, stages=stages, arrival_rate=need_target * 0.8 / 80, switch_step=16, num_steps=50)
        assert decide(inp, FAST, {})[0]["sketch"] == replicas


# --- the Serve adapter -------------------------------------------------------------------------------------------
def _ctx(name, target, metrics, *, queued=0.0, running=0.0, lo=1, hi=16, now=1000.0, state=None):
    return SimpleNamespace(deployment_name=name, deployment_id=("default", name), target_num_replicas=target,
                           current_num_replicas=target, capacity_adjusted_min_replicas=lo,
                           capacity_adjusted_max_replicas=hi, aggregated_metrics=metrics,
                           total_queued_requests=queued, total_num_requests=queued + running, current_time=now,
                           policy_state=state or {})


RECORDED = {  # a recorded tick: per-replica averages as Serve aggregates them
    "Encode": {a.METRIC_ARRIVALS: {"e1": 0.1}, a.METRIC_IN_FLIGHT: {"e1": 0.1}, a.METRIC_SECONDS: {"e1": 0.9}},
    "Sketch": {a.METRIC_QUEUED: {"s1": 1.0, "s2": 0.0}, a.METRIC_IN_FLIGHT: {"s1": 1.0, "s2": 1.0},
               a.METRIC_STEP_SECONDS: {"s1": 5.0, "s2": 5.1}, a.METRIC_SWITCH_STEP: {"s1": 16.0, "s2": 15.0},
               a.METRIC_NUM_STEPS: {"s1": 50.0, "s2": 50.0}},
    "Render": {a.METRIC_IN_FLIGHT: {"r1": 1.0}, a.METRIC_STEP_SECONDS: {"r1": 2.3},
               a.METRIC_NUM_STEPS: {"r1": 50.0}},
    "Decode": {a.METRIC_IN_FLIGHT: {"d1": 0.0}, a.METRIC_SECONDS: {"d1": 6.4}},
}


def test_inputs_from_recorded_contexts():
    contexts = {("default", n): _ctx(n, 2 if n == "Sketch" else 1, m, queued=2.0 if n == "Sketch" else 0.0)
                for n, m in RECORDED.items()}
    inp, ids = a.inputs_from_contexts(contexts, a.DEFAULT_DEPLOYMENTS)
    assert ids == {"encode": ("default", "Encode"), "sketch": ("default", "Sketch"),
                   "render": ("default", "Render"), "decode": ("default", "Decode")}
    assert inp.arrival_rate == 0.1 and inp.switch_step == 15.5 and inp.num_steps == 50.0
    assert inp.stages["sketch"].queued == 3.0  # 2 at the handles + 1 inside a replica
    assert inp.stages["sketch"].in_flight == 2.0 and inp.stages["sketch"].step_seconds == pytest.approx(5.05)
    assert inp.now == 1000.0
    # no custom metrics yet: Serve's own counts
    bare = {("default", "Render"): _ctx("Render", 1, None, queued=4, running=1)}
    inp, _ = a.inputs_from_contexts(bare, a.DEFAULT_DEPLOYMENTS)
    assert inp.stages["render"].queued == 4 and inp.stages["render"].in_flight == 1


def test_policy_adapter_returns_decisions_and_state_per_deployment():
    policy = StageRatioPolicy(upscale_delay_s=10, downscale_delay_s=60)
    contexts = {("default", n): _ctx(n, 1, m) for n, m in RECORDED.items()}
    decisions, states = policy(contexts)
    assert set(decisions) == set(contexts) and all(v == 1 for v in decisions.values())  # waiting: delay
    assert states[("default", "Sketch")][a.STATE_KEY]["pending"] > 1
    later = {k: _ctx(c.deployment_name, 1, RECORDED[c.deployment_name], now=1010.0, state=states[k])
             for k, c in contexts.items()}
    decisions, states = policy(later)
    assert decisions[("default", "Sketch")] == math.ceil(0.1 * 15.5 * 5.05 / 0.8 + 1 * 15.5 * 5.05 / 120 - 1e-9)
    assert decisions[("default", "Render")] > 1
    with pytest.raises(ValueError, match="unknown stages"):
        StageRatioPolicy(deployments={"X": "nope"})
    assert a.policy_config(upscale_delay_s=10)["policy_function"] == "srserve.control.autoscale:StageRatioPolicy"


def test_policy_runs_under_serves_own_app_level_wrapper():
    """Serve 2.60 wraps an application policy (`_apply_app_level_autoscaling_config`) and calls it with real
    AutoscalingContext objects keyed by DeploymentID; with the deployments' own delays at 0 our decision passes."""
    pytest.importorskip("ray.serve")
    from ray.serve._private.common import DeploymentID
    from ray.serve.autoscaling_policy import _apply_app_level_autoscaling_config
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    config = AutoscalingConfig(**a.deployment_autoscaling_config(1, 8))
    wrapped = _apply_app_level_autoscaling_config(StageRatioPolicy(upscale_delay_s=0, cooldown_s=0))

    def contexts(states):
        out = {}
        for name, metrics in RECORDED.items():
            dep = DeploymentID(name=name, app_name="default")
            out[dep] = AutoscalingContext(
                deployment_id=dep, deployment_name=name, app_name="default", current_num_replicas=1,
                target_num_replicas=1, running_replicas=[], total_num_requests=1.0, total_queued_requests=0.0,
                aggregated_metrics=metrics, raw_metrics={}, capacity_adjusted_min_replicas=1,
                capacity_adjusted_max_replicas=8, policy_state=states.get(dep, {}), last_scale_up_time=None,
                last_scale_down_time=None, current_time=1000.0, config=config)
        return out

    decisions, states = wrapped(contexts({}))
    sketch = DeploymentID(name="Sketch", app_name="default")
    assert decisions[sketch] > 1 and a.STATE_KEY in states[sketch]
    decisions2, _ = wrapped(contexts(states))
    assert decisions2[sketch] == decisions[sketch]


def test_stage_stats_snapshot():
    clock = iter([0.0, 1.0, 2.0, 3.0]).__next__
    stats = StageStats(window_s=10, clock=clock)
    stats.started()
    stats.started()
    stats.finished(4.0, switch_step=10, num_steps=50, step_seconds=0.4)
    stats.finished(6.0, switch_step=20)
    snap = stats.snapshot(queued=2, in_flight=1)
    assert snap[a.METRIC_QUEUED] == 2 and snap[a.METRIC_IN_FLIGHT] == 1
    assert snap[a.METRIC_ARRIVALS] == pytest.approx(0.2)
    assert snap[a.METRIC_SECONDS] == pytest.approx(0.8 * 4 + 0.2 * 6)
    assert snap[a.METRIC_SWITCH_STEP] == pytest.approx(12.0) and snap[a.METRIC_NUM_STEPS] == 50
    assert all(isinstance(v, float) for v in snap.values())
