"""The driver's side of recovery, without a Ray cluster: a retry resumes after the last checkpoint (and starts
over when it cannot), checkpoints go when the job ends, deleted jobs are cut loose with the reason that applies,
store calls of HTTP requests end in a 503 with Retry-After at once, and no job is taken over right after the
store was away."""
from __future__ import annotations

import asyncio
import time

import pytest

from srserve.config import GenerationRequest
from srserve.serving.artifacts import ArtifactStore, CheckpointMissing
from srserve.serving.jobs import SQLiteJobStore
from fakes import FakeStoreHandle

REQUEST = GenerationRequest(prompt="a red circle moving right", seed=5, num_inference_steps=8, num_frames=9,
                            height=32, width=32, switch="step:4")




def new_job(store, job_id):
    request = {"generation": REQUEST.model_dump(mode="json"), "fps": 8, "seconds": "1", "size": "32x32"}
    store.create({"id": job_id, "created_at": time.time(), "model": "m", "request": request, "owner": "me",
                  "lease_until": time.time() + 30}, begin_lease_s=30)


# --- the driver: where an attempt starts, and what it removes ---------------------------------------------
class FakeResponse:
    def __init__(self, coro_fn):
        self.coro_fn, self.cancelled = coro_fn, False

    def __await__(self):
        return self.coro_fn().__await__()

    def cancel(self):
        self.cancelled = True


class ScriptedStages:
    """Stage handles recording each attempt's chain; `outcome(attempt, msg)` decides Decode's answer."""

    def __init__(self, outcome):
        self.outcome, self.chains, self.messages = outcome, [], []

    def __getitem__(self, name):
        stages = self

        class Stage:
            def remote(self, previous):
                if name == "encode":
                    stages.chains.append([])
                    stages.messages.append(previous)
                stages.chains[-1].append(name)
                if name != "decode":
                    return previous
                msg = stages.messages[-1]

                async def run():
                    return stages.outcome(msg)
                return FakeResponse(run)
        return Stage()

    def __iter__(self):
        return iter(("encode", "sketch", "render", "decode"))


def drive(tmp_path, outcome, checkpoints=("sketch",), job_id="v1"):
    from srserve.serving.args import WatchdogOptions
    from srserve.serving.driver import JobDriver

    store = SQLiteJobStore(str(tmp_path / "jobs.sqlite"))
    new_job(store, job_id)
    artifacts = ArtifactStore(str(tmp_path / "artifacts"))
    folder = tmp_path / "artifacts" / job_id / "checkpoints"
    folder.mkdir(parents=True)
    for stage in checkpoints:  # the driver only lists them; Encode (scripted here) would load them
        (folder / f"{stage}.bin").write_bytes(b"x")
    stages = ScriptedStages(outcome)

    async def main():
        driver = JobDriver(FakeStoreHandle(store), stages, "me", WatchdogOptions(interval_s=0.05, lease_s=5.0),
                           max_retries=2, retry_after_s=0.1, artifacts=artifacts)
        driver.start()
        driver.drive(job_id, store.get(job_id))
        for _ in range(100):
            if not driver.active:  # the job's task ended (its checkpoints dropped, if it got that far)
                break
            await asyncio.sleep(0.05)
        await driver.stop()

    asyncio.run(main())
    return store.get(job_id), stages, artifacts


def replica_lost():
    from ray.exceptions import ActorDiedError

    return ActorDiedError()


def test_a_retry_resumes_after_the_last_checkpoint_and_the_end_removes_them(tmp_path):
    def outcome(msg):
        if msg.attempt == 1:
            raise replica_lost()
        return {"artifacts": {"video.mp4": "x"}, "switch_step": 4}

    job, stages, artifacts = drive(tmp_path, outcome)
    assert job["status"] == "completed" and job["failures"] == 1 and job["attempt"] == 2
    assert stages.chains == [["encode", "sketch", "render", "decode"], ["encode", "render", "decode"]]
    assert [m.resume_from for m in stages.messages] == [None, "sketch"]
    assert artifacts.checkpoints("v1") == []  # gone once the job completed


def test_a_completed_job_is_answered_from_the_driver_without_another_store_read(tmp_path):
    """The final record comes back with `complete_and_get`: the client's last polls cost no store call."""
    from srserve.serving.args import WatchdogOptions
    from srserve.serving.driver import JobDriver

    store = SQLiteJobStore(str(tmp_path / "jobs.sqlite"))
    new_job(store, "v1")
    ops = []

    class CountingHandle(FakeStoreHandle):
        def __getattr__(self, name):
            ops.append(name)
            return super().__getattr__(name)

    stages = ScriptedStages(lambda msg: {"artifacts": {"video.mp4": "x"}, "switch_step": 4})

    async def main():
        driver = JobDriver(CountingHandle(store), stages, "me", WatchdogOptions(interval_s=10.0, lease_s=30.0),
                           max_retries=2, retry_after_s=0.1)
        driver.start()
        driver.drive("v1", store.get("v1"))
        while driver.active:
            await asyncio.sleep(0.01)
        seen = driver.view("v1")
        await driver.stop()
        return seen

    seen = asyncio.run(main())
    assert seen is not None and seen["status"] == "completed" and seen["artifacts"] == {"video.mp4": "x"}
    assert seen == store.get("v1")
    assert "get" not in ops and ops.count("complete_and_get") == 1, ops


def test_completed_records_nobody_reads_again_are_forgotten_after_their_ttl():
    from srserve.serving.args import WatchdogOptions
    from srserve.serving.driver import FINISHED_TTL_S, JobDriver

    driver = JobDriver(None, {}, "me", WatchdogOptions(), max_retries=0, retry_after_s=1.0)
    now = time.monotonic()
    driver._finished = {"old": (now - FINISHED_TTL_S - 1, {"id": "old"}), "new": (now, {"id": "new"})}
    driver._sweep_finished()
    assert list(driver._finished) == ["new"] and driver.view("new") == {"id": "new"}


def test_a_checkpoint_that_cannot_be_loaded_starts_the_job_over_without_spending_a_retry(tmp_path):
    def outcome(msg):
        if msg.attempt == 1:
            raise replica_lost()
        if msg.resume_from:
            raise CheckpointMissing("the sketch checkpoint of job v1 is truncated")
        return {"artifacts": {"video.mp4": "x"}}

    job, stages, _ = drive(tmp_path, outcome)
    assert job["status"] == "completed" and job["failures"] == 1 and job["attempt"] == 3
    assert [m.resume_from for m in stages.messages] == [None, "sketch", None]
    assert stages.chains[-1] == ["encode", "sketch", "render", "decode"]


def test_a_failed_job_leaves_no_checkpoints(tmp_path):
    def outcome(msg):
        raise RuntimeError("boom")

    job, _, artifacts = drive(tmp_path, outcome)
    assert job["status"] == "failed" and artifacts.checkpoints("v1") == []


def test_a_job_runs_whole_on_a_free_flex_replica_and_the_rest_go_through_the_pools(tmp_path):
    """With one flex slot: the first job takes it, the two created while it runs go through the pools, and one
    created once it is free takes it again; a failing flex call frees its slot too."""
    from srserve.serving.args import WatchdogOptions
    from srserve.serving.driver import JobDriver

    store = SQLiteJobStore(str(tmp_path / "jobs.sqlite"))
    stages = ScriptedStages(lambda msg: {"artifacts": {"video.mp4": "x"}})
    release, flexed = asyncio.Event(), []

    class Flex:
        def remote(self, msg):
            flexed.append(msg.job_id)

            async def run():
                await release.wait()
                if msg.job_id == "v4":
                    raise RuntimeError("flex replica failed")
                return {"artifacts": {"video.mp4": "x"}}
            return FakeResponse(run)

    async def main():
        driver = JobDriver(FakeStoreHandle(store), stages, "me", WatchdogOptions(interval_s=0.05, lease_s=5.0),
                           max_retries=0, retry_after_s=0.1, flex=Flex(), flex_slots=1)

        async def run(job_id):
            new_job(store, job_id)
            driver.drive(job_id, store.get(job_id))
            await asyncio.sleep(0.1)

        for job_id in ("v1", "v2", "v3"):
            await run(job_id)
        assert flexed == ["v1"] and driver.flex_jobs == 1 and len(stages.chains) == 2
        release.set()
        while driver.active:
            await asyncio.sleep(0.02)
        assert driver.flex_jobs == 0
        await run("v4")  # fails on the flex replica: the job fails (no retries here), the slot is free again
        while driver.active:
            await asyncio.sleep(0.02)
        await run("v5")
        while driver.active:
            await asyncio.sleep(0.02)
        assert flexed == ["v1", "v4", "v5"] and driver.flex_jobs == 0

    asyncio.run(main())
    assert [store.get(j)["status"] for j in ("v1", "v2", "v3", "v4", "v5")] == \
        ["completed", "completed", "completed", "failed", "completed"]


def test_flex_replicas_need_disaggregated_mode_and_fixed_replicas():
    from pydantic import ValidationError

    from srserve.serving.args import AppArgs

    args = AppArgs.model_validate({"flex": {"num_replicas": 3}, "ingress": {"num_replicas": 2}})
    assert args.flex_slots() == 1 and args.resources_needed()["colocated_pool"] == 3
    assert AppArgs.model_validate({}).flex_slots() == 0
    with pytest.raises(ValidationError, match="mode: disaggregated"):
        AppArgs.model_validate({"mode": "colocated", "flex": {}})
    with pytest.raises(ValidationError, match="no autoscaling_config"):
        AppArgs.model_validate({"flex": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2}}})


# --- cancellation reasons -----------------------------------------------------------------------------------
def test_a_deleted_job_is_cut_loose_with_the_reason_that_applies():
    from srserve.serving.args import WatchdogOptions
    from srserve.serving.driver import JobDriver

    driver = JobDriver(None, {}, "me", WatchdogOptions(cancel_grace_s=5.0), max_retries=1, retry_after_s=1)
    now = time.time()
    base = {"owner": "me", "cancel_requested": True, "created_at": now, "heartbeat_at": now - 30,
            "stage_started_at": now - 60, "stage_replica": "r"}
    running = {**base, "id": "a", "status": "in_progress", "stage": "sketch"}
    # A running stage stops itself at its next step: an old heartbeat (a slow step) is no reason to cut it loose.
    assert driver._problem(running, now) is None
    late = driver._problem(running, now + 6)
    assert "during sketch" in str(late) and "did not stop within 5s" in str(late) and "waiting" not in str(late)
    between = driver._problem({**base, "id": "b", "status": "in_progress", "stage": None}, now)
    assert str(between) == "cancelled while queued for its next stage"
    queued = driver._problem({**base, "id": "c", "status": "queued", "stage": None}, now)
    assert str(queued) == "cancelled before it started"


# --- bounded store calls for HTTP requests --------------------------------------------------------------------
class SilentHandle:
    """A deployment with no live replica: the router holds every call (here: forever)."""

    def __init__(self, name):
        self.app_name, self.deployment_name, self.responses = "test", name, []

    def __getattr__(self, name):
        handle = self

        class Method:
            def remote(self, *args, **kwargs):
                response = FakeResponse(lambda: asyncio.Event().wait())
                handle.responses.append(response)
                return response
        return Method()


def test_a_request_gets_503_with_retry_after_at_once_when_the_store_does_not_answer():
    from srserve.api.protocol import ApiError
    from srserve.serving.calls import Unavailable, call, call_for_request

    handle = SilentHandle("silent-store")
    began = time.monotonic()
    with pytest.raises(ApiError) as err:
        asyncio.run(call_for_request(handle, "get", "v1", timeout_s=0.3, retry_after_s=4))
    assert time.monotonic() - began < 2.0
    assert err.value.status == 503 and err.value.code == "store_unavailable"
    assert err.value.headers == {"Retry-After": "4"}
    assert handle.responses and all(r.cancelled for r in handle.responses)  # withdrawn: it never runs later
    # Found away: the next requests are answered at once, without a call, until it is probed again.
    sent, began = len(handle.responses), time.monotonic()
    with pytest.raises(ApiError, match="unavailable"):
        asyncio.run(call_for_request(handle, "list", timeout_s=0.3))
    assert time.monotonic() - began < 0.1 and len(handle.responses) == sent
    with pytest.raises(Unavailable):
        asyncio.run(call(handle, "watch", timeout_s=0.2))  # the driver's bounded calls do not use that shortcut


def test_a_bounded_call_retries_a_lost_replica_within_its_bound():
    from srserve.serving.calls import call_for_request

    attempts = []

    class Flaky:
        app_name, deployment_name = "test", "flaky-store"

        def __getattr__(self, name):
            class Method:
                def remote(self, *args):
                    attempts.append(args)

                    async def run():
                        if len(attempts) < 3:
                            raise replica_lost()
                        return "ok"
                    return run()
            return Method()

    assert asyncio.run(call_for_request(Flaky(), "get", "v1", timeout_s=2.0)) == "ok" and len(attempts) == 3


def test_the_store_is_probed_again_and_answers_once_back(monkeypatch):
    from srserve.serving import calls

    monkeypatch.setattr(calls, "PROBE_EVERY_S", 0.2)
    back = {"up": False}

    class Store:
        app_name, deployment_name = "test", "restarting-store"

        def __getattr__(self, name):
            class Method:
                def remote(self, *args):
                    if back["up"]:
                        async def answer():
                            return "ok"
                        return answer()
                    return FakeResponse(lambda: asyncio.Event().wait())
            return Method()

    with pytest.raises(Exception, match="unavailable"):
        asyncio.run(calls.call_for_request(Store(), "get", timeout_s=0.2))
    back["up"] = True
    time.sleep(0.25)
    assert asyncio.run(calls.call_for_request(Store(), "get", timeout_s=0.2)) == "ok"
    assert ("test", "restarting-store") not in calls._away


def test_after_the_store_was_away_no_job_is_taken_over_for_one_lease(tmp_path):
    """Every driver's leases may have lapsed while the store was away: the first to be back must not take the
    others' jobs before they renew (a needless takeover costs a retry and redoes a stage)."""
    from srserve.serving.args import WatchdogOptions
    from srserve.serving.driver import JobDriver

    store = SQLiteJobStore(str(tmp_path / "jobs.sqlite"))
    calls_seen, away = [], {"rounds": 2}

    class Handle(FakeStoreHandle):
        def __getattr__(self, name):
            calls_seen.append(name)
            if name == "watch" and away["rounds"] > 0:
                away["rounds"] -= 1
                raise replica_lost()
            return super().__getattr__(name)

    async def main():
        driver = JobDriver(Handle(store), {}, "me", WatchdogOptions(interval_s=0.05, lease_s=0.5), max_retries=1,
                           retry_after_s=0.1)
        driver.start()
        await asyncio.sleep(1.2)
        await driver.stop()

    asyncio.run(main())
    rounds = [n for n in calls_seen if n in ("watch", "renew")]
    first_renew = rounds.index("renew")
    assert rounds[:first_renew] == ["watch"] * first_renew and first_renew >= 1
    assert "renew" in rounds and rounds[-1] == "watch"  # renew only for one lease, then claims again
