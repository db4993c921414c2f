"""The engine against diffusers' own WanPipeline, and the split run against the in-process run."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from srserve.config import CacheConfig, GenerationRequest
from srserve.pipeline.engine import Cancelled, DenoiseBatch, SREngine
from srserve.pipeline.handoff import HandoffState
from srserve.pipeline.spec import resolve_model_spec

PROMPT = "a red circle moving left"
STEPS, FRAMES, SIZE = 8, 9, 32


def request(switch: str, seed: int = 3, **kw) -> GenerationRequest:
    return GenerationRequest(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=STEPS, num_frames=FRAMES,
                             height=SIZE, width=SIZE, seed=seed, guidance_scale=5.0, switch=switch, **kw)


def diffusers_frames(model_dir, boundary_ratio, seed=3, **kw) -> np.ndarray:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(model_dir, boundary_ratio=boundary_ratio)
    out = pipe(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=STEPS, num_frames=FRAMES, height=SIZE,
               width=SIZE, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
               **kw)
    return out.frames[0]


@pytest.fixture(scope="module")
def engine(wan_unipc_dir):
    return SREngine.load(resolve_model_spec(wan_unipc_dir))


def test_none_equals_diffusers_large_only(engine, wan_unipc_dir):
    ours = engine.generate(request("none"))
    assert ours.switch_step == STEPS
    np.testing.assert_allclose(ours.frames, diffusers_frames(wan_unipc_dir, None), atol=1e-5, rtol=0)


def test_ratio_equals_diffusers_two_transformers(engine, wan_unipc_dir):
    ours = engine.generate(request("ratio:0.9"))
    assert 0 < ours.switch_step < STEPS  # a real split, not a degenerate one
    np.testing.assert_allclose(ours.frames, diffusers_frames(wan_unipc_dir, 0.9), atol=1e-5, rtol=0)


def test_render_guidance_equals_diffusers_guidance_scale_2(engine, wan_unipc_dir):
    ours = engine.generate(request("ratio:0.9", guidance_scale_2=2.0))
    np.testing.assert_allclose(ours.frames, diffusers_frames(wan_unipc_dir, 0.9, guidance_scale_2=2.0), atol=1e-5,
                               rtol=0)
    assert not np.allclose(ours.frames, engine.generate(request("ratio:0.9")).frames)  # it reached the render
    # at scale 1 the render skips its unconditional pass; the result is still diffusers'
    unguided = engine.generate(request("ratio:0.9", guidance_scale_2=1.0))
    np.testing.assert_allclose(unguided.frames, diffusers_frames(wan_unipc_dir, 0.9, guidance_scale_2=1.0),
                               atol=1e-5, rtol=0)


def test_render_guidance_defaults_to_the_models_then_the_requests(wan_unipc_dir):
    plain = SREngine.load(resolve_model_spec(wan_unipc_dir), roles=())
    assert plain.resolve(request("none")).guidance_scale_2 == 5.0
    tuned = SREngine.load(resolve_model_spec(wan_unipc_dir, default_guidance_scale_2=3.0), roles=())
    assert tuned.resolve(request("none")).guidance_scale_2 == 3.0
    assert tuned.resolve(request("none", guidance_scale_2=1.5)).guidance_scale_2 == 1.5


def test_step_k_equals_the_same_split_by_boundary(engine, wan_unipc_dir):
    by_ratio = engine.generate(request("ratio:0.9"))
    by_step = engine.generate(request(f"step:{by_ratio.switch_step}"))
    assert np.array_equal(by_step.frames, by_ratio.frames)
    other = engine.generate(request(f"step:{by_ratio.switch_step + 1}"))
    assert not np.array_equal(other.frames, by_ratio.frames)  # the switch point matters


def test_small_only_differs_from_none(engine):
    assert not np.allclose(engine.generate(request("small-only")).frames, engine.generate(request("none")).frames)


def split_run(model_dir, switch: str, transport) -> tuple[np.ndarray, np.ndarray]:
    """(in-process frames, frames after sketch and render ran on separately loaded engines over `transport`).

    The embeddings travel apart, as the serving layer ships them (the state crosses with `embeddings=None` and
    they are re-attached before each denoising stage), and Decode gets `for_decode()`'s slim copy."""
    spec = resolve_model_spec(model_dir)
    whole = SREngine.load(spec).generate(request(switch))
    encoder = SREngine.load(spec, roles=("encode",))
    sketcher = SREngine.load(spec, roles=("sketch",))
    renderer = SREngine.load(spec, roles=("render", "decode"))
    embeddings = encoder.encode(request(switch))
    state = transport(encoder.prepare(request(switch), None))
    state = transport(sketcher.sketch(state.replace(embeddings=embeddings)).replace(embeddings=None))
    assert isinstance(state, HandoffState) and state.step_index == state.switch_step and state.embeddings is None
    state = transport(renderer.render(state.replace(embeddings=embeddings)).for_decode())
    return whole.frames, renderer.decode(state)


@pytest.mark.parametrize("model", ["wan_unipc_dir", "wan_euler_dir"])
@pytest.mark.parametrize("switch", ["step:3", "adaptive"])
def test_pickle_handoff_reproduces_in_process_run(model, switch, request):
    whole, split = split_run(request.getfixturevalue(model), switch,
                             lambda s: HandoffState.from_bytes(pickle.loads(pickle.dumps(s.to_bytes()))))
    assert np.array_equal(whole, split)


@pytest.mark.parametrize("model", ["wan_unipc_dir", "wan_euler_dir"])
def test_object_store_handoff_reproduces_in_process_run(model, request, ray_local):
    import ray

    whole, split = split_run(request.getfixturevalue(model), "step:3", lambda s: ray.get(ray.put(s)))
    assert np.array_equal(whole, split)


def test_dropping_scheduler_history_changes_the_result(wan_unipc_dir):
    """The reason the handoff carries UniPC's history: a fresh scheduler at step k gives another video."""
    from srserve.pipeline.handoff import capture_scheduler

    spec = resolve_model_spec(wan_unipc_dir)
    eng = SREngine.load(spec)
    state = eng.sketch(eng.prepare(request("step:3"), eng.encode(request("step:3"))))
    fresh = eng.family.new_scheduler("render")
    fresh.set_timesteps(STEPS)
    fresh.set_begin_index(3)
    _, config, sched_state = capture_scheduler(fresh)
    forgetful = state.replace(scheduler_state=sched_state)
    exact = eng.decode(eng.render(state))
    lossy = eng.decode(eng.render(forgetful))
    assert np.abs(exact - lossy).max() > 1e-6


def test_batched_steps_equal_unbatched(engine):
    requests = [request("step:4", seed=s) for s in (1, 2, 3)]
    states = [engine.prepare(r, engine.encode(r)) for r in requests]
    alone = [engine.sketch(s) for s in states]
    batch = DenoiseBatch(engine.family, "sketch", max_batch_size=4)
    for i, s in enumerate(states):
        batch.add(str(i), s)
    done: dict = {}
    while batch:
        done.update(batch.step())
    for i, single in enumerate(alone):
        torch.testing.assert_close(done[str(i)].latents, single.latents, atol=1e-5, rtol=0)


def test_requests_join_a_running_batch_at_step_boundaries(engine):
    first, second = request("step:4", seed=1), request("step:4", seed=2)
    s1, s2 = (engine.prepare(r, engine.encode(r)) for r in (first, second))
    batch = DenoiseBatch(engine.family, "sketch")
    batch.add("a", s1)
    batch.step()
    batch.step()
    batch.add("b", s2)  # joins two steps later
    done: dict = {}
    while batch:
        done.update(batch.step())
    torch.testing.assert_close(done["a"].latents, engine.sketch(s1).latents, atol=1e-5, rtol=0)
    torch.testing.assert_close(done["b"].latents, engine.sketch(s2).latents, atol=1e-5, rtol=0)


def test_cancel_stops_at_a_step_boundary(engine):
    seen = []
    with pytest.raises(Cancelled):
        engine.generate(request("none"), on_step=lambda i, n: seen.append(i), should_cancel=lambda: len(seen) >= 2)
    assert seen == [1, 2]


def test_progress_reports_every_global_step(engine):
    seen = []
    engine.generate(request("step:3"), on_step=lambda i, n: seen.append((i, n)))
    assert seen == [(i, STEPS) for i in range(1, STEPS + 1)]


def test_first_block_cache_composes_with_the_global_step_index(wan_unipc_dir):
    spec = resolve_model_spec(wan_unipc_dir)
    cached = SREngine.load(spec.model_copy(update={"sketch_cache": CacheConfig(threshold=1e9),
                                                   "render_cache": CacheConfig(threshold=1e9)}))
    seen: dict[str, list[int]] = {"sketch": [], "render": []}
    for role, model in cached.family.transformers.items():
        original = model.cache_context

        def spy(name, _original=original, _role=role, **kw):
            if name.endswith("/cond"):  # one state per request: "<key>/cond"
                seen[_role].append(kw["step_index"])
            return _original(name, **kw)

        model.cache_context = spy
    out = cached.generate(request("step:3"))
    assert seen == {"sketch": [0, 1, 2], "render": [3, 4, 5, 6, 7]}
    plain = SREngine.load(spec).generate(request("step:3"))
    # A huge threshold skips every step after each model's first: the cache really is in the loop.
    assert not np.allclose(out.frames, plain.frames, atol=1e-4)
    assert np.isfinite(out.frames).all()
