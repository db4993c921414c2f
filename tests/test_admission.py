"""Cost-aware admission: the cost model, quotas per key, the per-request ceiling and deadline refusals."""
from __future__ import annotations

import math
import time

import pytest

from srserve.pipeline.card import ModelCard
from srserve.serving import admission
from srserve.serving.admission import Prices, Shape
from srserve.serving.args import AdmissionOptions
from srserve.serving.jobs import SQLiteJobStore

CARD = ModelCard(name="srd-tiny", fps=8, default_num_frames=17, default_height=64, default_width=64,
                 default_steps=30, default_switch="adaptive:0.02:min=6", frame_stride=4, size_multiple=16)
OPTIONS = AdmissionOptions()
CAPACITY = {"encode": 1, "sketch": 1, "render": 1, "decode": 1}


def prices() -> Prices:
    o = OPTIONS
    return Prices(o.sketch_s_per_token_step, o.render_s_per_token_step, o.encode_s, o.decode_s_per_token,
                  o.attention_tokens, o.learn_rate)


def generation(size=(64, 64), frames=17, steps=30, switch="adaptive:0.02:min=6", guidance=5.0) -> dict:
    return {"prompt": "p", "width": size[0], "height": size[1], "num_frames": frames, "num_inference_steps": steps,
            "switch": switch, "guidance_scale": guidance, "guidance_scale_2": guidance}


def estimate(**kw) -> dict:
    return prices().estimate(admission.request_shape(generation(**kw), CARD, OPTIONS.adaptive_sketch_fraction))


# --- the cost model ---------------------------------------------------------------------------------------
def test_latent_tokens_follow_the_vae_strides_and_the_patch():
    assert admission.latent_tokens(CARD, 17, 64, 64) == 5 * 4 * 4
    assert admission.latent_tokens(CARD, 65, 256, 256) == 17 * 16 * 16
    assert admission.latent_tokens(CARD, 1, 16, 32) == 1 * 1 * 2


@pytest.mark.parametrize("switch, expected", [
    ("none", 40), ("small-only", 0), ("step:12", 12), ("step:99", 40), ("ratio:0.25", 30), ("ratio:1", 0),
    ("adaptive:0.01", 0.32 * 40), ("adaptive:0.01:min=20", 20), ("adaptive:0.01:max=5", 5)])
def test_sketch_steps_per_switch_policy(switch, expected):
    assert admission.expected_sketch_steps(switch, 40, 0.32) == pytest.approx(expected)


def test_default_request_costs_what_srd_tiny_measured():
    """The config's prices reproduce the benchmark they came from: 30 steps at 64x64x17, k = 10 (REPORT.md:
    sketch 0.634 s at 63.4 ms per step, render 0.331 s, decode 0.306 s, encode 0.028 s)."""
    cost = estimate(switch="step:10")
    assert cost["sketch"] == pytest.approx(0.634, rel=0.05)
    assert cost["render"] == pytest.approx(0.331, rel=0.05)
    assert cost["decode"] == pytest.approx(0.306, rel=0.05) and cost["encode"] == pytest.approx(0.03)
    assert cost[admission.SWITCH] == pytest.approx(10 / 30)


def test_cost_scales_with_steps_tokens_and_guidance():
    base, double = estimate(switch="none", steps=20), estimate(switch="none", steps=40)
    assert double["sketch"] == pytest.approx(2 * base["sketch"]) and base["render"] == 0
    assert double["decode"] == base["decode"] and double["encode"] == base["encode"]
    # 4x the tokens: more than 4x a step (attention's quadratic part), exactly 4x the decode
    big = estimate(switch="none", steps=20, size=(128, 128))
    assert big["sketch"] > 4 * base["sketch"] and big["decode"] == pytest.approx(4 * base["decode"])
    assert estimate(switch="none", steps=20, guidance=1.0)["sketch"] == pytest.approx(base["sketch"] / 2)
    small = estimate(switch="small-only", steps=20)
    assert small["sketch"] == 0 and 0 < small["render"] < base["sketch"]
    assert admission.total(base) == pytest.approx(base["encode"] + base["sketch"] + base["decode"])


def test_prices_learn_fast_down_slow_up_and_stay_bounded():
    p = prices()
    shape = Shape(tokens=80, steps=30, sketch_steps=10)
    units = p.units(shape)["sketch"]
    base = p.sketch
    p.learn(shape, {"sketch": base * units / 2}, sketch_steps=10)  # measured twice as fast
    fell = base - p.sketch
    assert 0 < p.sketch < base
    p.sketch = base
    p.learn(shape, {"sketch": base * units * 1.5}, sketch_steps=10)  # as much slower: waiting inflates it
    assert 0 < p.sketch - base < fell
    for _ in range(200):
        p.observe("sketch", 1e6, units)
    assert p.sketch == pytest.approx(base * p.bounds)
    p.learn(shape, {"render": 1.0}, sketch_steps=30)  # all 30 steps sketched: no render units, nothing learnt
    assert p.render == OPTIONS.render_s_per_token_step


def test_stage_times_from_the_events_that_rode_with_the_job():
    from srserve.serving.ingress import stage_times

    reports = [{"kind": "start", "stage": "sketch", "attempt": 2, "at": 10.0},
               {"kind": "end", "stage": "sketch", "attempt": 2, "at": 12.5},
               {"kind": "start", "stage": "render", "attempt": 1, "at": 1.0},  # an older attempt's
               {"kind": "end", "stage": "render", "attempt": 1, "at": 2.0},
               {"kind": "start", "stage": "decode", "attempt": 2, "at": 13.0}]  # never ended
    assert stage_times(reports, 2) == {"sketch": 2.5}


# --- what is left, and the projection -------------------------------------------------------------------
def test_remaining_follows_progress_through_the_stages():
    cost = {"encode": 1.0, "sketch": 9.0, "render": 6.0, "decode": 2.0, admission.SWITCH: 0.5}
    assert admission.remaining(cost, 0) == {"encode": 1.0, "sketch": 9.0, "render": 6.0, "decode": 2.0}
    mid_sketch = admission.remaining(cost, 5 + 45 // 2)
    assert mid_sketch["encode"] == 0 and 4 < mid_sketch["sketch"] < 5 and mid_sketch["render"] == 6.0
    assert admission.remaining(cost, 50)["sketch"] == 0 and admission.remaining(cost, 50)["render"] == 6.0
    assert admission.remaining(cost, 95) == {"encode": 0, "sketch": 0, "render": 0, "decode": 2.0}
    assert admission.total(admission.remaining(cost, 100)) == 0


def test_projection_shares_each_stage_between_jobs():
    own = {"sketch": 10.0, "render": 2.0}
    assert admission.projected_s(own, [], CAPACITY) == 12.0
    others = [{"sketch": 100.0}, {"sketch": 4.0, "render": 50.0}]
    # sketch: 10 + min(100, 10) + min(4, 10) = 24; render: 2 + min(50, 2) = 4
    assert admission.projected_s(own, others, CAPACITY) == pytest.approx(28.0)
    assert admission.projected_s(own, others, {**CAPACITY, "sketch": 4, "render": 2}) == pytest.approx(10 + 2)
    assert admission.merged({"encode": 1, "sketch": 2, "render": 3, "decode": 4}) == {"colocated": 10}


def test_four_max_size_jobs_leave_room_for_a_default_one_but_not_a_fifth():
    """The probe's case: four 256x256x65, 100-step `none` jobs in flight; job_timeout_s 1800."""
    big = estimate(size=(256, 256), frames=65, steps=100, switch="none")
    default = estimate()
    assert 400 < big["sketch"] < 900  # the probe projected ~2,500 s for four
    ahead = [admission.remaining(big, 0) for _ in range(4)]
    own_default, own_big = admission.remaining(default, 0), admission.remaining(big, 0)
    assert admission.check_deadline(own_default, [], ahead, CAPACITY, 1800, "num_inference_steps") is None
    refusal = admission.check_deadline(own_big, [], ahead, CAPACITY, 1800, "num_inference_steps")
    assert refusal.status == 503 and refusal.code == "deadline_unreachable" and "1800" in refusal.message
    projected = admission.projected_s(own_big, ahead, CAPACITY)
    assert refusal.retry_after_s == math.ceil(projected - 1800)
    # the same queue made of the caller's own jobs: 429 (slow down), not 503 (the server is full)
    mine = admission.check_deadline(own_big, ahead[:3], ahead[3:], CAPACITY, 1800, "num_inference_steps")
    assert mine.status == 429 and "your jobs" in mine.message
    # a job that cannot finish in time even on an idle server is the request's fault: 422 naming the field
    alone = admission.check_deadline(own_big, [], [], CAPACITY, 60, "deadline_s")
    assert alone.status == 422 and alone.param == "deadline_s" and alone.message.startswith("deadline_s:")


def test_cost_ceiling_names_the_field_that_grows_the_cost_most():
    assert admission.check_ceiling(estimate(), 100.0, generation(), CARD, "64x64") is None
    for kw, param in ((dict(steps=100), "num_inference_steps"), (dict(size=(256, 256)), "size"),
                      (dict(frames=129, steps=40), "num_frames")):
        refusal = admission.check_ceiling(estimate(**kw), 1.0, generation(**kw), CARD, "WxH")
        assert refusal.status == 422 and refusal.param == param and refusal.code == "cost_too_high"
        for text in ("max_request_cost_s=1", "size", "num_frames", "num_inference_steps"):
            assert text in refusal.message


# --- quotas ------------------------------------------------------------------------------------------------
def test_quota_in_flight_per_minute_and_cost():
    now = 1000.0
    kw = dict(recent=[], cost_in_flight=0.0, own_cost=1.0, soonest_s=2.5, now=now)
    assert admission.check_quota({"max_in_flight": 2}, in_flight=1, **kw) is None
    r = admission.check_quota({"max_in_flight": 2}, in_flight=2, **kw)
    assert (r.status, r.code, r.retry_after_s) == (429, "quota_in_flight", 3) and "max_in_flight=2" in r.message
    recent = [950.0, 970.0, 990.0]
    r = admission.check_quota({"max_per_minute": 3}, in_flight=0, **{**kw, "recent": recent})
    assert r.code == "quota_per_minute" and "max_per_minute=3" in r.message
    assert r.retry_after_s == 10  # 950 leaves the window at 1010
    r = admission.check_quota({"max_per_minute": 2}, in_flight=0, **{**kw, "recent": recent})
    assert r.retry_after_s == 30  # two must leave: 970 does at 1030
    assert admission.check_quota({"max_per_minute": 4}, in_flight=0, **{**kw, "recent": recent}) is None
    r = admission.check_quota({"max_cost_in_flight": 10.0}, in_flight=1, **{**kw, "cost_in_flight": 9.5})
    assert (r.status, r.code, r.retry_after_s) == (429, "quota_cost", 1) and "max_cost_in_flight=10" in r.message
    r = admission.check_quota({"max_cost_in_flight": 0.5}, in_flight=0, **kw)
    assert r.status == 422 and r.code == "quota_cost"  # never admissible: not a matter of waiting
    assert admission.check_quota({"max_in_flight": None, "max_per_minute": None}, in_flight=99, **kw) is None


def new_job(store, job_id, tenant="alice", cost=None, created_at=None, **kw):
    est = estimate()
    record = {"id": job_id, "created_at": created_at or time.time(), "model": "m", "tenant": tenant,
              "request": {"generation": generation(), "fps": 8, "seconds": "2", "size": "64x64"},
              "owner": "ingress-a", "lease_until": time.time() + 30, "cost": admission.total(est) if cost is None
              else cost, "estimate": est}
    return store.create(record, **kw)


@pytest.fixture
def store(tmp_path):
    return SQLiteJobStore(str(tmp_path / "jobs.sqlite"))


def test_store_checks_quotas_per_key_atomically(store):
    quota = {"max_in_flight": 2, "max_per_minute": 60, "max_cost_in_flight": None}
    assert new_job(store, "a1", quota=quota)["tenant"] == "alice"
    assert new_job(store, "a2", quota=quota) is not None
    refused = new_job(store, "a3", quota=quota)["refused"]
    assert refused["status"] == 429 and refused["code"] == "quota_in_flight" and refused["retry_after_s"] >= 1
    assert store.get("a3") is None  # refused: not inserted
    assert new_job(store, "b1", tenant="bob", quota=quota) is not None  # another key has its own quota
    store.begin_attempt("a1", "x", 30.0)
    store.fail("a1", 1, "generation_failed", "boom")
    assert "refused" not in new_job(store, "a3", quota=quota)  # a finished job frees its slot
    assert new_job(store, "a4") is not None  # without a quota (no auth): only the global limit
    assert new_job(store, "a5", max_active=3) is None


def test_per_minute_window_is_durable_and_shared(tmp_path):
    """Counted from created_at in the store: a second replica's store handle (a restart) sees the same window,
    deleted jobs still count, and Retry-After is when the oldest job in the window leaves it."""
    path = str(tmp_path / "jobs.sqlite")
    first = SQLiteJobStore(path)
    now = time.time()
    quota = {"max_in_flight": None, "max_per_minute": 2}
    new_job(first, "old", created_at=now - 61, quota=quota)  # outside the window
    new_job(first, "w1", created_at=now - 50, quota=quota)
    new_job(first, "w2", created_at=now - 20, quota=quota)
    first.delete("w2")
    again = SQLiteJobStore(path)
    refused = new_job(again, "w3", quota=quota)["refused"]
    assert refused["code"] == "quota_per_minute" and "max_per_minute=2" in refused["message"]
    assert refused["retry_after_s"] in (10, 11)  # w1 leaves the window 10 s from now
    assert new_job(again, "w3", tenant="bob", quota=quota) is not None


def test_store_refuses_the_cost_in_flight_and_the_deadline(store):
    big = {**estimate(size=(256, 256), frames=65, steps=100, switch="none")}
    quota = {"max_cost_in_flight": 2 * admission.total(big) + 1}
    for i in range(2):
        assert "refused" not in store.create(_record(f"big{i}", big), quota=quota)
    refused = store.create(_record("big2", big), quota=quota)["refused"]
    assert refused["code"] == "quota_cost" and refused["status"] == 429
    # two such jobs in flight (~635 s of sketching each): a third would finish after ~1,900 s
    deadline = {"deadline_s": 1800, "capacity": CAPACITY, "param": "num_inference_steps"}
    refused = store.create(_record("big3", big, tenant="bob"), deadline=deadline)["refused"]
    assert refused["status"] == 503 and refused["code"] == "deadline_unreachable" and refused["retry_after_s"] > 0
    assert store.create(_record("big3", big), deadline=deadline)["refused"]["status"] == 429  # alice's own jobs
    assert "refused" not in store.create(_record("big3", big, tenant="bob"), deadline={**deadline,
                                                                                        "deadline_s": 2000})
    assert "refused" not in store.create(_record("small", estimate(), tenant="carol"), deadline=deadline)
    colocated = {**deadline, "colocated": True, "capacity": {"colocated": 1}}
    assert store.create(_record("big5", big, tenant="carol"), deadline=colocated)["refused"]["status"] == 503
    two = {**colocated, "capacity": {"colocated": 2}}
    assert "refused" not in store.create(_record("big5", big, tenant="carol"), deadline=two)


def _record(job_id, est, tenant="alice"):
    return {"id": job_id, "created_at": time.time(), "model": "m", "tenant": tenant, "request": {},
            "owner": "i", "lease_until": time.time() + 30, "cost": admission.total(est), "estimate": est}


def test_refusals_become_api_errors_with_retry_after():
    from srserve.serving.ingress import refused

    err = refused({"status": 429, "code": "quota_per_minute", "message": "m", "retry_after_s": 7, "param": None})
    assert err.status == 429 and err.type == "rate_limit_error" and err.headers == {"Retry-After": "7"}
    err = refused({"status": 503, "code": "deadline_unreachable", "message": "m", "retry_after_s": 30})
    assert err.type == "server_error" and err.headers["Retry-After"] == "30"
    err = refused({"status": 422, "code": "cost_too_high", "message": "size: m", "param": "size"})
    assert err.param == "size" and err.headers == {} and err.body()["error"]["code"] == "cost_too_high"


def test_the_ingress_learns_prices_from_completed_jobs():
    """The driver's on_completed hook: a job that sketched faster than priced lowers the sketch price."""
    from types import SimpleNamespace

    from srserve.serving.args import AppArgs
    from srserve.serving.ingress import Ingress

    job = {"request": {"generation": generation(switch="step:10")}}
    fake = SimpleNamespace(args=AppArgs(), model=CARD, prices=prices(),
                           driver=SimpleNamespace(view=lambda job_id: job if job_id == "v1" else None))
    before = fake.prices.sketch
    reports = [{"kind": "start", "stage": "sketch", "attempt": 1, "at": 0.0},
               {"kind": "end", "stage": "sketch", "attempt": 1, "at": 0.2}]  # priced ~0.63 s
    Ingress._completed(fake, "v1", 1, {"reports": reports, "switch_step": 10})
    assert fake.prices.sketch < before and fake.prices.render == OPTIONS.render_s_per_token_step
    Ingress._completed(fake, "unknown", 1, {"reports": reports, "switch_step": 10})  # not driven here: no-op
