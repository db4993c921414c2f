"""CogVideoX: the engine against diffusers' CogVideoXPipeline, the 5B->2B-style switch, the latent re-timing."""
from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch

from srserve.config import GenerationRequest
from srserve.pipeline.engine import SREngine
from srserve.pipeline.families.cogvideox import CogVideoXFamily, noise_level, retime_latents
from srserve.pipeline.handoff import HandoffState
from srserve.pipeline.spec import ModelSpecError, resolve_model_spec
from srserve.tiny.random_model import COGVIDEOX_TEXT_LEN, build_random_cogvideox

PROMPT = "a red circle moving left"
STEPS, FRAMES, SIZE, GUIDANCE = 4, 9, 32, 6.0
SKETCH = dict(scaling_factor=0.7, snr_shift_scale=1.0, rotary=True, heads=2, head_dim=16, layers=2)  # like 5B
RENDER = dict(scaling_factor=1.15258426, snr_shift_scale=3.0, rotary=False, heads=1, head_dim=16, layers=1)  # 2B


def request(switch: str, seed: int = 3) -> GenerationRequest:
    return GenerationRequest(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=STEPS, num_frames=FRAMES,
                             height=SIZE, width=SIZE, seed=seed, guidance_scale=GUIDANCE, switch=switch)


def write_spec(path, base, render_dir=None, render_base=None) -> str:
    """A spec file: the base directory's transformer sketches, `render_dir`'s (default: the same) renders."""
    spec = {"name": "tiny-cog", "family": "cogvideox", "base_path": str(base),
            "render_transformer": str((render_dir or base) / "transformer")}
    if render_base is not None:
        spec["render_base_path"] = str(render_base)
    path.write_text(json.dumps(spec))
    return str(path)


@pytest.fixture(scope="module")
def cog_dirs(tmp_path_factory):
    """Sketch and render pipelines sharing T5 and VAE weights (same seed), for each scheduler."""
    root = tmp_path_factory.mktemp("cogvideox")
    dirs = {}
    for sched in ("ddim", "dpm"):
        dirs[sched, "sketch"] = build_random_cogvideox(root / f"{sched}-sketch", seed=0, scheduler=sched, **SKETCH)
        dirs[sched, "render"] = build_random_cogvideox(root / f"{sched}-render", seed=0, scheduler=sched, **RENDER)
    return root, dirs


def diffusers_frames(model_dir, dynamic_cfg: bool, seed: int = 3) -> np.ndarray:
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=STEPS, num_frames=FRAMES, height=SIZE,
               width=SIZE, guidance_scale=GUIDANCE, use_dynamic_cfg=dynamic_cfg, max_sequence_length=COGVIDEOX_TEXT_LEN,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return out.frames[0]


def load(spec_file: str, dynamic_cfg: bool = False, roles=("encode", "sketch", "render", "decode")) -> SREngine:
    engine = SREngine.load(resolve_model_spec(spec_file), roles=roles)
    assert isinstance(engine.family, CogVideoXFamily)
    engine.family.use_dynamic_cfg = dynamic_cfg
    return engine


# DPM with dynamic CFG is CogVideoX-5b's recommended setting; DDIM without it, the 2b's.
@pytest.mark.parametrize("sched,dynamic", [("ddim", False), ("dpm", True)])
def test_none_equals_diffusers(cog_dirs, sched, dynamic):
    root, dirs = cog_dirs
    engine = load(write_spec(root / f"none-{sched}.json", dirs[sched, "sketch"]), dynamic)
    ours = engine.generate(request("none"))
    assert ours.switch_step == STEPS and ours.frames.shape == (FRAMES, SIZE, SIZE, 3)
    theirs = diffusers_frames(dirs[sched, "sketch"], dynamic)
    assert np.abs(ours.frames - theirs).max() <= 1e-5


def test_small_only_equals_diffusers_with_the_render_model(cog_dirs):
    """From step 0 on the render model: its own scheduler and scaling factor, the sketch's shared T5 and VAE."""
    root, dirs = cog_dirs
    spec = write_spec(root / "small.json", dirs["dpm", "sketch"], dirs["dpm", "render"], dirs["dpm", "render"])
    ours = load(spec).generate(request("small-only"))
    assert ours.switch_step == 0
    assert np.abs(ours.frames - diffusers_frames(dirs["dpm", "render"], False)).max() <= 1e-5


@pytest.mark.parametrize("sched", ["ddim", "dpm"])
def test_sr_switch_between_models_with_different_scales_and_schedules(cog_dirs, sched):
    root, dirs = cog_dirs
    spec = write_spec(root / f"sr-{sched}.json", dirs[sched, "sketch"], dirs[sched, "render"], dirs[sched, "render"])
    engine = load(spec)
    family = engine.family
    assert family.scaling == {"sketch": 0.7, "render": 1.15258426}
    assert family.scheduler_configs["render"]["snr_shift_scale"] == 3.0
    result = engine.generate(request("step:2"))
    assert result.switch_step == 2
    assert result.frames.shape == (FRAMES, SIZE, SIZE, 3) and result.frames.dtype == np.float32
    assert np.isfinite(result.frames).all() and np.isfinite(result.latents).all()
    assert not np.array_equal(result.frames, engine.generate(request("none")).frames)


def test_pickle_handoff_reproduces_in_process_run(cog_dirs):
    """Sketch, render and decode on separately loaded engines, state pickled between: bit for bit (DPM draws
    noise every step and carries x0, so the generator and extras must travel)."""
    root, dirs = cog_dirs
    spec = write_spec(root / "split.json", dirs["dpm", "sketch"], dirs["dpm", "render"], dirs["dpm", "render"])
    whole = load(spec, True).generate(request("step:2"))
    hop = lambda s: HandoffState.from_bytes(pickle.loads(pickle.dumps(s.to_bytes())))  # noqa: E731
    encoder = load(spec, True, roles=("encode",))
    state = hop(encoder.prepare(request("step:2"), encoder.encode(request("step:2"))))
    state = hop(load(spec, True, roles=("sketch",)).sketch(state))
    assert state.step_index == 2 and state.family_state["space"] == "sketch"
    renderer = load(spec, True, roles=("render", "decode"))
    state = hop(renderer.render(state))
    assert state.family_state["space"] == "vae"
    assert torch.equal(state.latents, whole.latents)
    assert np.array_equal(renderer.decode(state), whole.frames)


# --- the re-timing math ---------------------------------------------------------------------------------------
def test_retime_is_identity_for_equal_scales_and_levels():
    x, x0 = torch.randn(1, 3, 4, 4, 4), torch.randn(1, 3, 4, 4, 4)
    assert retime_latents(x, x0, 0.37, 0.37, 1.0) is x


def test_retime_moves_a_clean_x0_to_the_render_level_and_scale():
    g = torch.Generator().manual_seed(0)
    x0_vae = torch.randn(1, 3, 4, 4, 4, generator=g, dtype=torch.float64)  # the VAE's latent, shared
    eps = torch.randn(1, 3, 4, 4, 4, generator=g, dtype=torch.float64)
    s_src, s_dst, a_src, a_dst = 0.7, 1.15258426, 0.3, 0.12
    x_src = math.sqrt(a_src) * s_src * x0_vae + math.sqrt(1 - a_src) * eps
    out = retime_latents(x_src.float(), (s_src * x0_vae).float(), a_src, a_dst, s_dst / s_src)
    expected = math.sqrt(a_dst) * s_dst * x0_vae + math.sqrt(1 - a_dst) * eps
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    back = retime_latents(out, (s_dst * x0_vae).float(), a_dst, a_src, s_src / s_dst)  # and back again
    torch.testing.assert_close(back.double(), x_src, atol=1e-5, rtol=0)


def test_retime_of_a_clean_sample_only_rescales():
    x0 = torch.randn(2, 3)
    torch.testing.assert_close(retime_latents(x0, x0, 1.0, 1.0, 2.0), 2.0 * x0)


def test_noise_level_is_where_the_scheduler_put_the_sample():
    from diffusers import CogVideoXDDIMScheduler

    for snr, n in ((1.0, 4), (3.0, 7)):  # 7 steps: trailing timesteps are not evenly spaced
        sched = CogVideoXDDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=snr,
                                       timestep_spacing="trailing")
        sched.set_timesteps(n)
        assert noise_level(sched, 0) == 0.0  # zero terminal SNR: the first sample is pure noise
        x0, eps = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
        for k in range(1, n):
            t = int(sched.timesteps[k - 1])
            a_t = float(sched.alphas_cumprod[t])
            sample = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps
            v = math.sqrt(a_t) * eps - math.sqrt(1 - a_t) * x0  # the exact v-prediction
            prev = sched.step(v, t, sample, return_dict=False)[0]
            a = noise_level(sched, k)
            torch.testing.assert_close(prev, math.sqrt(a) * x0 + math.sqrt(1 - a) * eps, atol=1e-6, rtol=0)
        assert noise_level(sched, 2) < noise_level(sched, n - 1) < 1.0


def test_render_vae_may_differ_only_in_scaling_factor(cog_dirs, tmp_path):
    root, dirs = cog_dirs
    sketch, render = dirs["ddim", "sketch"], dirs["ddim", "render"]
    resolve_model_spec(write_spec(tmp_path / "ok.json", sketch, render, render))  # scaling_factor differs: fine
    bad = tmp_path / "bad"
    (bad / "vae").mkdir(parents=True)
    config = json.loads((render / "vae" / "config.json").read_text())
    (bad / "vae" / "config.json").write_text(json.dumps({**config, "latent_channels": 8}))
    with pytest.raises(ModelSpecError, match="latent_channels"):
        resolve_model_spec(write_spec(tmp_path / "bad.json", sketch, render, bad))
    with pytest.raises(ModelSpecError, match="does not exist"):
        resolve_model_spec(write_spec(tmp_path / "missing.json", sketch, render, tmp_path / "nowhere"))


def test_card_and_spec_checks_need_no_weights(cog_dirs, tmp_path):
    """The card (what the ingress checks requests with) agrees with the loaded family; a text-length mismatch
    fails at the spec check, before any weights load."""
    from srserve.pipeline.card import model_card

    root, dirs = cog_dirs
    sketch, render = dirs["ddim", "sketch"], dirs["ddim", "render"]
    spec = resolve_model_spec(write_spec(tmp_path / "ok.json", sketch, render, render))
    card, family = model_card(spec), SREngine.load(spec, roles=()).family
    assert (card.frame_stride, card.size_multiple) == (family.vae_scale_temporal, 2 * family.vae_scale_spatial)
    assert (card.default_num_frames, card.default_width) == (family.defaults.num_frames, family.defaults.width)
    odd = tmp_path / "odd"
    (odd / "transformer").mkdir(parents=True)
    config = json.loads((render / "transformer" / "config.json").read_text())
    (odd / "transformer" / "config.json").write_text(json.dumps({**config, "max_text_seq_length": 77}))
    with pytest.raises(ModelSpecError, match="max_text_seq_length"):
        resolve_model_spec(write_spec(tmp_path / "odd.json", sketch, odd))


def test_requests_joining_a_cached_sketch_batch_equal_their_solo_runs(cog_dirs, tmp_path):
    """FirstBlockCache on CogVideoX: per-request cache state, so joining a batch changes nothing."""
    from srserve.config import CacheConfig
    from srserve.pipeline.batch import DenoiseBatch
    from srserve.pipeline.caches import step_cache

    _, dirs = cog_dirs
    spec = resolve_model_spec(write_spec(tmp_path / "spec.json", dirs["ddim", "sketch"], dirs["ddim", "render"]))
    spec = spec.model_copy(update={"sketch_cache": CacheConfig(kind="first_block", threshold=0.5)})
    engine = SREngine.load(spec, roles=("encode", "sketch"))
    requests = {"a": request("step:4", seed=1), "b": request("step:3", seed=2), "c": request("step:4", seed=4)}
    states = {k: engine.prepare(r, engine.encode(r)) for k, r in requests.items()}
    solo = {k: engine.sketch(s) for k, s in states.items()}
    batch, done, tick, sizes = DenoiseBatch(engine.family, "sketch", max_batch_size=8), {}, 0, []
    while len(done) < len(states):
        for key, at in {"a": 0, "b": 1, "c": 2}.items():
            if at == tick:
                batch.add(key, states[key])
        sizes.append(len(batch))
        done.update(batch.step())
        tick += 1
    assert max(sizes) == 3
    for key in requests:
        assert not isinstance(done[key], BaseException), done[key]
        assert torch.equal(done[key].latents, solo[key].latents), key
    assert step_cache(engine.family.transformers["sketch"]).active_keys() == set()
