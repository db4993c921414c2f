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
                     boundary_ratio: float | None = None, sketch_layers: int = 4, render_layers: int = 2) -> Path:
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


def _t5_parts(seed: int):
    """Tiny T5 encoder (CogVideoX's text encoder class) with the srd-tiny tokenizer."""
    from transformers import T5Config, T5EncoderModel

    from srserve.tiny.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return tokenizer, T5EncoderModel(config).eval()


COGVIDEOX_TEXT_LEN = 16  # the tiny transformers' max_text_seq_length (226 in the real CogVideoX)


def build_random_cogvideox(out: str | os.PathLike, seed: int = 0, scaling_factor: float = 1.15258426,
                           snr_shift_scale: float = 3.0, scheduler: str = "ddim", rotary: bool = False,
                           heads: int = 2, head_dim: int = 16, layers: int = 1) -> Path:
    """Save a tiny random `CogVideoXPipeline`.

    The T5 encoder and VAE weights depend on `seed` only, so two builds with the same seed share them, like
    CogVideoX-5b and -2b do, while `scaling_factor` (VAE config) and `snr_shift_scale` (scheduler config) may
    differ, as they do between the real pair. The transformer uses seed + 2 + layers, so a different size gets
    different weights. `rotary=True` is the 5B's positional scheme; False is the 2B's sincos embeddings.
    """
    from diffusers import (
        AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    if scheduler not in ("ddim", "dpm"):
        raise ValueError(f"scheduler must be ddim or dpm, got {scheduler!r}")
    tokenizer, text_encoder = _t5_parts(seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=LATENT_CHANNELS,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4, scaling_factor=scaling_factor,
    ).eval()
    torch.manual_seed(seed + 2 + layers)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS, time_embed_dim=8, text_embed_dim=TEXT_DIM, num_layers=layers,
        sample_width=4, sample_height=4, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=COGVIDEOX_TEXT_LEN, use_rotary_positional_embeddings=rotary,
    ).eval()
    # The real CogVideoX scheduler configs: v-prediction, zero terminal SNR, trailing timesteps.
    cls = CogVideoXDDIMScheduler if scheduler == "ddim" else CogVideoXDPMScheduler
    sched = cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
                snr_shift_scale=snr_shift_scale, timestep_spacing="trailing")
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=sched)
    out = Path(out)
    pipe.save_pretrained(out)
    (out / "srserve.json").write_text(json.dumps({
        "name": "tiny-random-cogvideox", "default_num_frames": 9, "default_height": 32, "default_width": 32,
        "default_steps": 4, "fps": 8,
    }))
    return out
