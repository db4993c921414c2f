"""The model families srserve knows, as facts that need no torch.

Each `FamilyInfo` says which diffusers pipeline a checkpoint directory of the family holds, its VAE strides and
default video, whether attention backends apply, and its own spec checks (configs only). The implementation
(torch, diffusers) is imported by `FamilyInfo.load` alone, when weights load: spec checks and the request card
run in the ingress, which never imports torch.
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from srserve.pipeline.errors import ModelSpecError

if TYPE_CHECKING:
    from srserve.config import ModelSpec

ROLES = ("encode", "sketch", "render", "decode")  # what a stage loads the weights of
# The small configs a family check reads: "vae" (the base VAE) and "sketch" / "render" (the transformers).
Configs = dict[str, dict[str, Any]]


def _no_checks(spec: ModelSpec, configs: Configs) -> None:
    return None


@dataclass(frozen=True)
class FamilyInfo:
    name: str
    pipeline_class: str  # `_class_name` in the model_index.json of the family's diffusers checkpoints
    implementation: str  # "module:Class" of its `Family`; imported by `load` only (it imports torch)
    attention_backends: bool  # its diffusers models take `set_attention_backend`
    # What a request gets when neither it nor the spec says.
    default_num_frames: int
    default_height: int
    default_width: int
    default_steps: int
    vae_scales: Callable[[dict[str, Any]], tuple[int, int]]  # vae/config.json -> (temporal, spatial) strides
    validate: Callable[[ModelSpec, Configs], None] = _no_checks  # ModelSpecError for what only this family needs
    # "module:Class" of the engine that runs it: SREngine (torch, diffusers) unless the family brings its own
    engine: str = "srserve.pipeline.engine:SREngine"

    def load(self) -> type:
        """The family's `Family` class."""
        return _import(self.implementation)

    def load_engine(self) -> type:
        """The class of the engine that runs the family (`SREngine`, or its own), imported now."""
        return _import(self.engine)


def _import(path: str) -> type:
    module, _, cls = path.partition(":")
    return getattr(importlib.import_module(module), cls)


def role_path(spec: ModelSpec, role: str) -> str:
    """Directory of the transformer a role runs."""
    if role == "sketch":
        return spec.sketch_transformer or os.path.join(spec.base_path, "transformer")
    if role == "render":
        if spec.render_transformer:
            return spec.render_transformer
        # A CogVideoX pair names the small model's own diffusers directory; Wan2.2 layouts use transformer_2.
        base = spec.render_base_path or spec.base_path
        return os.path.join(base, "transformer" if spec.render_base_path else "transformer_2")
    raise ValueError(f"role {role!r} has no transformer")


def read_config(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A JSON config, or ModelSpecError saying which part of the model is missing or broken."""
    if not os.path.isfile(path):
        raise ModelSpecError(f"{what}: {path} does not exist")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ModelSpecError(f"{what}: {path} is not valid JSON: {err}") from None


# --- Wan2.1 / Wan2.2 --------------------------------------------------------------------------------------
def _wan_vae_scales(vae: dict[str, Any]) -> tuple[int, int]:
    return int(vae.get("scale_factor_temporal", 4)), int(vae.get("scale_factor_spatial", 8))


WAN = FamilyInfo(
    name="wan", pipeline_class="WanPipeline", implementation="srserve.pipeline.families.wan:WanFamily",
    attention_backends=True, default_num_frames=81, default_height=480, default_width=832, default_steps=50,
    vae_scales=_wan_vae_scales,
)


# --- CogVideoX --------------------------------------------------------------------------------------------
def _cogvideox_vae_scales(vae: dict[str, Any]) -> tuple[int, int]:
    # Every down block but the last halves the size.
    return int(vae.get("temporal_compression_ratio", 4)), 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)


def _validate_cogvideox(spec: ModelSpec, configs: Configs) -> None:
    lengths = {role: configs[role].get("max_text_seq_length", 226) for role in ("sketch", "render")}
    if lengths["sketch"] != lengths["render"]:
        raise ModelSpecError(f"sketch and render transformers differ in max_text_seq_length: {lengths}")
    if spec.render_base_path is None:
        return
    # The 5B and 2B share VAE weights but not the scaling factor: the render VAE may differ in nothing else.
    path = os.path.join(spec.render_base_path, "vae", "config.json")
    render, base = read_config(path, f"render_base_path {spec.render_base_path!r}"), configs["vae"]
    keys = (set(render) | set(base)) - {"scaling_factor"}
    differ = sorted(k for k in keys if not k.startswith("_") and render.get(k) != base.get(k))
    if differ:
        raise ModelSpecError(f"the render VAE ({path}) differs from the base VAE in {differ}; sketch and render "
                             f"must share the VAE (only scaling_factor may differ)")


COGVIDEOX = FamilyInfo(
    name="cogvideox", pipeline_class="CogVideoXPipeline",
    implementation="srserve.pipeline.families.cogvideox:CogVideoXFamily", attention_backends=False,
    default_num_frames=49, default_height=480, default_width=720, default_steps=50,
    vae_scales=_cogvideox_vae_scales, validate=_validate_cogvideox,
)

# --- simulated GPU pools (srserve.sim): Wan2.1 configs, no weights; each step sleeps the cost table's time ------
def _validate_sim(spec: ModelSpec, configs: Configs) -> None:
    from srserve.sim.spec import load_sim_spec, transformer_config

    try:
        sim = load_sim_spec(spec)
    except ValueError as err:
        raise ModelSpecError(f"simulated model {spec.name!r}: {err}") from None
    for role, model in (("sketch", sim.sketch_model), ("render", sim.render_model)):
        want = transformer_config(model)
        differ = [k for k in ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim")
                  if configs[role].get(k) != want[k]]
        if differ:
            raise ModelSpecError(f"the {role} transformer config differs from {model} (the sim's {role}_model) "
                                 f"in {differ}")


# Its engine is torch-free (numpy states, no diffusers), so a simulated replica costs little memory.
SIM = FamilyInfo(
    name="sim", pipeline_class="SimWanPipeline", implementation="srserve.sim.engine:SimFamily",
    attention_backends=False, default_num_frames=81, default_height=480, default_width=832, default_steps=50,
    vae_scales=_wan_vae_scales, validate=_validate_sim, engine="srserve.sim.engine:SimEngine",
)

FAMILIES: dict[str, FamilyInfo] = {info.name: info for info in (WAN, COGVIDEOX, SIM)}


def family_info(name: str) -> FamilyInfo:
    if name not in FAMILIES:
        raise ModelSpecError(f"family {name!r} is unknown; one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_for_pipeline(pipeline_class: str | None) -> FamilyInfo | None:
    """The family whose diffusers checkpoints name `pipeline_class` in model_index.json, if any."""
    return next((info for info in FAMILIES.values() if info.pipeline_class == pipeline_class), None)
