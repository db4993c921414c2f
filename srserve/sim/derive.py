"""How every number in `costs.json` is made: the published figures it quotes, and the formulas for the rest.

Pure Python (no torch). `build_table()` returns the table; `python -m srserve.sim.derive --out srserve/sim/costs.json`
writes it, `--check` fails when the shipped file differs from what these formulas give (a test runs the same check).

What is derived, and how:
  * FLOPs of one transformer forward, from the diffusers configs (2 FLOPs per multiply-add, matmuls only):
        per layer  8 L d^2 (self-attn q,k,v,o) + 4 L^2 d (QK^T, AV) + 4 L d^2 + 4 S d^2 (cross-attn q,o / k,v)
                   + 4 L S d (cross QK^T, AV) + 4 L d f (FFN up, down)
    with L = latent tokens = T' x H/16 x W/16 (VAE strides 4/8/8, patch (1,2,2)), T' = (F - 1)/4 + 1, S = 512 text
    tokens, d = heads x 128, f = ffn_dim. A guided step (CFG) runs two forwards.
  * step seconds = FLOPs(step) / (dense bf16 rate x MFU), the MFU fitted to the one published H100 figure (Wan2.1 14B,
    832x480x81, 50 steps: DiT 252.8 s); the same MFU for every GPU (an assumption, stated per entry).
  * text encode = the H100 figure's fixed part (what compute does not explain) + umT5-XXL FLOPs / (bf16 rate x MFU).
  * VAE decode = the H100 figure x (TF32 rate of H100 / TF32 rate of the GPU) x (pixels / pixels at 480p): the Wan VAE
    runs in float32 in diffusers (convolutions on TF32 tensor cores).
  * memory need of a role = bf16 weights + activation peak + a per-process runtime overhead; a role fits a GPU when
    the need is at most `usable_memory_fraction` of its memory.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TABLE_PATH = Path(__file__).with_name("costs.json")
TABLE_VERSION = 1

# --- standard shapes --------------------------------------------------------------------------------------------
RESOLUTIONS: dict[str, tuple[int, int, int]] = {"480p": (81, 480, 832), "720p": (81, 720, 1280)}  # (F, H, W)
TEXT_TOKENS = 512
VAE_TEMPORAL, VAE_SPATIAL, PATCH_T, PATCH_HW = 4, 8, 1, 2
LATENT_CHANNELS, TEXT_DIM = 16, 4096

DIFFUSERS_CONFIGS = ("diffusers WanTransformer3DModel configs of Wan-AI/Wan2.1-T2V-14B-Diffusers and "
                     "Wan-AI/Wan2.1-T2V-1.3B-Diffusers (transformer/config.json; the same values are in "
                     "benchmarks/gpu/real_shapes.py)")
TRANSFORMERS: dict[str, dict[str, Any]] = {
    "wan2.1-t2v-14b": {"num_layers": 40, "num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824},
    "wan2.1-t2v-1.3b": {"num_layers": 30, "num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960},
}
# umT5-XXL encoder (google/umt5-xxl as shipped in Wan2.1's text_encoder/config.json): 24 layers, d_model 4096,
# d_ff 10240 gated-gelu (3 matrices), 64 heads x 64, vocabulary 256384.
UMT5 = {"num_layers": 24, "d_model": 4096, "d_ff": 10240, "vocab": 256384}
VAE_PARAMS = 126.9e6  # AutoencoderKLWan (Wan2.1_VAE.pth, 508 MB in float32): 127M parameters

# --- GPUs -------------------------------------------------------------------------------------------------------
# Dense (no sparsity) tensor rates from NVIDIA's datasheets: their headline figures are "with sparsity", i.e. 2x.
GPUS: dict[str, dict[str, Any]] = {
    "h100": {"name": "NVIDIA H100 SXM5 80GB", "memory_gb": 80, "bf16_dense_tflops": 989.4, "tf32_dense_tflops": 494.7,
             "source": "NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): BF16 1,979 / TF32 989 TFLOPS "
                       "with sparsity (SXM), 80 GB HBM3"},
    "h200": {"name": "NVIDIA H200 SXM 141GB", "memory_gb": 141, "bf16_dense_tflops": 989.4, "tf32_dense_tflops": 494.7,
             "source": "NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): BF16 1,979 / TF32 989 TFLOPS "
                       "with sparsity (SXM), 141 GB HBM3e"},
    "a100-80g": {"name": "NVIDIA A100 SXM 80GB", "memory_gb": 80, "bf16_dense_tflops": 312.0,
                 "tf32_dense_tflops": 156.0,
                 "source": "NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): BF16 312 / TF32 156 TFLOPS "
                           "dense, 80 GB HBM2e"},
    "l40s": {"name": "NVIDIA L40S 48GB", "memory_gb": 48, "bf16_dense_tflops": 362.05, "tf32_dense_tflops": 183.0,
             "source": "NVIDIA L40S datasheet: BF16 362.05 (733 with sparsity), TF32 183 (366) TFLOPS, 48 GB GDDR6 "
                       "(as reproduced at mullet.se/product.html?product_id=355414)"},
    "l4": {"name": "NVIDIA L4 24GB", "memory_gb": 24, "bf16_dense_tflops": 121.0, "tf32_dense_tflops": 60.0,
           "source": "NVIDIA L4 datasheet (nvidia.com/en-us/data-center/l4): BF16 242 / TF32 120 TFLOPS with "
                     "sparsity, 24 GB GDDR6, 72 W (sustained clocks under tensor load are below boost: expect slower "
                     "than derived)"},
    "rtx4090": {"name": "NVIDIA GeForce RTX 4090 24GB", "memory_gb": 24, "bf16_dense_tflops": 165.2,
                "tf32_dense_tflops": 82.6,
                "source": "NVIDIA Ada Lovelace architecture whitepaper, RTX 4090: FP16/BF16 tensor with FP32 "
                          "accumulate 165.2 (330.4 with sparsity), TF32 82.6 (165.2) TFLOPS, 24 GB GDDR6X"},
}
# One provider that lists all six: RunPod Serverless "flex" workers, billed per second while running (scale to zero,
# which is how an autoscaled pool is billed); "active" (always-on) workers list 20-30% less.
PRICE_SOURCE = ("RunPod Serverless pricing, flex workers, per-second list price x 3600 "
                "(docs.runpod.io/serverless/pricing; page undated, read 2026-12-01)")
PRICES_PER_SECOND = {"h100": ("H100 PRO", 0.00116), "h200": ("H200 PRO", 0.00155), "a100-80g": ("A100 80 GB", 0.00076),
                     "l40s": ("L40, L40S, 6000 Ada PRO", 0.00053), "l4": ("L4, A5000, 3090", 0.00019),
                     "rtx4090": ("4090 PRO", 0.00031)}

# --- the published figures ---------------------------------------------------------------------------------------
ANCHOR_H100 = {
    "gpu": "h100", "model": "wan2.1-t2v-14b", "resolution": "480p", "steps": 50,
    "text_encode_s": 0.89, "dit_s": 252.8, "vae_decode_s": 2.38,
    "source": "public report quoted in srserve issue 13: Wan2.1 T2V 14B on one H100, 50 steps, text encoder 0.89 s, "
              "DiT 252.8 s, VAE decode 2.38 s (the issue does not name the report; likely Delavande, Pierrard, "
              "Luccioni, 'Video Killed the Energy Budget', arXiv:2509.19222, which measures WAN2.1-T2V on an H100; "
              "not verified against its tables here). The shape is taken as the diffusers default 832x480x81: at "
              "720p the same time would need 2.6x the GPU's peak rate",
}
CROSS_CHECKS = [
    {"what": "Wan2.1 T2V 14B, 1280x720, 129 frames, 50 steps, one H100 (official Wan code)", "published_s": 1880.34,
     "model": "wan2.1-t2v-14b", "gpu": "h100", "shape": (129, 720, 1280), "steps": 50, "end_to_end": True,
     "source": "PromptTea README (github.com/rakib91221/PromptTea, PromptTea4Wan2.1/README.md: 'Inference "
               "Latency Comparisons on a Single H100', Wan2.1 129 frames 1280x720: 1880.34)"},
    {"what": "Wan2.1 T2V 1.3B, 5 s 480P video on an RTX 4090 'in about 4 minutes' (--offload_model True --t5_cpu)",
     "published_s": 240.0, "model": "wan2.1-t2v-1.3b", "gpu": "rtx4090", "shape": (81, 480, 832), "steps": 50,
     "end_to_end": True,
     "source": "Wan2.1 README (github.com/Wan-Video/Wan2.1), 'Supports Consumer-grade GPUs'"},
    {"what": "Wan2.1 I2V 14B 480P, 40 steps with CFG, one H200, official Wan2.1 code: 366 s, 71 GB (I2V adds image "
             "conditioning; the official code is slower than diffusers-level kernels)", "published_s": 366.0,
     "model": "wan2.1-t2v-14b", "gpu": "h200", "shape": (81, 480, 832), "steps": 40, "end_to_end": False,
     "source": "LightX2V benchmark docs (github.com/ModelTC/lightx2v, 'Benchmark', H200, Wan2.1 Official)"},
]
BATCH_SOURCE = ("derived: at >= 32k latent tokens a step is compute-bound, so a batch adds FLOPs linearly and shares "
                "only host/launch overhead; qualitative source: Baseten, 'Wan 2.2 video generation in less than 60 "
                "seconds' ('batching video generation requests provides little benefit ... batch size of one')")
BATCH_MARGINAL = {"wan2.1-t2v-14b": 0.97, "wan2.1-t2v-1.3b": 0.95}  # cost of each extra request, x the first one's

RUNTIME_OVERHEAD_GB = 1.5  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack, per process
USABLE_MEMORY_FRACTION = 0.95


# --- formulas ----------------------------------------------------------------------------------------------------
def latent_tokens(frames: int, height: int, width: int) -> int:
    t = (frames - 1) // VAE_TEMPORAL + 1
    return (t // PATCH_T) * (height // VAE_SPATIAL // PATCH_HW) * (width // VAE_SPATIAL // PATCH_HW)


def forward_flops(model: str, frames: int, height: int, width: int, text_tokens: int = TEXT_TOKENS) -> dict[str, float]:
    """Matmul FLOPs of one transformer forward (batch 1): {"linear", "attention", "total"}."""
    cfg = TRANSFORMERS[model]
    d, f, n = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"], cfg["num_layers"]
    big_l, s = latent_tokens(frames, height, width), text_tokens
    linear = n * (8 * big_l * d * d + 4 * big_l * d * d + 4 * s * d * d + 4 * big_l * d * f)
    attention = n * (4 * big_l * big_l * d + 4 * big_l * s * d)
    return {"linear": float(linear), "attention": float(attention), "total": float(linear + attention)}


def transformer_params(model: str) -> float:
    cfg = TRANSFORMERS[model]
    d, f, n = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"], cfg["num_layers"]
    block = 8 * (d * d + d) + 2 * d * f + f + d + 12 * d  # attn1, attn2 (q,k,v,o), ffn, norms, modulation table
    embed = (LATENT_CHANNELS * 4 * d + d) + (256 * d + d * d) + 6 * d * d + (TEXT_DIM * d + d * d)
    head = d * LATENT_CHANNELS * 4 + 2 * d
    return float(n * block + embed + head)


def umt5_params() -> float:
    d, ff, n = UMT5["d_model"], UMT5["d_ff"], UMT5["num_layers"]
    return float(n * (4 * d * d + 3 * d * ff) + UMT5["vocab"] * d)


def umt5_flops(prompts: int = 2, tokens: int = TEXT_TOKENS) -> float:
    d, ff, n = UMT5["d_model"], UMT5["d_ff"], UMT5["num_layers"]
    per_prompt = n * (2 * tokens * (4 * d * d + 3 * d * ff) + 4 * tokens * tokens * d)
    return float(prompts * per_prompt)


def transformer_activation_gb(model: str, frames: int, height: int, width: int, batch: int = 1) -> float:
    """Peak activations of one forward (CFG branches run one after the other, as diffusers does), bf16:
    batch x L x (12 d + 2 f) x 2 bytes (residual stream, q/k/v/out, norms upcast, the FFN's two f-wide tensors)."""
    cfg = TRANSFORMERS[model]
    d, f = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"]
    return batch * latent_tokens(frames, height, width) * (12 * d + 2 * f) * 2 / 1e9


def vae_activation_gb(frames: int, height: int, width: int) -> float:
    """Peak of the causal decode (one latent frame -> 4 video frames at a time, float32): about eight full-resolution
    96-channel 4-frame tensors at once: 8 x 96 x 4 x H x W x 4 bytes."""
    return 8 * 96 * 4 * height * width * 4 / 1e9


def umt5_activation_gb(tokens: int = TEXT_TOKENS) -> float:
    return 2 * tokens * (UMT5["d_model"] * 8 + UMT5["d_ff"] * 3) * 2 / 1e9


def _entry(value: Any, status: str, **why: Any) -> dict[str, Any]:
    if isinstance(value, float):
        value = round(value, 4)
    return {"value": value, "status": status, **why}


def mfu() -> float:
    """The MFU that makes the FLOPs model reproduce the published H100 DiT time."""
    a = ANCHOR_H100
    f, h, w = RESOLUTIONS[a["resolution"]]
    step_flops = 2 * forward_flops(a["model"], f, h, w)["total"]
    per_step = a["dit_s"] / a["steps"]
    return step_flops / per_step / (GPUS[a["gpu"]]["bf16_dense_tflops"] * 1e12)


def derived_step_seconds(model: str, gpu: str, frames: int, height: int, width: int, guided: bool = True) -> float:
    flops = (2 if guided else 1) * forward_flops(model, frames, height, width)["total"]
    return flops / (GPUS[gpu]["bf16_dense_tflops"] * 1e12 * mfu())


def _text_encode_fixed_s() -> float:
    h100 = GPUS[ANCHOR_H100["gpu"]]["bf16_dense_tflops"] * 1e12
    return ANCHOR_H100["text_encode_s"] - umt5_flops() / (h100 * mfu())


def derived_text_encode_seconds(gpu: str) -> float:
    return _text_encode_fixed_s() + umt5_flops() / (GPUS[gpu]["bf16_dense_tflops"] * 1e12 * mfu())


def derived_vae_decode_seconds(gpu: str, frames: int, height: int, width: int) -> float:
    f0, h0, w0 = RESOLUTIONS[ANCHOR_H100["resolution"]]
    pixels = frames * height * width / (f0 * h0 * w0)
    rate = GPUS[ANCHOR_H100["gpu"]]["tf32_dense_tflops"] / GPUS[gpu]["tf32_dense_tflops"]
    return ANCHOR_H100["vae_decode_s"] * rate * pixels


MFU_FORMULA = ("mfu = (2 x FLOPs(14B forward at 832x480x81)) / (252.8 s / 50) / 989.4e12 (H100 dense bf16); applied "
               "to every GPU (an assumption: kernels reach the same fraction of peak)")
STEP_FORMULA = ("derived: seconds = 2 x FLOPs(forward) / (dense bf16 TFLOPS x 1e12 x mfu); FLOPs per layer = "
                "8 L d^2 + 4 L^2 d + 4 L d^2 + 4 S d^2 + 4 L S d + 4 L d f, L = latent tokens, S = 512, "
                "d = heads x 128, f = ffn_dim")


def build_table() -> dict[str, Any]:
    m = mfu()
    table: dict[str, Any] = {
        "version": TABLE_VERSION,
        "generated_by": "python -m srserve.sim.derive --out srserve/sim/costs.json (srserve/sim/derive.py holds "
                        "every formula)",
        "units": {"step_seconds": "seconds per denoising step with CFG (two forwards), batch 1",
                  "text_encode_seconds": "prompt + negative prompt, 512 tokens each",
                  "vae_decode_seconds": "one video, 81 frames", "memory": "GB (1e9 bytes)",
                  "price_per_hour": "USD per GPU-hour"},
        "resolutions": {k: {"frames": f, "height": h, "width": w, "latent_tokens": latent_tokens(f, h, w)}
                        for k, (f, h, w) in RESOLUTIONS.items()},
        "assumptions": {
            "mfu": _entry(m, "derived", formula=MFU_FORMULA, source=ANCHOR_H100["source"]),
            "runtime_overhead_gb": _entry(RUNTIME_OVERHEAD_GB, "assumed",
                                          why="per process: CUDA context, cuBLAS/cuDNN workspaces, allocator slack"),
            "usable_memory_fraction": _entry(USABLE_MEMORY_FRACTION, "assumed",
                                             why="memory the driver and fragmentation leave usable"),
        },
        "anchor": ANCHOR_H100,
        "gpus": {},
        "models": {},
        "step_seconds": {},
        "batch": {},
        "text_encode_seconds": {},
        "vae_decode_seconds": {},
        "fits": {},
        "cross_checks": [],
    }
    for key, g in GPUS.items():
        label, per_s = PRICES_PER_SECOND[key]
        table["gpus"][key] = {
            "name": g["name"],
            "memory_gb": _entry(float(g["memory_gb"]), "published", source=g["source"]),
            "bf16_dense_tflops": _entry(g["bf16_dense_tflops"], "published", source=g["source"]),
            "tf32_dense_tflops": _entry(g["tf32_dense_tflops"], "published", source=g["source"]),
            "price_per_hour": _entry(per_s * 3600, "published", source=f"{PRICE_SOURCE}: '{label}' ${per_s}/s"),
        }
    # models: weights and activations
    for model in TRANSFORMERS:
        params = transformer_params(model)
        table["models"][model] = {
            "config": {**TRANSFORMERS[model], "patch_size": [1, 2, 2], "in_channels": 16, "text_dim": TEXT_DIM,
                       "source": DIFFUSERS_CONFIGS},
            "params": _entry(params, "derived", formula="layers x (8(d^2+d) + 2 d f + f + 13 d) + embedders + head"),
            "weights_gb": _entry(params * 2 / 1e9, "derived", formula="params x 2 bytes (bf16)"),
            "activation_gb": {res: _entry(transformer_activation_gb(model, *shape), "derived",
                                          formula="L x (12 d + 2 f) x 2 bytes per request in the batch")
                              for res, shape in RESOLUTIONS.items()},
        }
    table["models"]["umt5-xxl"] = {
        "params": _entry(umt5_params(), "derived", formula="24 x (4 d^2 + 3 d d_ff) + vocab x d (encoder only)"),
        "weights_gb": _entry(umt5_params() * 2 / 1e9, "derived", formula="params x 2 bytes (bf16)"),
        "activation_gb": {res: _entry(umt5_activation_gb(), "derived",
                                      formula="2 prompts x 512 x (8 d + 3 d_ff) x 2 bytes") for res in RESOLUTIONS},
    }
    table["models"]["wan-vae"] = {
        "params": _entry(VAE_PARAMS, "published", source="Wan2.1_VAE.pth (508 MB float32) in the Wan2.1 checkpoints"),
        "weights_gb": _entry(VAE_PARAMS * 4 / 1e9, "derived",
                             formula="params x 4 bytes (float32, as diffusers runs it)"),
        "activation_gb": {res: _entry(vae_activation_gb(*shape), "derived",
                                      formula="8 x 96 channels x 4 frames x H x W x 4 bytes (causal decode peak)")
                          for res, shape in RESOLUTIONS.items()},
    }
    anchor_step = ANCHOR_H100["dit_s"] / ANCHOR_H100["steps"]
    for model in TRANSFORMERS:
        table["step_seconds"][model] = {}
        for gpu in GPUS:
            per_res = {}
            for res, shape in RESOLUTIONS.items():
                if (model, gpu, res) == (ANCHOR_H100["model"], ANCHOR_H100["gpu"], ANCHOR_H100["resolution"]):
                    per_res[res] = _entry(anchor_step, "published", formula="252.8 s / 50 steps",
                                          source=ANCHOR_H100["source"])
                else:
                    per_res[res] = _entry(derived_step_seconds(model, gpu, *shape), "derived", formula=STEP_FORMULA,
                                          flops_per_step=2 * forward_flops(model, *shape)["total"], mfu=round(m, 4))
            table["step_seconds"][model][gpu] = per_res
        table["batch"][model] = {"marginal": _entry(BATCH_MARGINAL[model], "derived", source=BATCH_SOURCE,
                                                    formula="step(b) = step(1) x (1 + (b - 1) x marginal)")}
    for gpu in GPUS:
        if gpu == ANCHOR_H100["gpu"]:
            table["text_encode_seconds"][gpu] = _entry(ANCHOR_H100["text_encode_s"], "published",
                                                       source=ANCHOR_H100["source"])
        else:
            table["text_encode_seconds"][gpu] = _entry(
                derived_text_encode_seconds(gpu), "derived",
                formula=f"fixed {_text_encode_fixed_s():.3f} s (the H100 figure less what its FLOPs explain) + "
                        f"umT5-XXL FLOPs ({umt5_flops():.3g}) / (dense bf16 rate x mfu)")
        table["vae_decode_seconds"][gpu] = {}
        for res, shape in RESOLUTIONS.items():
            if gpu == ANCHOR_H100["gpu"] and res == ANCHOR_H100["resolution"]:
                table["vae_decode_seconds"][gpu][res] = _entry(ANCHOR_H100["vae_decode_s"], "published",
                                                               source=ANCHOR_H100["source"])
            else:
                table["vae_decode_seconds"][gpu][res] = _entry(
                    derived_vae_decode_seconds(gpu, *shape), "derived",
                    formula="2.38 s x (H100 TF32 rate / this GPU's TF32 rate) x (pixels x frames / 832x480x81)")
    for model in (*TRANSFORMERS, "umt5-xxl", "wan-vae"):
        entry = table["models"][model]
        table["fits"][model] = {}
        for gpu, g in GPUS.items():
            table["fits"][model][gpu] = {}
            for res in RESOLUTIONS:
                need = entry["weights_gb"]["value"] + entry["activation_gb"][res]["value"] + RUNTIME_OVERHEAD_GB
                table["fits"][model][gpu][res] = _entry(
                    need <= USABLE_MEMORY_FRACTION * g["memory_gb"], "derived", need_gb=round(need, 2),
                    formula="weights + activation (batch 1) + runtime overhead <= usable_memory_fraction x memory")
    for check in CROSS_CHECKS:
        f, h, w = check["shape"]
        model_s = check["steps"] * derived_step_seconds(check["model"], check["gpu"], f, h, w)
        if check["end_to_end"]:
            model_s += derived_text_encode_seconds(check["gpu"]) + derived_vae_decode_seconds(check["gpu"], f, h, w)
        table["cross_checks"].append({**{k: v for k, v in check.items() if k != "shape"}, "shape": list(check["shape"]),
                                      "table_s": round(model_s, 1),
                                      "table_over_published": round(model_s / check["published_s"], 3)})
    return table


def render(table: dict[str, Any]) -> str:
    return json.dumps(table, indent=1, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write the table here (default: print it)")
    parser.add_argument("--check", action="store_true", help="fail when the shipped costs.json differs")
    args = parser.parse_args(argv)
    text = render(build_table())
    if args.check:
        if TABLE_PATH.read_text() != text:
            print(f"{TABLE_PATH} is stale: regenerate with python -m srserve.sim.derive --out {TABLE_PATH}",
                  file=sys.stderr)
            return 1
        return 0
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
