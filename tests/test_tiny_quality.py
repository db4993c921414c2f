"""srd-tiny through the engine: it loads as the default model, and it has learned its domain.

The smoke thresholds must hold for the trained bundle and fail for a random-weight copy of it (same configs,
same VAE and text encoder, untrained transformers): the test can tell a model that learned from one that did not.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from srserve.config import GenerationRequest
from srserve.pipeline.engine import SREngine
from srserve.pipeline.spec import resolve_model_spec
from srserve.tiny import BUNDLE_PATH, default_model_path
from srserve.tiny.evaluate import score_video, summarize
from srserve.tiny.quality import held_out_pairs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMOKE_PAIRS = 8
MIN_ACCURACY = 75.0  # percent of the smoke videos, on each of color, shape and motion


def smoke_accuracy(model_dir, switch: str) -> dict:
    engine = SREngine.load(resolve_model_spec(model_dir))
    scores = []
    for prompt, seed in held_out_pairs(SMOKE_PAIRS * 9)[::9]:  # spread over colors, shapes, directions
        result = engine.generate(GenerationRequest(prompt=prompt, seed=seed, switch=switch))
        scores.append(score_video(result.frames, prompt))
    return summarize(scores)


@pytest.fixture(scope="module")
def random_copy(tmp_path_factory):
    from diffusers import WanTransformer3DModel

    target = tmp_path_factory.mktemp("srd-tiny-random") / "srd-tiny"
    shutil.copytree(BUNDLE_PATH, target)
    for i, name in enumerate(("transformer", "transformer_2")):
        config = WanTransformer3DModel.load_config(target / name)
        torch.manual_seed(i)
        WanTransformer3DModel.from_config(config).save_pretrained(target / name)
    return target


def test_bundle_is_the_default_model():
    assert default_model_path() == str(BUNDLE_PATH)
    spec = resolve_model_spec(default_model_path())
    assert spec.name == "srd-tiny" and spec.family == "wan"
    assert (spec.default_num_frames, spec.default_height, spec.default_width) == (17, 64, 64)


def test_bundle_runs_through_the_engine_with_its_defaults():
    engine = SREngine.load(resolve_model_spec(default_model_path()))
    result = engine.generate(GenerationRequest(prompt="a green square moving up"))
    assert result.frames.shape == (17, 64, 64, 3)
    assert 0 < result.switch_step < result.num_inference_steps  # the default policy really splits


@pytest.mark.parametrize("switch", ["none", "adaptive"])
def test_trained_bundle_passes_the_quality_smoke(switch):
    summary = smoke_accuracy(BUNDLE_PATH, switch)
    assert min(summary["color_acc"], summary["shape_acc"], summary["motion_acc"]) >= MIN_ACCURACY, summary


def test_random_weight_copy_fails_the_quality_smoke(random_copy):
    summary = smoke_accuracy(random_copy, "none")
    assert min(summary["color_acc"], summary["shape_acc"], summary["motion_acc"]) < MIN_ACCURACY, summary


def test_quality_command_writes_one_table_per_form(tmp_path):
    from srserve.tiny import quality

    doc, out = tmp_path / "doc.md", tmp_path / "q.json"
    doc.write_text("# intro\n")
    argv = ["--videos", "2", "--steps", "4", "--policies", "none,small-only", "--form", "core,then",
            "--out-json", str(out), "--doc", str(doc), "--threads", "1"]
    for _ in range(2):  # the second run replaces both blocks
        assert quality.main(argv) == 0
    text = doc.read_text()
    for form in ("core", "then"):
        start, end = quality.form_marks(form)
        assert text.count(start) == 1 and text.count(end) == 1
        block = text[text.index(start):text.index(end)]
        assert f"of the `{form}` form" in block and "| `small-only` |" in block
        result = json.loads(quality.form_path(out, form).read_text())
        assert result["form"] == form and [r["policy"] for r in result["rows"]] == ["none", "small-only"]
    assert quality.form_path(out, "then").name == "q-then.json" and text.startswith("# intro\n")


@pytest.mark.parametrize("form", ["pairs", "core,core", ""])
def test_quality_command_rejects_unknown_forms(form, capsys):
    from srserve.tiny import quality

    with pytest.raises(SystemExit):
        quality.main(["--form", form, "--videos", "1"])
    assert "--form" in capsys.readouterr().err
