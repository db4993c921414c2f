"""The shipped srd-tiny bundle: plain diffusers loads and runs it; its two transformers fit SRDiffusion."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from srserve.tiny import BUNDLE_PATH

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe():
    from diffusers import WanPipeline

    return WanPipeline.from_pretrained(BUNDLE_PATH)


def _generate(pipe, steps=2, seed=0):
    return pipe("a red circle moving right", negative_prompt="", num_frames=17, height=64, width=64,
                num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np").frames


def test_model_index_is_wan_layout():
    index = json.loads((BUNDLE_PATH / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    for name in ("tokenizer", "text_encoder", "vae", "scheduler", "transformer", "transformer_2"):
        assert (BUNDLE_PATH / name).is_dir(), name
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]


def test_weights_fit_in_30_mb():
    files = list(BUNDLE_PATH.rglob("*.safetensors"))
    assert len(files) == 4  # text encoder, vae, two transformers, and nothing stray
    total = sum(f.stat().st_size for f in files)
    assert total <= 30 * 1024 * 1024, f"{total / 2**20:.1f} MiB"


def test_plain_diffusers_generates_a_video(pipe):
    frames = _generate(pipe)
    assert frames.shape == (1, 17, 64, 64, 3)
    assert frames.dtype == np.float32
    assert np.isfinite(frames).all() and frames.min() >= 0.0 and frames.max() <= 1.0


def test_plain_diffusers_runs_both_experts(pipe):
    """With a boundary, WanPipeline hands the low-noise steps to transformer_2: SRDiffusion with a fixed switch."""
    calls = {"transformer": 0, "transformer_2": 0}
    hooks = [getattr(pipe, name).register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
             for name in calls]
    old = pipe.config.boundary_ratio
    try:
        pipe.register_to_config(boundary_ratio=0.9)
        frames = _generate(pipe, steps=4)
    finally:
        pipe.register_to_config(boundary_ratio=old)
        for hook in hooks:
            hook.remove()
    assert frames.shape == (1, 17, 64, 64, 3)
    assert calls["transformer"] > 0 and calls["transformer_2"] > 0, calls


def test_experts_share_latent_text_and_patch_interfaces(pipe):
    big, small = pipe.transformer.config, pipe.transformer_2.config
    for key in ("in_channels", "out_channels", "text_dim", "patch_size", "freq_dim"):
        assert big[key] == small[key], key
    assert big.in_channels == pipe.vae.config.z_dim
    assert big.text_dim == pipe.text_encoder.config.d_model


def test_render_model_is_about_10x_cheaper_per_step(pipe):
    from srserve.tiny.models import num_params, step_flops

    param_ratio = num_params(pipe.transformer) / num_params(pipe.transformer_2)
    flop_ratio = step_flops(pipe.transformer) / step_flops(pipe.transformer_2)
    assert 7.0 <= param_ratio <= 14.0, param_ratio
    assert 7.0 <= flop_ratio <= 14.0, flop_ratio


def test_vae_latent_statistics_and_scheduler(pipe):
    cfg = pipe.vae.config
    assert len(cfg.latents_mean) == len(cfg.latents_std) == cfg.z_dim
    assert all(s > 0 for s in cfg.latents_std)
    assert cfg.latents_std != [1.0] * cfg.z_dim  # set from data, not the placeholder
    sched = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    assert sched.prediction_type == "flow_prediction" and sched.use_flow_sigmas


def test_tokenizer_survives_the_pipelines_cleaning_and_padding():
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BUNDLE_PATH / "tokenizer")
    kwargs = dict(padding="max_length", max_length=512, truncation=True, add_special_tokens=True,
                  return_attention_mask=True)
    canonical = tok(prompt_clean("a red circle moving right"), **kwargs)
    messy = tok(prompt_clean("  A Red   circle moving RIGHT. "), **kwargs)
    assert len(canonical.input_ids) == 512
    assert canonical.input_ids == messy.input_ids
    assert sum(canonical.attention_mask) == 6  # five words and </s>
    assert tok.unk_token_id not in canonical.input_ids
    assert canonical.input_ids != tok(prompt_clean("a blue circle moving right"), **kwargs).input_ids
    empty = tok(prompt_clean(""), **kwargs)
    assert sum(empty.attention_mask) == 1


def test_vae_keeps_color_shape_and_motion(pipe):
    """The VAE is every generator's ceiling: its reconstructions of ground-truth clips must score on all three."""
    from srserve.tiny.train_vae import reconstruction_summary

    summary = reconstruction_summary(pipe.vae, n=8, seed=7)
    assert min(summary["color_acc"], summary["shape_acc"], summary["motion_acc"]) >= 95.0, summary
    assert summary["psnr"] > 20.0, summary
