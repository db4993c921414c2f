"""Stage checkpoints without a Ray cluster: written whole, read back bit-exact, a torn one refused; the stages
save what they hand on and a job resumed after a checkpoint gives the uninterrupted frames. The driver's side is in
test_recovery_driver.py, the served kills in test_recovery_served.py."""
from __future__ import annotations

import asyncio
import pickle
import time

import numpy as np
import pytest
import torch

from srserve.config import GenerationRequest
from srserve.serving.artifacts import ArtifactStore, CheckpointMissing
from srserve.serving.jobs import SQLiteJobStore
from srserve.serving.messages import StageMessage
from fakes import FakeStoreHandle

REQUEST = GenerationRequest(prompt="a red circle moving right", seed=5, num_inference_steps=8, num_frames=9,
                            height=32, width=32, switch="step:4")




class Ref:
    """Stands in for the ObjectRef of the prompt embeddings (awaitable, picklable)."""

    def __init__(self, value):
        self.value = value

    def __await__(self):
        async def get():
            return self.value
        return get().__await__()


def hop(msg):
    """What crossing to another replica does to a message: the one-serialisation wire form, there and back."""
    return pickle.loads(pickle.dumps(msg, protocol=5)) if isinstance(msg, StageMessage) else msg


# --- the checkpoint file ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def state():
    from srserve.pipeline.engine import SREngine
    from srserve.pipeline.spec import resolve_model_spec
    from srserve.tiny import default_model_path

    engine = SREngine.load(resolve_model_spec(default_model_path()), roles=("encode",))
    return engine.prepare(engine.resolve(REQUEST), engine.encode(engine.resolve(REQUEST)))


def test_a_checkpoint_reads_back_bit_exact_and_is_listed_and_removed(tmp_path, state):
    store = ArtifactStore(str(tmp_path / "artifacts"))
    size = store.put_checkpoint("v1", "sketch", state.replace(embeddings=None))
    assert size == (tmp_path / "artifacts/v1/checkpoints/sketch.bin").stat().st_size
    assert size > state.latents.numel() * 4  # the tensors' raw bytes are in it
    back = store.load_checkpoint("v1", "sketch")
    assert torch.equal(back.latents, state.latents) and back.embeddings is None
    assert torch.equal(back.generator_state, state.generator_state) and back.request == state.request
    assert back.scheduler_state.keys() == state.scheduler_state.keys() and back.step_index == state.step_index
    store.put("v1", "video.mp4", b"mp4")
    store.put_checkpoint("v1", "render", state.for_decode())
    assert store.checkpoints("v1") == ["render", "sketch"] and store.checkpoints("other") == []
    assert not list((tmp_path / "artifacts/v1/checkpoints").glob("*.tmp"))  # renamed into place
    store.delete_checkpoints("v1")
    assert store.checkpoints("v1") == [] and store.exists("v1", "video.mp4")  # the video stays
    with pytest.raises(CheckpointMissing, match="no sketch checkpoint"):
        store.load_checkpoint("v1", "sketch")
    with pytest.raises(ValueError):
        store.put_checkpoint("v1", "../x", state)


def test_a_torn_or_foreign_checkpoint_is_refused(tmp_path, state):
    store = ArtifactStore(str(tmp_path / "artifacts"))
    store.put_checkpoint("v1", "sketch", state.replace(embeddings=None))
    path = tmp_path / "artifacts/v1/checkpoints/sketch.bin"
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # a write cut short
    with pytest.raises(CheckpointMissing, match="truncated"):
        store.load_checkpoint("v1", "sketch")
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointMissing, match="not a srserve checkpoint"):
        store.load_checkpoint("v1", "sketch")


# --- the stages: checkpoint what they hand on; Encode loads it for a resumed job --------------------------
@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The four stage classes in this process, handing on through the wire form, checkpointing to a folder."""
    from srserve.serving import stages
    from srserve.tiny import default_model_path

    tmp = tmp_path_factory.mktemp("chain")
    store = SQLiteJobStore(str(tmp / "jobs.sqlite"))
    options = {"torch_threads": 1, "progress_interval_s": 0.05, "checkpoint_url": str(tmp / "artifacts")}
    model, handle = default_model_path(), FakeStoreHandle(store)
    encode = stages.Encode(model, handle, options)
    encode._put = lambda key, embeddings: Ref(embeddings)  # no Ray here: the "reference" holds the value
    built = {"encode": encode, "sketch": stages.Sketch(model, handle, options),
             "render": stages.Render(model, handle, options),
             "decode": stages.Decode(model, handle, options, str(tmp / "artifacts"))}
    return built, store, ArtifactStore(str(tmp / "artifacts"))


def run_chain(built, msg, names):
    async def main():
        current = msg
        for name in names:
            current = hop(await built[name](hop(current)))
        return current
    return asyncio.run(main())


def new_job(store, job_id):
    request = {"generation": REQUEST.model_dump(mode="json"), "fps": 8, "seconds": "1", "size": "32x32"}
    store.create({"id": job_id, "created_at": time.time(), "model": "m", "request": request, "owner": "me",
                  "lease_until": time.time() + 30}, begin_lease_s=30)


def test_a_job_resumed_after_a_checkpoint_gives_the_uninterrupted_frames(chain):
    built, store, artifacts = chain
    new_job(store, "whole")
    whole = run_chain(built, StageMessage("whole", 1, REQUEST, 8, True), ["encode", "sketch", "render", "decode"])
    ends = {e["stage"]: e["info"] for e in whole["reports"] if e["kind"] == "end"}
    assert ends["sketch"]["checkpoint"] == "sketch" and ends["render"]["checkpoint"] == "render"
    assert ends["sketch"]["checkpoint_bytes"] > ends["render"]["checkpoint_bytes"] > 0  # Decode's hop is smaller
    assert artifacts.checkpoints("whole") == ["render", "sketch"]
    assert store.complete("whole", 1, whole) == "completed" and store.get("whole")["checkpoint"] == "render"
    expected = np.load(whole["artifacts"]["frames.npy"])

    # Attempt 2 of another job with the same request: its sketch checkpoint is the uninterrupted one's.
    new_job(store, "resumed")
    artifacts.put_checkpoint("resumed", "sketch", artifacts.load_checkpoint("whole", "sketch"))
    msg = StageMessage("resumed", 1, REQUEST, 8, True, resume_from="sketch")
    resumed = run_chain(built, msg, ["encode", "render", "decode"])
    assert [e["stage"] for e in resumed["reports"] if e["kind"] == "start"] == ["encode", "render", "decode"]
    assert store.complete("resumed", 1, resumed) == "completed"
    assert set(store.get("resumed")["stages"]) == {"encode", "render", "decode"}  # no sketch step rerun
    encode_end = next(e for e in resumed["reports"] if e["kind"] == "end" and e["stage"] == "encode")
    assert encode_end["info"] == {"resumed_from": "sketch", "step": 4}
    assert np.array_equal(np.load(resumed["artifacts"]["frames.npy"]), expected)

    # After the render checkpoint only Decode is left: Encode loads it and encodes no prompt.
    new_job(store, "decoded")
    artifacts.put_checkpoint("decoded", "render", artifacts.load_checkpoint("whole", "render"))
    msg = StageMessage("decoded", 1, REQUEST, 8, True, resume_from="render")
    decoded = run_chain(built, msg, ["encode", "decode"])
    assert np.array_equal(np.load(decoded["artifacts"]["frames.npy"]), expected)


def test_encode_without_the_checkpoint_says_so(chain):
    built, store, _ = chain
    new_job(store, "lost")
    with pytest.raises(CheckpointMissing):
        run_chain(built, StageMessage("lost", 1, REQUEST, 8, False, resume_from="sketch"), ["encode"])
