"""The request resolver (model card + `resolve`) and the family registry: one set of rules for the API and the
engine, named errors, and no torch where the ingress runs them."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from pydantic import ValidationError

from srserve.api.protocol import ApiError, RequestLimits, VideoCreateBody, resolve_create
from srserve.config import GenerationRequest, ModelSpec
from srserve.pipeline.card import ModelCard, RequestError, model_card, resolve
from srserve.pipeline.families import FAMILIES, family_for_pipeline, family_info
from srserve.pipeline.spec import ModelSpecError, resolve_model_spec
from srserve.tiny import default_model_path

CARD = ModelCard(name="m", fps=8, default_num_frames=9, default_height=32, default_width=48, default_steps=6,
                 default_switch="adaptive", default_guidance_scale_2=2.0)


def test_resolve_fills_the_cards_defaults():
    r = resolve(GenerationRequest(prompt="x", guidance_scale=4.0), CARD)
    assert (r.num_frames, r.height, r.width, r.num_inference_steps) == (9, 32, 48, 6)
    assert r.switch == "adaptive:0.01" and r.guidance_scale_2 == 2.0  # canonical policy; the model's guidance
    no_default = CARD.model_copy(update={"default_guidance_scale_2": None})
    assert resolve(GenerationRequest(prompt="x", guidance_scale=4.0), no_default).guidance_scale_2 == 4.0
    kept = resolve(GenerationRequest(prompt="x", num_frames=13, height=64, switch="step:2", guidance_scale_2=1.0),
                   CARD)
    assert (kept.num_frames, kept.height, kept.switch, kept.guidance_scale_2) == (13, 64, "step:2", 1.0)


@pytest.mark.parametrize("fields, param, words", [
    ({"height": 40}, "height", "multiple of 16"),
    ({"width": 24}, "width", "multiple of 16"),
    ({"num_frames": 10}, "num_frames", "4k+1"),
    ({"switch": "sometimes"}, "switch", "adaptive"),
])
def test_refusals_carry_the_param(fields, param, words):
    with pytest.raises(RequestError) as err:
        resolve(GenerationRequest(prompt="x", **fields), CARD)
    assert isinstance(err.value, ValueError) and err.value.param == param and words in err.value.message
    assert str(err.value).startswith(f"{param}: ")


def test_the_api_resolves_as_the_engine_does(wan_unipc_dir):
    from srserve.pipeline.engine import SREngine

    spec = resolve_model_spec(wan_unipc_dir, default_guidance_scale_2=3.0)
    engine = SREngine.load(spec, roles=())
    card = model_card(spec)
    family = engine.family  # the family's own facts agree with the card's
    assert (card.frame_stride, card.size_multiple) == (family.vae_scale_temporal, 2 * family.vae_scale_spatial)
    assert (card.default_num_frames, card.default_height, card.default_width, card.default_steps) == (
        family.defaults.num_frames, family.defaults.height, family.defaults.width,
        family.defaults.num_inference_steps)
    api = resolve_create(VideoCreateBody(prompt="a red circle", seed=4), card, RequestLimits()).generation
    assert api == engine.resolve(GenerationRequest(prompt="a red circle", seed=4)) == engine.resolve(api)
    with pytest.raises(ApiError) as err:
        resolve_create(VideoCreateBody(prompt="x", num_frames=10), card, RequestLimits())
    assert err.value.param == "num_frames"
    with pytest.raises(RequestError) as err:
        engine.resolve(GenerationRequest(prompt="x", width=40))
    assert err.value.param == "width"


def test_card_refuses_a_bad_default_switch(wan_unipc_dir):
    with pytest.raises(ModelSpecError, match="default_switch"):
        model_card(resolve_model_spec(wan_unipc_dir, default_switch="sometimes"))


def test_registry_facts():
    assert set(FAMILIES) == {"wan", "cogvideox", "sim"}
    assert family_for_pipeline("WanPipeline") is FAMILIES["wan"] and family_for_pipeline("FluxPipeline") is None
    assert FAMILIES["wan"].attention_backends and not FAMILIES["cogvideox"].attention_backends
    # CogVideoX's VAE: 4 blocks (3 halvings), temporal ratio from its config
    assert FAMILIES["cogvideox"].vae_scales({"block_out_channels": [1, 2, 3, 4], "temporal_compression_ratio": 4}
                                            ) == (4, 8)
    with pytest.raises(ModelSpecError, match="family 'flux' is unknown"):
        family_info("flux")
    with pytest.raises(ValidationError, match="unknown model family 'flux'"):
        ModelSpec(base_path="/m", family="flux")


def test_registry_classes_match_their_names():
    for name, info in FAMILIES.items():
        assert info.load().name == name


def test_the_engine_needs_a_model_and_the_app_names_the_bundled_one():
    from srserve.serving.args import AppArgs

    with pytest.raises(ModelSpecError, match="no model given"):
        resolve_model_spec(None)
    assert AppArgs().model == AppArgs(model=None).model == default_model_path()


TORCH_FREE = textwrap.dedent("""
    import json, sys, types
    from pathlib import Path

    import srserve
    # Only the ingress module is under test: srserve/serving/__init__.py builds the whole app (stages, torch).
    package = types.ModuleType("srserve.serving")
    package.__path__ = [str(Path(srserve.__file__).parent / "serving")]
    sys.modules["srserve.serving"] = package
    from srserve.serving import ingress
    from srserve.api.protocol import ApiError, VideoCreateBody
    from srserve.pipeline.switch import parse_policy

    args = ingress.AppArgs(model={"base_path": sys.argv[1], "attention_backend": "flash"}, model_name="served")
    card = ingress.model_info(args)
    resolved = ingress.resolve_create(VideoCreateBody(prompt="x", size="64x32", switch="step:2"), card, args.limits)
    try:
        ingress.resolve_create(VideoCreateBody(prompt="x", size="40x32"), card, args.limits)
        param = None
    except ApiError as err:
        param = err.param
    parse_policy("adaptive:0.02:min=3")
    print(json.dumps({"card": card.model_dump(), "generation": resolved.generation.model_dump(), "param": param,
                      "heavy": sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)}))
""")


def test_the_ingress_resolves_requests_without_torch():
    out = subprocess.run([sys.executable, "-c", TORCH_FREE, default_model_path()], capture_output=True, text=True,
                         timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [], result["heavy"]
    assert result["card"]["name"] == "served" and result["param"] == "size"
    assert result["generation"]["width"] == 64 and result["generation"]["switch"] == "step:2"
