"""Decode (issue 11, point 8): one decode at a time for the whole of its worker thread, also when its caller is
cancelled; a stop (DELETE, through the stage reports) reaches it between the VAE's chunks and between the
artifacts' encodings, and a stopped decode writes no artifact."""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from srserve.serving.messages import JobCancelled, StageMessage


class _Store:
    """The JobStore's `report` as a stage calls it: `stopped` names the job#attempt keys told to stop."""

    def __init__(self) -> None:
        self.stopped: set[str] = set()
        store = self

        class _Report:
            def remote(self, events):
                async def answer():
                    return [k for k in {f"{e['job']}#{e['attempt']}" for e in events} if k in store.stopped]

                return answer()

        self.report = _Report()


@pytest.fixture(scope="module")
def final_state():
    """A fully denoised srd-tiny state of 17 frames (5 latent frames: the Wan VAE decodes them one by one)."""
    from srserve.config import GenerationRequest
    from srserve.pipeline.engine import SREngine
    from srserve.pipeline.spec import resolve_model_spec
    from srserve.tiny import default_model_path

    engine = SREngine.load(resolve_model_spec(default_model_path()), roles=("encode", "sketch", "render"))
    request = engine.resolve(GenerationRequest(prompt="a red circle", seed=1, num_inference_steps=4,
                                               num_frames=17, height=32, width=32, switch="step:2"))
    state = engine.render(engine.sketch(engine.prepare(request, engine.encode(request))))
    assert state.done and state.latents.shape[2] == 5
    return state.for_decode()


def _stage(tmp_path: Path, store: _Store):
    from srserve.serving.stages import Decode
    from srserve.tiny import default_model_path

    return Decode(default_model_path(), store, {"progress_interval_s": 0.02}, str(tmp_path / "artifacts"))


def _msg(job: str, state) -> StageMessage:
    return StageMessage(job, 0, state.request if hasattr(state, "request") else None, 8, True, state=state)


def _written(tmp_path: Path, job: str) -> list[str]:
    folder = tmp_path / "artifacts" / job
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_cancelled_callers_decode_keeps_the_lock_until_its_thread_ends(tmp_path, final_state, one_torch_thread):
    stage = _stage(tmp_path, _Store())
    real, lock, spans = stage.engine.decode, threading.Lock(), []
    running = [0, 0]  # now, most at once

    def instrumented(state, should_cancel=None):
        with lock:
            running[0] += 1
            running[1] = max(running)
        began = time.monotonic()
        try:
            time.sleep(0.4)  # the caller is cancelled meanwhile
            return real(state, should_cancel)
        finally:
            with lock:
                running[0] -= 1
            spans.append((began, time.monotonic()))

    stage.engine.decode = instrumented

    async def run():
        first = asyncio.create_task(stage(_msg("first", final_state)))
        while not spans and running[0] == 0:
            await asyncio.sleep(0.01)
        first.cancel()  # the driver gave up on the call: Serve cancels the request's task
        second = asyncio.create_task(stage(_msg("second", final_state)))
        with pytest.raises(asyncio.CancelledError):
            await first
        return await asyncio.wait_for(second, 60)

    result = asyncio.run(run())
    assert running[1] == 1  # never two decodes at once
    (_, a_end), (b_start, _) = sorted(spans)
    assert a_end <= b_start
    assert result["num_frames"] == 17 and _written(tmp_path, "second") == sorted(result["artifacts"])
    assert _written(tmp_path, "first") == []  # told to stop, its thread stopped before the first VAE chunk


def test_a_delete_stops_the_vae_between_chunks_and_nothing_is_written(tmp_path, final_state, one_torch_thread):
    store = _Store()
    stage = _stage(tmp_path, store)
    chunks = []

    def after_chunk(module, args, output):
        chunks.append(1)
        if len(chunks) == 1:
            store.stopped.add("gone#0")  # DELETE: the store's answer to the next report
            time.sleep(0.3)  # a report round passes while this chunk "computes"

    handle = stage.engine.family.vae.decoder.register_forward_hook(after_chunk)
    try:
        with pytest.raises(JobCancelled, match="cancelled in decode"):
            asyncio.run(stage(_msg("gone", final_state)))
    finally:
        handle.remove()
    assert len(chunks) == 1  # of 5: it stopped at the next chunk
    assert _written(tmp_path, "gone") == []


def test_a_delete_between_the_encodings_writes_no_partial_set(tmp_path, final_state, one_torch_thread, monkeypatch):
    import srserve.serving.stages as stages

    store = _Store()
    stage = _stage(tmp_path, store)
    real, encoded = stages.encode_outputs, []

    def slow_encodings(frames, fps, save_frames):
        for name, data in real(frames, fps, save_frames):
            encoded.append(name)
            yield name, data
            if name == "video.mp4":
                store.stopped.add("late#0")
                time.sleep(0.3)

    monkeypatch.setattr(stages, "encode_outputs", slow_encodings)
    with pytest.raises(JobCancelled, match="before writing the artifacts"):
        asyncio.run(stage(_msg("late", final_state)))
    assert encoded == ["video.mp4", "thumbnail.webp"]  # stopped at the next check, not at the end
    assert _written(tmp_path, "late") == []
    result = asyncio.run(stage(_msg("kept", final_state)))  # and the stage goes on serving
    assert _written(tmp_path, "kept") == ["frames.npy", "spritesheet.jpg", "thumbnail.webp", "video.mp4"]
    assert result["num_frames"] == 17
