"""Job store, artifact store, app arguments and the runner's config handling (no Ray cluster needed)."""
from __future__ import annotations

import time

import numpy as np
import pytest
from pydantic import ValidationError

from srserve.serving.args import AppArgs
from srserve.serving.artifacts import ArtifactStore
from srserve.serving.jobs import SQLiteJobStore, stage_progress
from srserve.serving.runner import load_config, pool_resources
from fakes import FakeStoreHandle

REQUEST = {"generation": {"prompt": "a red circle moving right"}, "fps": 8, "seconds": "1", "size": "32x32"}


def new_job(store: SQLiteJobStore, job_id: str, owner: str = "ingress-a", lease_s: float = 30.0, **kw):
    record = {"id": job_id, "created_at": time.time(), "model": "m", "request": REQUEST, "owner": owner,
              "lease_until": time.time() + lease_s}
    return store.create(record, **kw)


@pytest.fixture
def store(tmp_path):
    return SQLiteJobStore(str(tmp_path / "db" / "jobs.sqlite"))


def test_lifecycle_records_stages_progress_and_switch(store):
    new_job(store, "v1")
    job = store.begin_attempt("v1", "ingress-a", 30.0)
    assert job["attempt"] == 1 and store.get("v1")["status"] == "queued"
    assert store.stage_started("v1", 1, "encode", "enc-1") is False
    assert store.get("v1")["status"] == "in_progress"
    assert store.stage_finished("v1", 1, "encode", {}) is False
    store.stage_started("v1", 1, "sketch", "sk-1")
    seen = []
    for step in range(1, 5):
        store.heartbeat("v1", 1, "sketch", step, 8)
        seen.append(store.get("v1")["progress"])
    store.stage_finished("v1", 1, "sketch", {"switch_step": 4})
    assert seen == sorted(seen) and 5 < seen[0] < seen[-1] < 95
    assert store.complete("v1", 1, {"artifacts": {"video.mp4": "x"}, "switch_step": 4}) == "completed"
    job = store.get("v1")
    assert job["status"] == "completed" and job["progress"] == 100 and job["switch_step"] == 4
    assert job["stages"]["sketch"]["replica"] == "sk-1" and job["stages"]["sketch"]["end"] is not None
    assert job["completed_at"] >= job["created_at"]


def test_stale_attempts_are_fenced_off(store):
    new_job(store, "v1")
    store.begin_attempt("v1", "a", 30.0)
    store.begin_attempt("v1", "b", 30.0)  # another driver took over: attempt 2
    assert store.stage_started("v1", 1, "sketch", "old") is True  # the zombie is told to stop
    assert store.heartbeat("v1", 1, "sketch", 1, 8) is True
    assert store.complete("v1", 1, {}) == "stale"
    assert store.mark_cancelled("v1") is False  # a superseded stage's stop is no cancellation
    assert store.retry_or_fail("v1", 1, "late news", 2) == "stale"
    assert store.stage_started("v1", 2, "sketch", "new") is False


def test_retries_are_bounded_then_fail_with_reason(store):
    new_job(store, "v1")
    for attempt in (1, 2, 3):
        store.begin_attempt("v1", "a", 30.0)
        store.stage_started("v1", attempt, "sketch", f"r{attempt}")
        verdict = store.retry_or_fail("v1", attempt, "RayActorError: replica died", 2)
        assert verdict == ("retry" if attempt < 3 else "failed")
    job = store.get("v1")
    assert job["status"] == "failed" and job["failures"] == 3 and len(job["history"]) == 3
    assert job["error"]["code"] == "retries_exhausted" and "replica died" in job["error"]["message"]
    assert store.begin_attempt("v1", "a", 30.0) is None


def test_orphans_are_claimed_after_the_lease_lapses(store):
    new_job(store, "queued-job", owner="dead", lease_s=-1)
    new_job(store, "running-job", owner="dead", lease_s=-1)
    new_job(store, "live-job", owner="alive", lease_s=30)
    store.begin_attempt("running-job", "dead", -1)
    store.stage_started("running-job", 1, "render", "r")
    claimed = store.claim_orphans("new", 30.0, max_retries=2)
    assert sorted(claimed) == ["queued-job", "running-job"]
    running = store.get("running-job")
    assert running["owner"] == "new" and running["failures"] == 1 and "driver dead was lost" in running["history"][0]
    assert store.get("queued-job")["failures"] == 0
    assert store.claim_orphans("other", 30.0, max_retries=2) == []  # leases renewed by the claim
    assert set(store.renew("new", ["running-job"], 30.0)) == {"running-job"}


def test_a_job_deleted_while_decoding_ends_cancelled(store):
    new_job(store, "v1")
    store.begin_attempt("v1", "a", 30.0)
    store.delete("v1")
    assert store.complete("v1", 1, {"artifacts": {"video.mp4": "x"}}) == "deleted"
    assert store.get("v1", include_deleted=True)["status"] == "cancelled"


def test_admission_limit_counts_queued_and_running(store):
    assert new_job(store, "a", max_active=2) is not None
    assert new_job(store, "b", max_active=2) is not None
    assert new_job(store, "c", max_active=2) is None
    store.begin_attempt("a", "x", 30.0)
    store.fail("a", 1, "generation_failed", "boom")
    assert new_job(store, "c", max_active=2) is not None


def test_delete_hides_and_cancels(store):
    new_job(store, "v1")
    store.begin_attempt("v1", "a", 30.0)
    store.stage_started("v1", 1, "sketch", "r")
    before = store.delete("v1")
    assert before["status"] == "in_progress"
    assert store.get("v1") is None and store.get("v1", include_deleted=True)["cancel_requested"]
    assert store.heartbeat("v1", 1, "sketch", 2, 8) is True  # the stage stops at its next step
    assert store.mark_cancelled("v1") is True
    assert store.get("v1", include_deleted=True)["status"] == "cancelled"
    assert store.delete("v1") is None and store.delete("nope") is None


def test_list_pages_in_both_orders(store):
    for i in range(5):
        new_job(store, f"v{i}")
    store.delete("v2")
    page, more = store.list(limit=2)
    assert [j["id"] for j in page] == ["v4", "v3"] and more
    page, more = store.list(after="v3", limit=2)
    assert [j["id"] for j in page] == ["v1", "v0"] and not more
    page, _ = store.list(order="asc", limit=10)
    assert [j["id"] for j in page] == ["v0", "v1", "v3", "v4"]


def test_records_survive_reopening(tmp_path):
    path = str(tmp_path / "jobs.sqlite")
    first = SQLiteJobStore(path)
    new_job(first, "v1")
    first.begin_attempt("v1", "a", 30.0)
    first.complete("v1", 1, {"artifacts": {"video.mp4": "p"}})
    del first
    again = SQLiteJobStore(path)
    assert again.get("v1")["status"] == "completed" and again.get("v1")["artifacts"] == {"video.mp4": "p"}


def test_progress_mapping():
    assert stage_progress("encode", 0, 1, False) == 0 and stage_progress("encode", 0, 1, True) == 5
    assert stage_progress("sketch", 0, 10, False) == 5 and stage_progress("render", 10, 10, True) == 95


def test_artifacts_round_trip_and_delete(tmp_path):
    store = ArtifactStore(str(tmp_path / "artifacts"))
    frames = np.random.default_rng(0).random((9, 32, 32, 3), dtype=np.float32)
    stored = store.write_outputs("video_1", frames, fps=8, save_frames=True)
    assert set(stored) == {"video.mp4", "thumbnail.webp", "spritesheet.jpg", "frames.npy"}
    npy = b"".join(store.read_chunks("video_1", "frames.npy"))
    import io

    assert np.array_equal(np.load(io.BytesIO(npy)), frames)
    assert b"".join(store.read_chunks("video_1", "thumbnail.webp"))[8:12] == b"WEBP"
    store.delete("video_1")
    assert not store.exists("video_1", "video.mp4")
    with pytest.raises(ValueError):
        store.put("../escape", "x", b"")


def test_app_args_validate_and_place_stages(tmp_path):
    args = AppArgs.model_validate({"sketch": {"num_replicas": 2}, "render": {"pool": "gpu_b", "num_gpus": 1}})
    assert args.sketch.pool == "sketch_pool"  # a stage keeps its own defaults when a config sets a few fields
    opts = args.render.deployment_options()
    assert opts["ray_actor_options"] == {"num_cpus": 0.0, "num_gpus": 1.0, "resources": {"gpu_b": 0.5}}
    assert args.resources_needed() == {"sketch_pool": 2.0, "gpu_b": 0.5, "render_pool": 0.5}
    with pytest.raises(ValidationError, match="max_batch_size"):
        AppArgs.model_validate({"sketch": {"max_batch_size": 0}})
    with pytest.raises(ValidationError, match="unknown_field|Extra inputs"):
        AppArgs.model_validate({"unknown_field": 1})
    with pytest.raises(ValidationError, match="lease_s"):
        AppArgs.model_validate({"watchdog": {"lease_s": 1, "interval_s": 1}})
    resolved = AppArgs(job_store_path="rel/jobs.sqlite", artifacts_url="s3://bucket/videos").resolved()
    assert resolved.job_store_path.startswith("/") and resolved.artifacts_url == "s3://bucket/videos"


def test_colocated_mode_places_one_deployment(tmp_path):
    args = AppArgs.model_validate({"mode": "colocated", "colocated": {"num_replicas": 2, "force_switch": "NONE"}})
    assert list(args.stages()) == ["colocated"] and args.colocated.force_switch == "none"
    assert args.resources_needed() == {"colocated_pool": 2.0}
    assert list(AppArgs().stages()) == ["encode", "sketch", "render", "decode"]
    with pytest.raises(ValidationError, match="force_switch"):
        AppArgs.model_validate({"mode": "colocated", "colocated": {"force_switch": "sometimes"}})
    with pytest.raises(ValidationError, match="mode"):
        AppArgs.model_validate({"mode": "both"})


def test_colocated_large_only_runs_in_process_without_the_render_model(tmp_path):
    """A Colocated replica outside Serve, with the real store behind a fake handle: `force_switch: none`."""
    import asyncio

    from srserve.config import GenerationRequest
    from srserve.pipeline.engine import SREngine
    from srserve.pipeline.spec import resolve_model_spec
    from srserve.serving.colocated import Colocated
    from srserve.serving.messages import StageMessage
    from srserve.tiny import default_model_path

    store = SQLiteJobStore(str(tmp_path / "jobs.sqlite"))
    new_job(store, "v1")
    store.begin_attempt("v1", "ingress-a", 30.0)
    replica = Colocated(default_model_path(), FakeStoreHandle(store), {"force_switch": "none", "torch_threads": 1},
                        str(tmp_path / "artifacts"))
    assert replica.render is None and "render" not in replica.sketch.engine.family.transformers
    request = GenerationRequest(prompt="a red circle moving right", seed=2, num_inference_steps=6,
                                num_frames=9, height=32, width=32, switch="adaptive")
    info = asyncio.run(replica(StageMessage("v1", 1, request, 8, True)))
    assert info["switch_step"] == 6 and set(info["artifacts"]) >= {"video.mp4", "frames.npy"}
    assert store.complete("v1", 1, info) == "completed"  # as the driver does: the stage events ride with info
    job = store.get("v1")
    assert set(job["stages"]) == {"encode", "sketch", "decode"} and job["step"] == 6
    assert all(s["end"] is not None and s["handoff"] is None for s in job["stages"].values())
    frames = np.load(info["artifacts"]["frames.npy"])
    engine = SREngine.load(resolve_model_spec(default_model_path()))
    expected = engine.generate(request.model_copy(update={"switch": "none"}))
    assert np.array_equal(frames, expected.frames)


@pytest.mark.parametrize("name", ["local.yaml", "wan2.1-t2v-14b-1.3b.yaml", "cogvideox-5b-2b.yaml"])
def test_shipped_configs_validate(name):
    config = load_config(f"deployments/{name}")
    for app in config["applications"]:
        assert app["import_path"] == "srserve.serving:build_app"
        AppArgs.model_validate(app["args"])
    resources = pool_resources(config)
    assert resources["sketch_pool"] >= 1 and resources["render_pool"] >= 1
    assert all(float(v).is_integer() for v in resources.values())


# --- the driver's watchdog, with the real store behind a fake handle and fake stages -------------------------


class FakeResponse:
    def __init__(self, coro_fn) -> None:
        self.coro_fn, self.cancelled = coro_fn, False

    def __await__(self):
        return self.coro_fn().__await__()

    def cancel(self):
        self.cancelled = True


class StallOnceStages:
    """Stage handles whose first attempt starts sketching and then goes silent; the second one completes."""

    def __init__(self, store: SQLiteJobStore) -> None:
        self.store, self.submitted = store, []

    def __getitem__(self, name):
        stages = self

        class Stage:
            def remote(self, previous):
                if name != "decode":
                    return previous
                msg = previous
                stages.submitted.append(msg.attempt)

                async def run():
                    import asyncio

                    stages.store.stage_started(msg.job_id, msg.attempt, "sketch", f"replica-{msg.attempt}")
                    if msg.attempt == 1:
                        await asyncio.Event().wait()  # a hung replica: no heartbeat, no answer
                    return {"artifacts": {"video.mp4": "x"}, "switch_step": 3}
                return FakeResponse(run)
        return Stage()

    def __iter__(self):
        return iter(("encode", "sketch", "render", "decode"))

    def values(self):
        return [self[name] for name in self]


def drive_until_done(store: SQLiteJobStore, stages: "StallOnceStages", watchdog, rounds: int) -> None:
    """Drive job v1 with a real JobDriver until it completes or fails (at most `rounds` x 50 ms)."""
    import asyncio

    from srserve.serving.driver import JobDriver

    async def main():
        driver = JobDriver(FakeStoreHandle(store), stages, "me", watchdog, max_retries=1, retry_after_s=0.1)
        driver.start()
        driver.drive("v1")
        for _ in range(rounds):
            if store.get("v1")["status"] in ("completed", "failed"):
                break
            await asyncio.sleep(0.05)
        await driver.stop()

    asyncio.run(main())


def test_a_silent_stage_is_retried_and_the_job_finishes(tmp_path):
    from srserve.serving.args import WatchdogOptions

    store = SQLiteJobStore(str(tmp_path / "jobs.sqlite"))
    request = {"generation": {"prompt": "p"}, "fps": 8, "seconds": "1", "size": "32x32"}
    store.create({"id": "v1", "created_at": time.time(), "model": "m", "request": request, "owner": "me",
                  "lease_until": time.time() + 5})
    stages = StallOnceStages(store)
    watchdog = WatchdogOptions(interval_s=0.05, lease_s=5.0, stage_timeout_s=0.3)

    drive_until_done(store, stages, watchdog, rounds=200)
    job = store.get("v1")
    assert job["status"] == "completed" and stages.submitted == [1, 2]
    assert job["failures"] == 1 and "sent no heartbeat" in job["history"][0] and "replica-1" in job["history"][0]


def test_a_job_past_its_own_deadline_fails_with_timeout(tmp_path):
    from srserve.serving.args import WatchdogOptions

    store = SQLiteJobStore(str(tmp_path / "jobs.sqlite"))
    request = {"generation": {"prompt": "p"}, "fps": 8, "seconds": "1", "size": "32x32", "deadline_s": 0.5}
    store.create({"id": "v1", "created_at": time.time(), "model": "m", "request": request, "owner": "me",
                  "lease_until": time.time() + 5})
    stages = StallOnceStages(store)  # attempt 1 hangs: only the deadline can end it (job_timeout_s is far off)
    watchdog = WatchdogOptions(interval_s=0.05, lease_s=5.0, stage_timeout_s=600.0, job_timeout_s=600.0)

    drive_until_done(store, stages, watchdog, rounds=100)
    job = store.get("v1")
    assert job["status"] == "failed" and job["error"]["code"] == "timeout", job
    assert "0.5s" in job["error"]["message"] and stages.submitted == [1]


def test_complete_and_get_returns_the_final_record_only_when_it_completed(store):
    new_job(store, "v1")
    store.begin_attempt("v1", "ingress-a", 30.0)
    assert store.complete_and_get("v1", 2, {"artifacts": {}}) == ("stale", None)  # not the current attempt
    outcome, record = store.complete_and_get("v1", 1, {"artifacts": {"video.mp4": "v1/video.mp4"}})
    assert outcome == "completed" and record == store.get("v1")
    assert record["status"] == "completed" and record["artifacts"] == {"video.mp4": "v1/video.mp4"}
    assert store.complete_and_get("v1", 1, {"artifacts": {}}) == ("stale", None)  # already terminal
