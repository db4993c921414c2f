"""Configs and builders of srd-tiny's components (real diffusers / transformers classes, tiny configs).

`SKETCH` (the large DiT, `transformer`) and `RENDER` (the small DiT, `transformer_2`) share the VAE latent
channels, the patch size and the text dim, so latents and prompt embeddings pass from one to the other unchanged,
like Wan2.1 14B and 1.3B.
"""
from __future__ import annotations

import time

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from srserve.tiny.tokenizer import vocabulary

Z_DIM = 8
TEXT_DIM = 64
PATCH = (1, 2, 2)
FLOW_SHIFT = 2.0

VAE = dict(
    base_dim=8,
    z_dim=Z_DIM,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
)

TEXT_ENCODER = dict(
    d_model=TEXT_DIM,
    d_kv=16,
    d_ff=128,
    num_layers=1,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
    tie_word_embeddings=False,
)

_DIT_COMMON = dict(
    patch_size=PATCH,
    in_channels=Z_DIM,
    out_channels=Z_DIM,
    text_dim=TEXT_DIM,
    freq_dim=64,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)


def dit_config(layers: int, heads: int) -> dict:
    """A srd-tiny DiT: `heads` x 32 wide, ffn 4x the width."""
    return dict(_DIT_COMMON, num_attention_heads=heads, attention_head_dim=32, ffn_dim=4 * 32 * heads,
                num_layers=layers)


SKETCH = dit_config(layers=6, heads=7)
RENDER = dit_config(layers=2, heads=4)

SCHEDULER = dict(
    num_train_timesteps=1000,
    solver_order=2,
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=FLOW_SHIFT,
    predict_x0=True,
    solver_type="bh2",
    lower_order_final=True,
    disable_corrector=[],
    final_sigmas_type="zero",
    timestep_spacing="linspace",
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
)


def make_vae() -> AutoencoderKLWan:
    return AutoencoderKLWan(**VAE, latents_mean=[0.0] * Z_DIM, latents_std=[1.0] * Z_DIM)


TEXT_LOCALITY = 1.0  # relative-position logit per token of distance in the text encoder's self-attention


def make_text_encoder(seed: int) -> UMT5EncoderModel:
    """The frozen text encoder: random weights from `seed`, except a designed relative-position bias of
    -TEXT_LOCALITY * |i - j| that makes each token attend mostly to its neighbours. A DiT's cross-attention sees
    the text rows as a set; only this mixing tells it which color goes with which shape in a two-object prompt.
    With the random bias (std 0.13, near-uniform attention) "a red circle ... and a blue square ..." and its
    shape-swapped twin came out 10x closer than prompts one word apart; with this bias, about as far."""
    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=len(vocabulary()), **TEXT_ENCODER)
    model = UMT5EncoderModel(cfg)
    with torch.no_grad():
        for block in model.encoder.block:
            attn = block.layer[0].SelfAttention
            rel = torch.arange(-1024, 1025)
            buckets = attn._relative_position_bucket(rel)
            bias = torch.full((cfg.relative_attention_num_buckets,), float("inf"))
            bias.scatter_reduce_(0, buckets, rel.abs().float(), reduce="amin")  # nearest distance of each bucket
            bias[bias.isinf()] = 1024.0  # a bucket no distance maps to
            attn.relative_attention_bias.weight.copy_((-TEXT_LOCALITY * bias)[:, None].expand(-1, cfg.num_heads))
    model.eval()
    return model


def make_transformer(cfg: dict, seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**cfg)


def make_scheduler() -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(**SCHEDULER)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def dit_inputs(batch: int = 1, frames: int = 5, size: int = 8, text_len: int = 512):
    x = torch.randn(batch, Z_DIM, frames, size, size)
    t = torch.full((batch,), 500.0)
    ctx = torch.randn(batch, text_len, TEXT_DIM)
    return x, t, ctx


@torch.no_grad()
def step_flops(model: WanTransformer3DModel, batch: int = 1) -> int:
    """FLOPs of one forward (one denoising step, one CFG branch) at the bundle's shape."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t, ctx = dit_inputs(batch)
    counter = FlopCounterMode(display=False)
    with counter:
        model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)
    return int(counter.get_total_flops())


@torch.no_grad()
def step_seconds(model: WanTransformer3DModel, batch: int = 1, repeats: int = 20) -> float:
    """Median wall seconds of one forward at the bundle's shape (batch 1 by default)."""
    x, t, ctx = dit_inputs(batch)
    model.eval()
    for _ in range(3):
        model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


class CompactTextAttnProcessor:
    """Training-only cross-attention over a *compact* text context, exactly equivalent to the pipeline's.

    WanPipeline pads every prompt embedding with zeros to 512 tokens, so all padding rows give identical keys
    and values. Attending over `n` real rows plus `512 - n` identical padding rows equals attending over `n` real
    rows plus `L - n` padding rows whose logits carry `log((512 - n) / (L - n))`. Training on L=8 rows instead of
    512 about halves the sketch model's training step and changes nothing it learns. `bias` is (B, 1, 1, L).
    """

    def __init__(self):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self._inner = WanAttnProcessor()
        self.bias: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self._inner(attn, hidden_states, encoder_hidden_states, self.bias, rotary_emb)


def compact_bias(seq_lens: torch.Tensor, compact_len: int, full_len: int = 512) -> torch.Tensor:
    """(B, 1, 1, compact_len) additive logit bias for `CompactTextAttnProcessor`."""
    pos = torch.arange(compact_len)[None, :]
    n = seq_lens[:, None].float()
    pad_bias = torch.log((full_len - n) / (compact_len - n))
    bias = torch.where(pos >= seq_lens[:, None], pad_bias, torch.zeros_like(pad_bias))
    return bias[:, None, None, :]


def use_compact_text(model: WanTransformer3DModel) -> CompactTextAttnProcessor:
    proc = CompactTextAttnProcessor()
    for block in model.blocks:
        block.attn2.set_processor(proc)
    return proc


def use_default_attention(model: WanTransformer3DModel) -> None:
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    for block in model.blocks:
        block.attn2.set_processor(WanAttnProcessor())
