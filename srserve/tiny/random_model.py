"""Tiny random-weight model pairs in the diffusers layouts the engine loads (for tests and first runs)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

LATENT_CHANNELS = 4
TEXT_DIM = 32


def _text_parts(seed: int):
    from transformers import UMT5Config, UMT5EncoderModel

    from srserve.tiny.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return tokenizer, UMT5EncoderModel(config).eval()


def wan_transformer(seed: int, heads: int, layers: int, ffn_dim: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=8, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=ffn_dim, num_layers=layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()


def build_random_wan(out: str | os.PathLike, seed: int = 0, scheduler: str = "unipc",
                     boundary_ratio: float | None = None, sketch_layers: int = 4, render_layers: int = 1) -> Path:
    """Save a Wan2.2-layout pipeline: `transformer` (sketch) and `transformer_2` (render) with random weights."""
    from diffusers import (
        AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline,
    )

    tokenizer, text_encoder = _text_parts(seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True],
                           latents_mean=[0.0] * LATENT_CHANNELS, latents_std=[1.0] * LATENT_CHANNELS).eval()
    if scheduler == "unipc":
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    elif scheduler == "euler":
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        raise ValueError(f"scheduler must be unipc or euler, got {scheduler!r}")
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=sched,
        transformer=wan_transformer(seed + 2, heads=4, layers=sketch_layers, ffn_dim=64),
        transformer_2=wan_transformer(seed + 3, heads=1, layers=render_layers, ffn_dim=16),
        boundary_ratio=boundary_ratio,
    )
    out = Path(out)
    pipe.save_pretrained(out)
    (out / "srserve.json").write_text(json.dumps({
        "name": "tiny-random", "default_num_frames": 9, "default_height": 32, "default_width": 32,
        "default_steps": 8, "fps": 8,
    }))
    return out
