"""The SLO-driven switch point wired into serving: its args, the ingress-side controller, what a job records, and
its gauges. Without Ray (the ingress's create runs on a bare instance over the real SQLite store)."""
from __future__ import annotations

import asyncio
import math
import pytest
from pydantic import ValidationError

from srserve.api.auth import ANONYMOUS
from srserve.api.protocol import VideoCreateBody
from srserve.pipeline.switch import parse_policy
from srserve.serving import admission
from srserve.serving.args import AppArgs, SLOOptions
from srserve.serving.jobs import SQLiteJobStore
from srserve.serving.switch_cap import SwitchCapController
from tests.fakes import FakeStoreHandle

SLO = {"p95_target_s": 10.0, "floor_steps": 6, "reference_steps": 30, "step": 4, "interval_s": 0.0,
       "min_samples": 3, "window_s": 60.0}


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- args ---------------------------------------------------------------------------------------------------
def test_no_slo_by_default_and_options_convert_to_the_controller_config():
    assert AppArgs().slo is None
    options = AppArgs.model_validate({"slo": {"p95_target_s": 60, "floor_steps": 8}}).slo
    assert options.tick_s == 5.0 and options.reference_steps is None
    config = options.config(default_steps=40)  # null reference_steps: the model's default N
    assert config.reference_steps == 40 and config.floor_steps == 8 and config.ceiling == 24
    assert SLOOptions(**SLO).config(50).reference_steps == 30  # an explicit one wins


@pytest.mark.parametrize("slo, field", [
    ({"p95_target_s": 10, "floor_steps": 0}, "floor_steps"),
    ({"p95_target_s": 10, "floor_steps": 40, "reference_steps": 30}, "floor_steps"),
    ({"p95_target_s": 0, "floor_steps": 4}, "p95_target_s"),
    ({"p95_target_s": 10, "floor_steps": 4, "relax_ratio": 0.95}, "relax_ratio"),
    ({"p95_target_s": 10, "floor_steps": 8, "ceiling_steps": 4}, "ceiling_steps"),
    ({"p95_target_s": 10, "floor_steps": 4, "tick_s": 0}, "tick_s"),
    ({"p95_target_s": 10, "floor_steps": 4, "target": 3}, "target"),
])
def test_bad_slo_options_name_the_field(slo, field):
    with pytest.raises(ValidationError) as err:
        AppArgs.model_validate({"slo": slo})
    assert field in str(err.value)


# --- the controller -----------------------------------------------------------------------------------------
def test_slow_completions_lower_the_cap_to_the_floor_and_fast_ones_lift_it():
    clock, states = Clock(), []
    ctl = SwitchCapController(SLOOptions(**SLO).config(30), clock, on_state=states.append)
    assert ctl.tick().cap is None and ctl.state.reason == "no signal"  # nothing observed yet
    caps = []
    for _ in range(6):
        clock.now += 5
        for _ in range(3):
            ctl.completed(created_at=clock.now - 30.0)  # 30 s end to end against a 10 s target
        caps.append(ctl.tick().cap)
    assert caps[:2] == [14, 10] and caps[-1] == 6  # from the ceiling (60% of 30 = 18), one step per tick
    assert ctl.state.threatened and states[-1] is ctl.state
    assert ctl.gauges()["srserve_switch_cap_steps"] == 6.0
    clock.now += 61  # the slow jobs leave the window; fast ones lift the cap again
    for _ in range(5):
        for _ in range(3):
            ctl.completed(created_at=clock.now - 1.0)
        ctl.tick()
        clock.now += 5
    assert ctl.state.cap is None and ctl.gauges()["srserve_switch_cap_steps"] == -1.0


def test_projections_count_once_each_tick():
    clock = Clock()
    ctl = SwitchCapController(SLOOptions(**SLO).config(30), clock)
    ctl.projected(50.0)
    ctl.projected(None)  # deadline checks off: nothing
    state = ctl.tick()
    assert state.projected_p95_s == 50.0 and state.cap == 14
    assert ctl.tick().projected_p95_s is None  # no creates since: no projection
    assert math.isnan(ctl.gauges()["srserve_slo_projected_p95_seconds"])


def test_the_cap_applies_to_defaults_and_adaptive_never_to_a_clients_fixed_switch():
    ctl = SwitchCapController(SLOOptions(**SLO).config(30), Clock())
    ctl.state = ctl.state.__class__(cap=8)
    adaptive = ctl.cap("adaptive:0.02:min=3", 30, client_fixed=False)
    assert adaptive.capped and parse_policy(adaptive.switch).bounds(30) == (3, 8)
    assert adaptive.record() == {"switch_cap": 8, "switch_requested": "adaptive:0.02:min=3",
                                 "switch_applied": "adaptive:0.02:min=3:max=8"}
    fixed = ctl.cap("step:20", 30, client_fixed=True)
    assert not fixed.capped and fixed.switch == "step:20" and fixed.record()["switch_cap"] == 8
    assert ctl.cap("step:20", 30, client_fixed=False).switch == "step:8"  # the model's default step:K
    assert ctl.cap("step:20", 60, client_fixed=False).switch == "step:16"  # the cap scales with N


# --- the ingress's create and completion hook, on a bare instance over the real store ------------------------
class _Driver:
    def __init__(self) -> None:
        self.driven: dict[str, dict] = {}

    def drive(self, job_id: str, record: dict) -> None:
        self.driven[job_id] = record

    def view(self, job_id: str) -> dict | None:
        return self.driven.get(job_id)


def _ingress(tmp_path, slo: dict | None, clock: Clock):
    from srserve.serving.ingress import Ingress, model_info
    from srserve.serving.metrics import JobMetrics
    from srserve.sim.spec import BUNDLE_DIR

    args = AppArgs.model_validate({"model": str(BUNDLE_DIR / "wan2.1-sim-h100"), "slo": slo,
                                   "job_store_path": str(tmp_path / "jobs.sqlite")})
    class Bare(Ingress):
        def __del__(self) -> None:  # nothing was started: no driver or sweeper to stop
            pass

    ingress = object.__new__(Bare)
    a = args.admission
    ingress.args, ingress.model, ingress.owner = args, model_info(args), "ingress-a"
    ingress.prices = admission.Prices(a.sketch_s_per_token_step, a.render_s_per_token_step, a.encode_s,
                                      a.decode_s_per_token, a.attention_tokens, a.learn_rate)
    ingress._capacity = (float("inf"), ingress._configured_capacity())  # never read serve.status()
    ingress.jobs, ingress.driver = JobMetrics(ingress.model.name), _Driver()
    ingress.store = FakeStoreHandle(SQLiteJobStore(args.job_store_path))
    ingress.switch_cap = ingress._switch_cap()
    if ingress.switch_cap is not None:
        ingress.switch_cap.clock = clock
    return ingress


def _create(ingress, **fields) -> dict:
    body = VideoCreateBody(prompt="a cat", size="128x64", num_frames=9, **fields)  # cheap at the default prices
    video = asyncio.run(ingress.create(body, ANONYMOUS))
    return ingress.store.store.get(video.id)


def test_jobs_record_the_cap_and_the_switch_they_run(tmp_path):
    clock = Clock()
    ingress = _ingress(tmp_path, {**SLO, "reference_steps": None}, clock)  # the sim's default: 50 steps
    assert ingress.switch_cap.config.reference_steps == 50
    first = _create(ingress)  # no cap yet
    assert first["switch_cap"] is None and first["switch_applied"] == first["switch_requested"] == "adaptive:0.01"
    assert "projected_s" not in first and first["request"]["generation"]["switch"] == "adaptive:0.01"
    assert ingress.switch_cap._projections, "admission's projection reached the controller"
    for _ in range(3):  # three jobs took 60 s against a 10 s target
        ingress.driver.driven[f"slow{_}"] = {**first, "created_at": clock.now - 60.0}
        ingress._on_completed(f"slow{_}", 1, {"reports": []})
    assert ingress.switch_cap.tick().cap == 26  # from the ceiling (30 of 50), one step of 4
    capped = _create(ingress)
    assert capped["switch_cap"] == 26 and capped["switch_applied"] == "adaptive:0.01:max=26"
    assert capped["request"]["generation"]["switch"] == "adaptive:0.01:max=26"  # what the stages run
    fixed = _create(ingress, switch="step:40")  # the client's choice stands
    assert fixed["switch_cap"] == 26 and fixed["switch_applied"] == "step:40"
    assert fixed["request"]["generation"]["switch"] == "step:40"
    from srserve.serving.job_record import public_record
    assert {"switch_cap", "switch_requested", "switch_applied", "switch_step"} <= set(public_record(capped))


def test_without_slo_nothing_changes(tmp_path):
    ingress = _ingress(tmp_path, None, Clock())
    job = _create(ingress)
    assert ingress.switch_cap is None
    assert (job["switch_cap"], job["switch_requested"], job["switch_applied"]) == (None, None, None)
    assert job["request"]["generation"]["switch"] == "adaptive:0.01"


def test_a_floor_above_the_models_default_steps_fails_at_start(tmp_path):
    with pytest.raises(ValueError, match="floor_steps.*defaults to 50 steps"):
        _ingress(tmp_path, {"p95_target_s": 10, "floor_steps": 60}, Clock())


# --- gauges -------------------------------------------------------------------------------------------------
def test_the_controller_state_is_exported_as_gauges():
    from srserve.serving import metrics
    from srserve.serving.metrics import JobMetrics

    metrics.configure("prometheus", application="slo-test")
    try:
        ctl = SwitchCapController(SLOOptions(**SLO).config(30), Clock(),
                                  on_state=lambda s: JobMetrics("m").set_slo(ctl.gauges()))
        ctl.projected(50.0)
        ctl.tick()
        registry = metrics.registry()
        labels = {"application": "slo-test", "model": "m"}
        assert registry.get_sample_value("ray_srserve_switch_cap_steps", labels) == 14.0
        assert registry.get_sample_value("ray_srserve_slo_threatened", labels) == 1.0
        assert registry.get_sample_value("ray_srserve_slo_projected_latency_seconds", labels) == 50.0
        assert math.isnan(registry.get_sample_value("ray_srserve_slo_observed_latency_seconds", labels))
    finally:
        metrics.configure("auto")
