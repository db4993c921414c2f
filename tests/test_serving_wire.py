"""The lean control plane and data path, without a Ray cluster: the handoff wire form (one serialisation, tensors
out of band, bit-exact), which stages a request goes through, the time-throttled progress reports, and the job
store's column updates (heartbeats and leases rewrite no record; old stores migrate)."""
from __future__ import annotations

import asyncio
import json
import pickle
import sqlite3
import time

import pytest
import torch

from srserve.config import GenerationRequest
from srserve.serving.driver import stages_with_work
from srserve.serving.jobs import SQLiteJobStore
from srserve.serving.messages import HandoffProbe, StageMessage, dump_state, load_state
from srserve.serving.reporter import Reporter, stage_event

STAGES = ["encode", "sketch", "render", "decode"]


def _state(engine_state_factory=None):
    from srserve.pipeline.engine import SREngine
    from srserve.pipeline.spec import resolve_model_spec
    from srserve.tiny import default_model_path

    engine = SREngine.load(resolve_model_spec(default_model_path()), roles=("encode",))
    request = GenerationRequest(prompt="a red circle moving right", num_inference_steps=6)
    return engine.prepare(request, engine.encode(request))


def test_wire_form_is_bit_exact_and_keeps_tensors_out_of_band():
    state = _state()
    header, buffers = dump_state(state)
    assert buffers and len(header) < 20_000  # the tensors are not in the pickle stream
    tensor_bytes = state.latents.numel() * 4
    assert any(b.raw().nbytes == tensor_bytes for b in buffers)
    back = load_state(header, [b.raw() for b in buffers])
    assert torch.equal(back.latents, state.latents) and back.latents.dtype == state.latents.dtype
    assert torch.equal(back.embeddings.prompt_embeds, state.embeddings.prompt_embeds)
    assert torch.equal(back.generator_state, state.generator_state)
    assert back.scheduler_state.keys() == state.scheduler_state.keys() and back.request == state.request
    back.latents.add_(1.0)  # the receiver owns its tensors (object-store buffers are read-only)


def test_wire_form_handles_every_dtype_and_shape():
    state = _state()
    odd = {"bf16": torch.randn(3, 5).to(torch.bfloat16), "bool": torch.tensor([True, False]),
           "scalar": torch.tensor(7), "empty": torch.zeros(0, 4), "strided": torch.randn(4, 6)[:, ::2]}
    header, buffers = dump_state(state.replace(family_state=odd))
    back = load_state(header, buffers).family_state
    for name, tensor in odd.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape
        assert torch.equal(back[name], tensor), name


def test_message_round_trip_counts_loads_and_times_the_hop():
    state = _state()
    msg = StageMessage("job", 1, state.request, 8, False, state=state.replace(embeddings=None))
    before = HandoffProbe.loads
    back = pickle.loads(pickle.dumps(msg, protocol=5))
    assert HandoffProbe.loads == before + 1 and back.state.embeddings is None
    assert set(back.transfer) == {"bytes", "serialize_s", "transit_s", "deserialize_s"}
    assert back.transfer["bytes"] < len(pickle.dumps(state))  # embeddings left behind
    with pytest.raises(TypeError):
        load_state(pickle.dumps((99, state)), [])


@pytest.mark.parametrize("switch, steps, expected", [
    ("adaptive", 30, STAGES), ("none", 30, ["encode", "sketch", "decode"]),
    ("small-only", 30, ["encode", "render", "decode"]), ("step:0", 30, ["encode", "render", "decode"]),
    ("step:30", 30, ["encode", "sketch", "decode"]), ("step:40", 30, ["encode", "sketch", "decode"]),
    ("step:9", 30, STAGES), ("ratio:0.9", 30, STAGES),
])
def test_a_stage_with_no_steps_is_skipped(switch, steps, expected):
    request = GenerationRequest(prompt="p", switch=switch, num_inference_steps=steps)
    assert stages_with_work(STAGES, request) == expected
    assert stages_with_work(["colocated"], request) == ["colocated"]


class _Store:
    """A store handle whose `report` records each call and asks to stop the jobs in `stop`."""

    def __init__(self) -> None:
        self.calls: list[list[dict]] = []
        self.stop: list[str] = []

    @property
    def report(self):
        store = self

        class Method:
            async def remote(self, events):
                store.calls.append(events)
                return list(store.stop)
        return Method()


def test_progress_reports_follow_time_not_steps_and_carry_the_stop():
    async def run() -> tuple[_Store, object]:
        store = _Store()
        reporter = Reporter(store, interval_s=0.2)
        watches = [reporter.watch(f"job{i}", 1, "sketch") for i in range(3)]
        reporter.add(stage_event("start", "job0", 1, "sketch", replica="r"))

        def steps() -> None:  # the denoising thread: 60 fast steps of three requests over ~0.6 s
            for step in range(1, 61):
                for watch in watches:
                    watch.on_step(step, 60)
                time.sleep(0.01)

        await asyncio.to_thread(steps)
        store.stop = ["job1#1"]
        await asyncio.sleep(0.25)
        return store, watches

    store, watches = asyncio.run(run())
    assert 2 <= len(store.calls) <= 6  # one call per 0.2 s for all three jobs, not 180
    assert store.calls[0][0]["kind"] == "start"
    last = {e["job"]: e["step"] for call in store.calls for e in call if e["kind"] == "progress"}
    assert last == {"job0": 60, "job1": 60, "job2": 60}
    assert [w.should_cancel() for w in watches] == [False, True, False]


def _data(store: SQLiteJobStore, job_id: str) -> str:
    return store._db.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


def test_heartbeats_and_leases_touch_columns_not_the_record(tmp_path):
    store = SQLiteJobStore(str(tmp_path / "jobs.sqlite"))
    store.create({"id": "v1", "created_at": time.time(), "model": "m", "request": {}, "owner": "a"})
    store.begin_attempt("v1", "a", 30.0)
    store.stage_started("v1", 1, "sketch", "r1")
    record = _data(store, "v1")
    assert store.heartbeat("v1", 1, "sketch", 4, 8) is False
    assert store.renew("a", ["v1"], 30.0)["v1"]["stage_replica"] == "r1"
    assert _data(store, "v1") == record  # the JSON was not rewritten
    job = store.get("v1")
    assert job["step"] == 4 and job["progress"] == 50 and job["lease_until"] > time.time() + 20
    assert store.heartbeat("v1", 2, "sketch", 5, 8) is True  # another attempt's stage is told to stop
    store.delete("v1")
    assert store.heartbeat("v1", 1, "sketch", 5, 8) is True  # a DELETE stops the stage at its next report


def test_a_store_written_before_the_columns_migrates(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, "
               "status TEXT NOT NULL, deleted INTEGER NOT NULL, lease_until REAL NOT NULL, data TEXT NOT NULL)")
    old = {"id": "v1", "created_at": 5.0, "model": "m", "request": {}, "status": "in_progress", "attempt": 2,
           "owner": "a", "stage": "render", "progress": 40, "step": 3, "num_steps": 8, "lease_until": 1.0}
    db.execute("INSERT INTO jobs (id, status, deleted, lease_until, data) VALUES ('v1', 'in_progress', 0, 1.0, ?)",
               (json.dumps(old),))
    db.commit()
    db.close()
    store = SQLiteJobStore(str(path))
    job = store.get("v1")
    assert (job["attempt"], job["stage"], job["progress"], job["owner"]) == (2, "render", 40, "a")
    assert store.claim_orphans("b", 30.0, max_retries=2) == ["v1"]
    assert store.get("v1")["failures"] == 1 and store.get("v1")["owner"] == "b"
