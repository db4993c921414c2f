"""The simulated family: spec and checkpoint of configs, real-size states, time spent per the cost table, and the
adaptive rule firing at the drawn switch step. No Ray, no weights, no torch (checked in a fresh interpreter)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from srserve.pipeline.errors import ModelSpecError
from srserve.pipeline.spec import resolve_model_spec
from srserve.pipeline.switch import AdaptiveSwitch
from srserve.sim.spec import BUNDLE_DIR, BUNDLES, SimSpec, checkpoint_files, load_sim_spec, write_sim_checkpoint

BUNDLE = BUNDLE_DIR / "wan2.1-sim-h100-l40s"


def test_shipped_bundles_are_what_the_writer_writes():
    for name, sim in BUNDLES.items():
        for rel, text in checkpoint_files(sim, name).items():
            assert (BUNDLE_DIR / name / rel).read_text() == text, (name, rel)


def test_spec_resolves_without_torch_and_names_the_family():
    spec = resolve_model_spec(BUNDLE)
    assert spec.family == "sim" and spec.name == "wan2.1-sim-h100-l40s"
    sim = load_sim_spec(spec)
    assert sim.gpu_for("sketch") == "h100" and sim.gpu_for("render") == sim.gpu_for("decode") == "l40s"
    assert sim.model_for("encode") == "umt5-xxl"


def test_bad_sim_settings_fail_as_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="GPU"):
        SimSpec(render_gpu="tpu-v5")
    with pytest.raises(ValueError, match="switch distribution"):
        SimSpec(switch_distribution="nope")
    with pytest.raises(ValueError, match="preview_size"):
        SimSpec(preview_size=(15, 16))
    path = write_sim_checkpoint(tmp_path / "sim", SimSpec(render_gpu="l4"))
    (path / "sim.json").write_text(json.dumps({"sketch_gpu": "h100", "time_factor": -1}))
    with pytest.raises(ModelSpecError, match="time_factor"):
        resolve_model_spec(path)
    (path / "sim.json").unlink()
    with pytest.raises(ModelSpecError, match="sim.json"):
        resolve_model_spec(path)
    write_sim_checkpoint(path, SimSpec(sketch_model="wan2.1-t2v-1.3b"))  # sim.json says 1.3B, configs say 1.3B
    resolve_model_spec(path)
    config = json.loads((path / "transformer" / "config.json").read_text())
    (path / "transformer" / "config.json").write_text(json.dumps({**config, "num_layers": 40}))
    with pytest.raises(ModelSpecError, match="num_layers"):
        resolve_model_spec(path)


def _rule_switch(target: int, num_steps: int, threshold: float = 0.01, lo: int = 3, hi: int | None = None) -> int:
    """Feed the real AdaptiveSwitch with the sim's outputs and their float32 relative changes, as SimBatch does;
    the step it switches after."""
    from srserve.sim.engine import relative_change, sketch_output

    rule = AdaptiveSwitch(threshold, lo, hi if hi is not None else num_steps)
    prev = None
    for i in range(num_steps):
        out = sketch_output(target, i)
        change = None if prev is None else relative_change(out, prev)
        prev = out
        if rule.observe(i, change):
            return i + 1
    return num_steps


def test_relative_change_is_the_one_denoise_batch_computes():
    torch = pytest.importorskip("torch")
    from srserve.sim.engine import relative_change, sketch_output

    for target, i in ((7, 5), (20, 19), (20, 30)):
        out, prev = (torch.tensor([sketch_output(target, j)], dtype=torch.float32) for j in (i, i - 1))
        expected = float((out - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12))
        assert relative_change(sketch_output(target, i), sketch_output(target, i - 1)) == expected


def test_schedule_is_diffusers_unipc_without_diffusers():
    diffusers = pytest.importorskip("diffusers")
    from srserve.sim.engine import flow_timesteps

    config = json.loads((BUNDLE / "scheduler" / "scheduler_config.json").read_text())
    for n in (1, 20, 30, 50, 100):
        scheduler = diffusers.UniPCMultistepScheduler.from_config(config)
        scheduler.set_timesteps(n)
        assert flow_timesteps(config, n) == tuple(scheduler.timesteps.tolist()), n
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        flow_timesteps({**config, "use_flow_sigmas": False}, 50)


def test_a_simulated_request_imports_neither_torch_nor_diffusers():
    code = ("import sys; from srserve.config import GenerationRequest; from srserve.pipeline.families import "
            "load_engine; from srserve.pipeline.spec import resolve_model_spec; "
            f"e = load_engine(resolve_model_spec({str(BUNDLE)!r})); e.family.sleep = lambda s: None; "
            "r = e.generate(GenerationRequest(prompt='a red ball', seed=1)); "
            "import srserve.serving.app; print(r.frames.shape[0], 'torch' in sys.modules, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["81", "False", "False"]


@pytest.mark.parametrize("num_steps", [20, 50, 200, 1000])
def test_outputs_make_the_adaptive_rule_fire_at_the_target(num_steps):
    for target in sorted({3, 4, 7, num_steps // 3, num_steps // 2, num_steps - 1}):
        assert _rule_switch(target, num_steps) == target, target
    assert _rule_switch(2, num_steps) == 3  # the rule needs two diffs: the earliest it can fire
    assert _rule_switch(num_steps // 2, num_steps, lo=num_steps // 2 + 3) == num_steps // 2 + 3  # its min holds
    assert _rule_switch(num_steps // 2, num_steps, hi=5) == 5  # a cap (max=) holds
    assert _rule_switch(num_steps // 2, num_steps, threshold=0.02) == num_steps // 2


@pytest.fixture(scope="module")
def engine():
    from srserve.pipeline.families import load_engine

    e = load_engine(resolve_model_spec(BUNDLE))
    slept: list[float] = []
    e.family.sleep = slept.append
    e.family.slept = slept
    return e


def test_states_have_the_real_size(engine):
    from srserve.config import GenerationRequest

    request = GenerationRequest(prompt="a red ball", seed=3)
    embeddings = engine.encode(request)
    assert tuple(embeddings.prompt_embeds.shape) == (1, 512, 4096)
    assert embeddings.prompt_embeds.itemsize == 2 and embeddings.negative_prompt_embeds is not None  # bf16 words
    state = engine.prepare(request, embeddings)
    assert tuple(state.latents.shape) == (1, 16, 21, 60, 104) and state.latents.dtype == "float32"
    assert state.nbytes() == 2 * 512 * 4096 * 2 + 16 * 21 * 60 * 104 * 4
    assert state.num_steps == 50 and state.timesteps[0] == 999 and state.timesteps[-1] < state.timesteps[0]
    assert state.for_decode().embeddings is None and state.for_decode().latents is state.latents


def test_states_cross_the_wire_as_raw_buffers_read_in_place(engine):
    """A simulated state leaves as a small pickle and its arrays' buffers; the receiver's arrays are views of the
    buffers it got (the object store's, in Ray): no copy, unlike a torch state's tensors."""
    from srserve.config import GenerationRequest
    from srserve.serving.messages import StageMessage, dump_state, load_state

    request = GenerationRequest(prompt="a red ball", seed=3)
    state = engine.prepare(request, engine.encode(request))
    header, buffers = dump_state(state)
    assert len(header) < 4096 and sum(b.raw().nbytes for b in buffers) == state.nbytes()
    received = [memoryview(bytearray(b.raw())).toreadonly() for b in buffers]  # what a reader maps
    back = load_state(header, received)
    assert back.latents.shape == state.latents.shape and not back.latents.flags.owndata
    assert back.request == state.request and back.timesteps == state.timesteps
    msg = StageMessage("j", 0, request, 16, False, state=state.replace(embeddings=None))
    func, args = msg.__reduce__()
    assert func(*args).state.latents.shape == state.latents.shape
    with pytest.raises(ValueError, match="version 7 is not supported"):
        load_state(*dump_state(state.replace(version=7)))


def test_generate_spends_the_tables_time_and_switches_where_drawn(engine):
    from srserve.config import GenerationRequest
    from srserve.sim.costs import default_table

    fam, table = engine.family, default_table()
    fam.slept.clear()
    fam.simulated_seconds = dict.fromkeys(fam.simulated_seconds, 0.0)
    switches = []
    for seed in range(4):
        request = engine.resolve(GenerationRequest(prompt="a red ball", seed=seed))
        target = fam.target_switch(seed, 50)
        result = engine.generate(request)
        assert result.switch_step == target
        assert result.frames.shape == (81, 16, 16, 3)
        switches.append(target)
    assert len(set(switches)) > 1  # drawn per seed
    k = sum(switches)
    expected = {"encode": 4 * table.text_encode_seconds("l40s"),
                "sketch": k * table.step_seconds("wan2.1-t2v-14b", "h100"),
                "render": (200 - k) * table.step_seconds("wan2.1-t2v-1.3b", "l40s"),
                "decode": 4 * table.vae_decode_seconds("l40s")}
    for role, seconds in expected.items():
        assert fam.simulated_seconds[role] == pytest.approx(seconds), role
    assert sum(fam.slept) == pytest.approx(sum(expected.values()) * fam.sim.time_factor)


def test_fixed_and_capped_policies_and_unguided_render(engine):
    from srserve.config import GenerationRequest
    from srserve.sim.costs import default_table

    assert engine.generate(GenerationRequest(prompt="x", seed=0, switch="step:20")).switch_step == 20
    assert engine.generate(GenerationRequest(prompt="x", seed=5, switch="adaptive:0.01:max=6")).switch_step <= 6
    fam = engine.family
    fam.simulated_seconds["render"] = 0.0
    engine.generate(GenerationRequest(prompt="x", seed=0, switch="step:20", guidance_scale_2=1.0))
    assert fam.simulated_seconds["render"] == pytest.approx(30 * default_table().step_seconds(
        "wan2.1-t2v-1.3b", "l40s", guided=False))


def test_a_batch_costs_what_the_table_says_for_its_size(engine):
    from srserve.config import GenerationRequest
    from srserve.sim.costs import default_table

    fam = engine.family
    batch = engine.new_batch("render", max_batch_size=4)
    for seed in range(3):
        request = GenerationRequest(prompt="x", seed=seed, switch="step:48")
        state = engine.prepare(request, engine.encode(request)).replace(step_index=48)
        batch.add(f"r{seed}", state)
    fam.simulated_seconds["render"] = 0.0
    finished = {}
    while batch:
        finished.update(batch.step())
    assert sorted(finished) == ["r0", "r1", "r2"] and all(s.done for s in finished.values())
    assert fam.simulated_seconds["render"] == pytest.approx(2 * default_table().step_seconds(
        "wan2.1-t2v-1.3b", "l40s", batch=3))
    assert math.isfinite(fam.simulated_seconds["render"])
    assert Path(fam.spec.base_path).name == "wan2.1-sim-h100-l40s"
