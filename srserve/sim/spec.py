"""The simulated family's settings: which model pair, which GPU per pool, how fast simulated time runs.

A simulated checkpoint is a directory of configs only (no weights): model_index.json naming `SimWanPipeline`, the
real Wan2.1 transformer/VAE/scheduler configs (so shapes and schedules are the real ones), and `sim.json` holding a
`SimSpec`. `write_sim_checkpoint` makes one; `srserve/sim/bundle/` ships two (all-H100, and H100 sketch + L40S render).

    python -m srserve.sim.spec out/wan2.1-sim-l4 --sketch-gpu h100 --render-gpu l4 --time-factor 0.01

A `ModelSpec` may also carry the settings itself (a `sim` mapping, once ModelSpec has that field): they win over
sim.json.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from srserve.sim import derive

SIM_FILE = "sim.json"
PIPELINE_CLASS = "SimWanPipeline"
BUNDLE_DIR = Path(__file__).with_name("bundle")
ROLES = ("encode", "sketch", "render", "decode")


class SimSpec(BaseModel):
    """Settings of a simulated model: each denoising step sleeps the cost table's seconds x `time_factor`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    sketch_model: str = "wan2.1-t2v-14b"
    render_model: str = "wan2.1-t2v-1.3b"
    sketch_gpu: str = "h100"
    render_gpu: str = "h100"
    encode_gpu: str | None = Field(None, description="default: render_gpu (Encode runs on the render pool)")
    decode_gpu: str | None = Field(None, description="default: render_gpu (Decode runs on the render pool)")
    time_factor: float = Field(0.01, ge=0.0, description="simulated seconds x this = seconds slept (0: no sleep)")
    switch_distribution: str = Field(
        "srd-tiny-adaptive", description="what the adaptive rule's switch step is drawn from: a distribution of "
                                         "srserve/sim/switch_steps.json, or a fraction of N such as '0.3'")
    preview_size: tuple[int, int] = Field((16, 16), description="(height, width) of the decoded frames (the sim "
                                                                "writes a small placeholder video)")
    costs: str | None = Field(None, description="a cost table JSON (default: the shipped srserve/sim/costs.json)")
    measured: str | None = Field("default", description="GPU measurements JSON: 'default' reads "
                                                        "benchmarks/results/gpu/measured_costs.json if present; "
                                                        "null reads none")

    @field_validator("preview_size")
    @classmethod
    def _even(cls, value: tuple[int, int]) -> tuple[int, int]:
        if any(v < 2 or v % 2 for v in value):
            raise ValueError("preview_size: even sizes >= 2 (H.264 yuv420p)")
        return value

    @model_validator(mode="after")
    def _known(self) -> "SimSpec":
        from srserve.sim.costs import gpu_key

        for name in ("sketch_model", "render_model"):
            if getattr(self, name) not in derive.TRANSFORMERS:
                raise ValueError(f"{name} {getattr(self, name)!r}: one of {sorted(derive.TRANSFORMERS)}")
        for role in ROLES:
            gpu = self.gpu_for(role)
            if gpu_key(gpu) is None:
                raise ValueError(f"{role} GPU {gpu!r}: one of {sorted(derive.GPUS)}")
        self.switch()  # a bad distribution name fails here, not mid-request
        return self

    def gpu_for(self, role: str) -> str:
        gpu = {"sketch": self.sketch_gpu, "render": self.render_gpu, "encode": self.encode_gpu or self.render_gpu,
               "decode": self.decode_gpu or self.render_gpu}[role]
        from srserve.sim.costs import gpu_key

        return gpu_key(gpu) or gpu

    def model_for(self, role: str) -> str:
        return {"sketch": self.sketch_model, "render": self.render_model, "encode": "umt5-xxl",
                "decode": "wan-vae"}[role]

    def cost_table(self, base: str | os.PathLike | None = None) -> Any:
        from srserve.sim.costs import DEFAULT_MEASURED, CostTable, default_table

        if self.costs is None and self.measured == "default":
            return default_table()
        resolve = (lambda p: str(Path(base) / p) if base is not None and not os.path.isabs(p) else p)
        measured = DEFAULT_MEASURED if self.measured == "default" else \
            (None if self.measured is None else resolve(self.measured))
        return CostTable.load(resolve(self.costs) if self.costs else None, measured)

    def switch(self) -> Any:
        from srserve.sim.switching import SwitchDistribution

        try:
            return SwitchDistribution.fixed(float(self.switch_distribution))
        except ValueError:
            return SwitchDistribution.load(self.switch_distribution)


def load_sim_spec(spec: Any) -> SimSpec:
    """The SimSpec of a ModelSpec: its `sim` field when it has one, else `base_path/sim.json` (ValueError when
    neither is usable)."""
    inline = getattr(spec, "sim", None)
    if inline is not None:
        return inline if isinstance(inline, SimSpec) else SimSpec.model_validate(inline)
    path = Path(spec.base_path) / SIM_FILE
    if not path.is_file():
        raise ValueError(f"a simulated model needs {path} (write one with python -m srserve.sim.spec DIR)")
    try:
        return SimSpec.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


# --- the checkpoint of configs ------------------------------------------------------------------------------------
SCHEDULER_CONFIG = {  # Wan-AI/Wan2.1-T2V-14B-Diffusers scheduler/scheduler_config.json (flow_shift 3.0 at 480p)
    "_class_name": "UniPCMultistepScheduler", "_diffusers_version": "0.42.1", "beta_end": 0.02,
    "beta_schedule": "linear", "beta_start": 0.0001, "disable_corrector": [], "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero", "flow_shift": 3.0, "lower_order_final": True, "num_train_timesteps": 1000,
    "predict_x0": True, "prediction_type": "flow_prediction", "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0, "solver_order": 2, "solver_p": None, "solver_type": "bh2", "steps_offset": 0,
    "thresholding": False, "timestep_spacing": "linspace", "trained_betas": None, "use_beta_sigmas": False,
    "use_exponential_sigmas": False, "use_flow_sigmas": True, "use_karras_sigmas": False,
}
VAE_CONFIG = {"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.42.1", "base_dim": 96, "z_dim": 16,
              "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
              "temperal_downsample": [False, True, True], "dropout": 0.0}
TEXT_ENCODER_CONFIG = {"architectures": ["UMT5EncoderModel"], "model_type": "umt5", "d_model": 4096, "d_ff": 10240,
                       "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 256384,
                       "feed_forward_proj": "gated-gelu"}


def transformer_config(model: str) -> dict[str, Any]:
    cfg = derive.TRANSFORMERS[model]
    return {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.42.1", "added_kv_proj_dim": None,
            "attention_head_dim": cfg["attention_head_dim"], "cross_attn_norm": True, "eps": 1e-06,
            "ffn_dim": cfg["ffn_dim"], "freq_dim": 256, "image_dim": None, "in_channels": 16,
            "num_attention_heads": cfg["num_attention_heads"], "num_layers": cfg["num_layers"], "out_channels": 16,
            "patch_size": [1, 2, 2], "pos_embed_seq_len": None, "qk_norm": "rms_norm_across_heads",
            "rope_max_seq_len": 1024, "text_dim": 4096}


def checkpoint_files(sim: SimSpec, name: str = "wan2.1-sim") -> dict[str, str]:
    """Relative path -> text of a simulated checkpoint directory."""
    dump = (lambda obj: json.dumps(obj, indent=2) + "\n")
    return {
        "model_index.json": dump({"_class_name": PIPELINE_CLASS, "_diffusers_version": "0.42.1",
                                  "_srserve": "simulated: configs only, no weights (srserve/sim/spec.py)"}),
        "scheduler/scheduler_config.json": dump(SCHEDULER_CONFIG),
        "vae/config.json": dump(VAE_CONFIG),
        "transformer/config.json": dump(transformer_config(sim.sketch_model)),
        "transformer_2/config.json": dump(transformer_config(sim.render_model)),
        "text_encoder/config.json": dump(TEXT_ENCODER_CONFIG),
        "tokenizer/README.md": "The simulated family tokenizes nothing: it returns zero embeddings of the real size.\n",
        "srserve.json": dump({"name": name, "default_num_frames": 81, "default_height": 480, "default_width": 832,
                              "default_steps": 50, "default_switch": "adaptive", "fps": 16}),
        SIM_FILE: dump(sim.model_dump(mode="json")),
    }


def write_sim_checkpoint(path: str | os.PathLike, sim: SimSpec | None = None, name: str = "wan2.1-sim") -> Path:
    sim = sim or SimSpec()
    root = Path(path)
    for rel, text in checkpoint_files(sim, name).items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return root


BUNDLES = {  # shipped under srserve/sim/bundle/ (regenerate: python -m srserve.sim.spec --bundles)
    "wan2.1-sim-h100": SimSpec(sketch_gpu="h100", render_gpu="h100"),
    "wan2.1-sim-h100-l40s": SimSpec(sketch_gpu="h100", render_gpu="l40s"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", help="directory to write")
    parser.add_argument("--bundles", action="store_true", help="rewrite the shipped bundles")
    parser.add_argument("--name", default="wan2.1-sim")
    for field in ("sketch_gpu", "render_gpu", "encode_gpu", "decode_gpu", "sketch_model", "render_model",
                  "switch_distribution", "costs", "measured"):
        parser.add_argument("--" + field.replace("_", "-"), default=None)
    parser.add_argument("--time-factor", type=float, default=None)
    args = parser.parse_args(argv)
    if args.bundles:
        for name, sim in BUNDLES.items():
            write_sim_checkpoint(BUNDLE_DIR / name, sim, name)
        return 0
    if not args.out:
        parser.error("give a directory, or --bundles")
    fields = {k: v for k, v in vars(args).items() if k not in ("out", "bundles", "name") and v is not None}
    write_sim_checkpoint(args.out, SimSpec(**fields), args.name)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
