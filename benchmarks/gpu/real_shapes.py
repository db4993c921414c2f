"""Per-step cost of Wan2.1 14B and 1.3B at real shapes, and the SR speedup it implies.

Random-weight WanTransformer3DModel at the real configs, built on the meta device and materialised with
`to_empty` (no time spent on init), bf16; one CFG denoising step (two forwards) at 832x480x81 frames
(latent 16x21x60x104, 512 text tokens) with each attention backend that is importable. Prints JSON.

    python benchmarks/gpu/real_shapes.py --out benchmarks/results/gpu_real_shapes.json
    python benchmarks/gpu/real_shapes.py --tiny      # a CPU smoke test of this script at toy sizes
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
              freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
CONFIGS = {
    "wan2.1-t2v-14b": dict(COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40),
    "wan2.1-t2v-1.3b": dict(COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
}
TINY = {name: dict(cfg, num_attention_heads=cfg["num_attention_heads"] // 4, attention_head_dim=16, text_dim=64,
                   ffn_dim=64, num_layers=2) for name, cfg in CONFIGS.items()}


def build(config: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    model = model.to_empty(device=device).to(dtype)
    # to_empty leaves memory uninitialised; give the weights finite values so timings see no NaN slow paths.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for b in model.buffers():  # rope tables: their values do not change the cost
            if b.is_floating_point():
                b.zero_()
    return model.eval()


def backends() -> list[str]:
    names = ["native"]
    try:
        import xformers.ops  # noqa: F401
        names.append("xformers")
    except ImportError:
        pass
    return names


@torch.no_grad()
def cfg_step_seconds(model, latents, text, repeats: int, device: str) -> list[float]:
    timestep = torch.tensor([500.0], device=device)
    times = []
    for i in range(repeats + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(2):  # cond and uncond, as WanPipeline runs them
            model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:  # the first is warm-up
            times.append(time.perf_counter() - began)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy configs and shapes (CPU smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    configs = TINY if args.tiny else CONFIGS
    latent_shape = (1, 16, 2, 8, 8) if args.tiny else (1, 16, 21, 60, 104)
    text_len = 16 if args.tiny else 512
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "dtype": str(dtype), "latent_shape": latent_shape, "text_tokens": text_len, "repeats": args.repeats,
              "step_seconds": {}}
    for backend in backends():
        for name, config in configs.items():
            model = build(config, device, dtype)
            if backend != "native":
                model.set_attention_backend(backend)
            gen = torch.Generator(device).manual_seed(0)
            latents = torch.randn(latent_shape, generator=gen, device=device, dtype=dtype)
            text = torch.randn((1, text_len, config["text_dim"]), generator=gen, device=device, dtype=dtype)
            times = cfg_step_seconds(model, latents, text, args.repeats, device)
            report["step_seconds"].setdefault(backend, {})[name] = {
                "min": min(times), "median": statistics.median(times), "max": max(times)}
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
    large, small = (list(configs))
    n = args.steps
    for backend, costs in report["step_seconds"].items():
        r = costs[large]["median"] / costs[small]["median"]
        report.setdefault("implied_speedup", {})[backend] = {
            "per_step_ratio_r": r,
            "by_switch_step": {k: n / (k + (n - k) / r) for k in range(10, 26)},
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
