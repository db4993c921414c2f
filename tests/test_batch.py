"""The handoff state's layout (version 2) and what `DenoiseBatch` admits."""
from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch

from srserve.config import GenerationRequest
from srserve.pipeline.engine import DenoiseBatch, SREngine
from srserve.pipeline.handoff import HANDOFF_VERSION, HandoffState
from srserve.pipeline.spec import resolve_model_spec

PROMPT = "a red circle moving left"


def request(switch: str, seed: int = 3) -> GenerationRequest:
    return GenerationRequest(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=6, num_frames=9,
                             height=32, width=32, seed=seed, guidance_scale=5.0, switch=switch)


@pytest.fixture(scope="module")
def engine(wan_unipc_dir):
    return SREngine.load(resolve_model_spec(wan_unipc_dir))


@pytest.fixture(scope="module")
def state0(engine):
    r = request("adaptive:0.5:min=2")
    return engine.prepare(r, engine.encode(r))


def test_the_state_carries_one_copy_of_each_fact(state0):
    names = {f.name for f in dataclasses.fields(HandoffState)}
    assert HANDOFF_VERSION == 2 and state0.version == 2
    assert "switch_policy" not in names and "previous_output" not in names  # read request.switch; no crossing
    assert state0.request.switch == "adaptive:0.5:min=2" and state0.switch_step is None


def test_other_versions_are_refused(engine, state0):
    old = state0.replace(version=1)
    with pytest.raises(ValueError, match="handoff version 1 is not supported"):
        HandoffState.from_bytes(old.to_bytes())
    with pytest.raises(ValueError, match="handoff version 1"):
        DenoiseBatch(engine.family, "sketch").add("x", old)  # a pickle that skipped from_bytes


def test_a_state_without_embeddings_must_get_them_back_before_denoising(engine, state0):
    bare = HandoffState.from_bytes(state0.replace(embeddings=None).to_bytes())  # None crosses the wire
    batch = DenoiseBatch(engine.family, "sketch")
    with pytest.raises(ValueError, match=r"no embeddings.*state.replace\(embeddings=\.\.\.\)"):
        batch.add("x", bare)
    batch.add("x", bare.replace(embeddings=state0.embeddings))
    assert len(batch) == 1


def test_a_state_of_another_family_cannot_join(engine, state0):
    with pytest.raises(ValueError, match="'cogvideox' state cannot join a 'wan' sketch batch"):
        DenoiseBatch(engine.family, "sketch").add("x", state0.replace(family="cogvideox"))


def test_the_adaptive_rule_runs_within_one_sketch_segment(engine, state0):
    sketched = engine.sketch(state0)
    k = sketched.switch_step
    assert 2 <= k < state0.num_steps and sketched.step_index == k
    assert len(sketched.switch_diffs) == k - 1  # d_1 .. d_{k-1}: its trace, for diagnostics
    with pytest.raises(ValueError, match="adaptive sketch runs from step 0"):
        DenoiseBatch(engine.family, "sketch").add("y", state0.replace(step_index=1))  # its history stayed behind


def test_for_decode_carries_what_decode_reads(engine, state0):
    final = engine.render(engine.sketch(state0))
    slim = HandoffState.from_bytes(final.for_decode().to_bytes())
    assert slim.embeddings is None and slim.scheduler_state == {} and slim.generator_state.numel() == 0
    assert slim.switch_step == final.switch_step and slim.done
    assert slim.nbytes() < final.nbytes() and torch.equal(slim.latents, final.latents)
    assert len(pickle.dumps(slim)) < len(pickle.dumps(final)) / 2
    assert np.array_equal(engine.decode(slim), engine.decode(final))


def test_decode_refuses_an_unfinished_state(engine, state0):
    with pytest.raises(ValueError, match="fully denoised state; this one is at step 0 of 6"):
        engine.decode(state0)


def test_cogvideox_decodes_from_for_decode(tmp_path):
    """CogVideoX carries its solver's x0 in family_state: Decode needs none of it, only the space label."""
    from srserve.tiny.random_model import build_random_cogvideox

    base = build_random_cogvideox(tmp_path / "cog", seed=0, scheduler="dpm")
    spec = resolve_model_spec(base, render_transformer=str(base / "transformer"))
    cog = SREngine.load(spec)
    r = request("step:2").model_copy(update={"num_inference_steps": 3, "max_sequence_length": 226})
    final = cog.render(cog.sketch(cog.prepare(r, cog.encode(r))))
    slim = final.for_decode()
    assert isinstance(final.family_state.get("pred_original_sample"), torch.Tensor)
    assert slim.family_state == {"space": "vae"}
    assert np.array_equal(cog.decode(slim), cog.decode(final))


def test_step_advances_only_the_chosen_requests_and_views_report_what_a_scheduler_needs(engine, state0):
    small = request("step:4").model_copy(update={"height": 16, "width": 16})
    other = engine.prepare(small, engine.encode(small))
    fixed = state0.replace(switch_step=3)  # a fixed switch: the sketch segment is steps [0, 3)
    batch = DenoiseBatch(engine.family, "sketch", max_batch_size=4)
    batch.add("a", fixed)
    batch.add("b", other)
    views = batch.views()
    assert views["a"].group != views["b"].group and views["a"].units == 4 * views["b"].units  # 32x32 vs 16x16
    assert (views["a"].remaining_steps, views["b"].remaining_steps) == (3, 4)
    batch.step(["b"])
    batch.step(["b"])
    assert (batch.active["a"].step_index, batch.active["b"].step_index) == (0, 2)  # "a" paused, untouched
    cancelled = {"a": False}
    batch.active["a"].should_cancel = lambda: cancelled["a"]
    cancelled["a"] = True
    left = batch.step(["b"])  # a stop reaches a paused request at the next boundary
    assert isinstance(left["a"], Exception) and "cancelled at step 0" in str(left["a"])
    assert batch.active["b"].step_index == 3
