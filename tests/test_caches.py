"""Step caches on Wan: each kind runs and skips work, equals diffusers' WanPipeline where diffusers defines the
result, and keeps a request's result independent of its batch companions (state per request)."""
from __future__ import annotations

import ast

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from srserve.config import CacheConfig, GenerationRequest
from srserve.pipeline.caches import StepCache, calibrate_mag_ratios, diffusers_config, step_cache
from srserve.pipeline.engine import DenoiseBatch, SREngine
from srserve.pipeline.spec import resolve_model_spec

PROMPT = "a red circle moving left"
STEPS, FRAMES, SIZE = 8, 9, 32
# Settings that make each kind skip on the tiny random model (its defaults tuned for real checkpoints may not).
EVERYWHERE = (-1.0, 1001.0)
KINDS = {
    "first_block": dict(threshold=0.3),
    "mag": dict(threshold=10.0, retention_ratio=0.0),
    "taylorseer": dict(cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype="float32"),
    "pyramid_attention_broadcast": dict(spatial_attention_timestep_skip_range=EVERYWHERE),
    "faster": dict(spatial_attention_timestep_skip_range=EVERYWHERE,
                   unconditional_batch_timestep_skip_range=EVERYWHERE, unconditional_batch_skip_range=2),
    "sea": dict(threshold=10.0, retention_steps=0, cache_end_steps=0),
}


def request(switch: str, seed: int = 3, steps: int = STEPS, **kw) -> GenerationRequest:
    return GenerationRequest(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=steps, num_frames=FRAMES,
                             height=SIZE, width=SIZE, seed=seed, guidance_scale=5.0, switch=switch, **kw)


@pytest.fixture(scope="module")
def spec(wan_unipc_dir):
    return resolve_model_spec(wan_unipc_dir)


@pytest.fixture(scope="module")
def mag_ratios(spec):
    return {role: calibrate_mag_ratios(spec, role, request("none")) for role in ("sketch", "render")}


def cache(kind: str, mag_ratios: dict, role: str = "render", **kw) -> CacheConfig:
    extra = {"mag_ratios": mag_ratios[role]} if kind == "mag" else {}
    return CacheConfig(kind=kind, **{**KINDS[kind], **extra, **kw})


def cached_engine(spec, role: str, config: CacheConfig) -> SREngine:
    return SREngine.load(spec.model_copy(update={f"{role}_cache": config}))


def count_self_attention(model: torch.nn.Module) -> list[int]:
    """Calls of the last block's self-attention projection: they happen only when that attention really runs."""
    calls = [0]
    model.blocks[-1].attn1.to_q.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# --- configuration ----------------------------------------------------------------------------------------------
def test_cache_config_fills_diffusers_defaults_and_refuses_other_kinds_parameters():
    assert CacheConfig().params() == {"threshold": 0.05}
    assert CacheConfig(kind="sea").params()["threshold"] == 0.25
    assert CacheConfig(kind="faster").unconditional_batch_skip_range == 5
    assert CacheConfig.model_validate(CacheConfig(kind="sea").model_dump()) == CacheConfig(kind="sea")
    with pytest.raises(ValidationError, match="threshold: not a parameter of the taylorseer cache"):
        CacheConfig(kind="taylorseer", threshold=0.1)
    with pytest.raises(ValidationError, match="mag_ratios"):
        CacheConfig(kind="mag")
    with pytest.raises(ValidationError, match="low < high"):
        CacheConfig(kind="pyramid_attention_broadcast", spatial_attention_timestep_skip_range=(800, 100))
    with pytest.raises(ValidationError, match="disable_cache_after_step"):
        CacheConfig(kind="taylorseer", disable_cache_before_step=3, disable_cache_after_step=2)
    with pytest.raises(ValidationError):
        CacheConfig(kind="text_kv")  # diffusers' TextKVCache applies to NucleusMoE blocks only
    with pytest.raises(ValidationError):
        CacheConfig(threshold=-1.0)
    with pytest.raises(ValidationError):
        CacheConfig(unknown=1)
    with pytest.raises(ValidationError):
        CacheConfig().threshold = 0.2  # frozen


def test_wan_only_kinds_are_refused_on_other_transformers():
    with pytest.raises(ValueError, match="render_cache: the sea cache is offered for Wan transformers only"):
        StepCache.attach(torch.nn.Linear(2, 2), CacheConfig(kind="sea"), "render_cache")


def test_calibrated_mag_ratios_are_diffusers_own(spec, mag_ratios, capsys):
    """The helper's ratios are what diffusers' calibration mode prints for the same run (large model, `none`)."""
    import diffusers
    from diffusers import WanPipeline

    assert len(mag_ratios["sketch"]) == STEPS and mag_ratios["sketch"][0] == 1.0
    assert all(r > 0 for r in mag_ratios["render"])
    pipe = WanPipeline.from_pretrained(spec.base_path)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.enable_cache(diffusers.MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    capsys.readouterr()
    pipe(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=STEPS, num_frames=FRAMES, height=SIZE, width=SIZE,
         guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(3), output_type="latent")
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[1.0")]
    assert np.allclose(ast.literal_eval(printed[0]), mag_ratios["sketch"], rtol=0, atol=1e-6)  # "cond" ends first


# --- each kind: it runs, it skips work, it changes the output ---------------------------------------------------
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_kind_skips_work_on_the_render_model(spec, mag_ratios, kind, one_torch_thread):
    plain = SREngine.load(spec)
    cached = cached_engine(spec, "render", cache(kind, mag_ratios))
    calls = {name: count_self_attention(e.family.transformers["render"]) for name, e in
             (("plain", plain), ("cached", cached))}
    ref, out = plain.generate(request("step:2")), cached.generate(request("step:2"))
    assert calls["cached"][0] < calls["plain"][0]  # some render attention was skipped
    assert np.isfinite(out.frames).all() and not np.array_equal(out.frames, ref.frames)
    assert step_cache(cached.family.transformers["render"]).active_keys() == set()  # freed on retire


@pytest.mark.parametrize("kind", ["first_block", "sea", "taylorseer"])
def test_cached_split_run_equals_diffusers_wan_pipeline(spec, kind, mag_ratios, one_torch_thread):
    """diffusers runs a cache on `transformer_2` from the boundary on: the same as our render stage with it."""
    from diffusers import WanPipeline

    config = cache(kind, mag_ratios)
    pipe = WanPipeline.from_pretrained(spec.base_path, boundary_ratio=0.9)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer_2.enable_cache(diffusers_config(config, lambda: 0.0))
    theirs = pipe(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=STEPS, num_frames=FRAMES,
                  height=SIZE, width=SIZE, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(3),
                  output_type="np").frames[0]
    ours = cached_engine(spec, "render", config).generate(request("ratio:0.9"))
    assert 0 < ours.switch_step < STEPS
    np.testing.assert_allclose(ours.frames, theirs, atol=1e-5, rtol=0)


def test_mag_cache_indexes_its_ratios_by_the_global_step(spec, mag_ratios, one_torch_thread):
    """diffusers' MagCache counts steps from the model's first call: on `transformer_2` that is step k. Ours reads
    ratio k at step k, which diffusers gives only when handed the ratios from k on."""
    import diffusers
    from diffusers import WanPipeline

    threshold = 0.05  # near the ratios' deviations from 1, so which ratio a step reads decides what it skips
    ours = cached_engine(spec, "render", cache("mag", mag_ratios, threshold=threshold)).generate(request("ratio:0.9"))
    k = ours.switch_step

    def diffusers_frames(ratios: list[float]) -> np.ndarray:
        pipe = WanPipeline.from_pretrained(spec.base_path, boundary_ratio=0.9)
        pipe.set_progress_bar_config(disable=True)
        pipe.transformer_2.enable_cache(diffusers.MagCacheConfig(
            threshold=threshold, retention_ratio=0.0, mag_ratios=ratios, num_inference_steps=STEPS - k))
        return pipe(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=STEPS, num_frames=FRAMES,
                    height=SIZE, width=SIZE, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(3),
                    output_type="np").frames[0]

    np.testing.assert_allclose(ours.frames, diffusers_frames(mag_ratios["render"][k:]), atol=1e-5, rtol=0)
    assert not np.allclose(ours.frames, diffusers_frames(mag_ratios["render"][:STEPS - k]), atol=1e-5)


# --- batching: a request's result does not depend on its companions ---------------------------------------------
def join_render_batch(engine: SREngine, states: dict, joins: dict[str, int]) -> dict:
    """Render `states` in one batch, each joining after `joins[key]` batch steps; the results by key."""
    batch = DenoiseBatch(engine.family, "render", max_batch_size=8)
    done: dict = {}
    sizes, tick = [], 0
    while len(done) < len(states):
        for key, at in joins.items():
            if at == tick:
                batch.add(key, states[key])
        sizes.append(len(batch))
        done.update(batch.step())
        tick += 1
    assert all(not isinstance(v, BaseException) for v in done.values()), done
    return done, sizes


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_requests_joining_a_cached_render_batch_equal_their_solo_runs(spec, mag_ratios, kind, one_torch_thread):
    engine = cached_engine(spec, "render", cache(kind, mag_ratios))
    # different switch steps, seeds and step counts; joining at different batch steps, so the batch grows to 3 and
    # shrinks as they finish
    requests = {"a": request("step:2", seed=1), "b": request("step:3", seed=2), "c": request("step:3", seed=4,
                                                                                           steps=10)}
    states = {k: engine.sketch(engine.prepare(r, engine.encode(r))) for k, r in requests.items()}
    solo = {k: engine.render(s) for k, s in states.items()}
    forwards: list[int] = []
    predict = engine.family.predict
    engine.family.predict = lambda role, batch: forwards.append(len(batch)) or predict(role, batch)
    together, sizes = join_render_batch(engine, states, {"a": 0, "b": 1, "c": 3})
    assert max(sizes) == 3 and sizes[-1] < 3 and set(forwards) == {1}  # each cached request steps alone
    for key in requests:
        # stepping alone is bit-exact, beyond the 1e-5 that a shared forward allows
        assert torch.equal(together[key].latents, solo[key].latents), key
    assert step_cache(engine.family.transformers["render"]).active_keys() == set()


def test_discard_frees_a_requests_cache_state(spec, mag_ratios):
    engine = cached_engine(spec, "render", cache("first_block", mag_ratios))
    r = request("step:2")
    batch = DenoiseBatch(engine.family, "render")
    batch.add("x", engine.sketch(engine.prepare(r, engine.encode(r))))
    batch.step()
    assert batch.cache.active_keys() == {"x"}
    batch.discard("x")
    assert batch.cache.active_keys() == set() and not batch


def test_cache_compare_names_each_kind_on_each_role(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from cache_compare import cache_configs, write_doc

    configs = cache_configs(["first_block", "mag"], ["render", "both"], {"first_block": {"threshold": 0.1}},
                            {"sketch": [1.0, 0.9], "render": [1.0, 0.8]})
    assert list(configs) == ["sr", "first_block@render", "first_block@both", "mag@render", "mag@both"]
    assert configs["first_block@render"]["render_cache"].threshold == 0.1
    assert configs["mag@both"]["sketch_cache"].mag_ratios == (1.0, 0.9)
    doc = tmp_path / "doc.md"
    doc.write_text("# notes\n")
    write_doc(doc, "| a |", "cmd one")
    write_doc(doc, "| b |", "cmd two")  # replaces its block, keeps the rest
    text = doc.read_text()
    assert text.startswith("# notes\n") and "| b |" in text and "| a |" not in text and text.count("cmd two") == 1
