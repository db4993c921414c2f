"""Resolve `--model` (a diffusers directory or a YAML/JSON spec file) into a checked ModelSpec.

All checks read configs only (small JSON files), so a bad spec fails before any weights load; none imports
torch but the attention backend's requirements (`check_backend`), which belong where the model runs.
The caller names the model: the bundled demo is `srserve.tiny.default_model_path()`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from srserve.config import ModelSpec
from srserve.pipeline.errors import ModelSpecError
from srserve.pipeline.families.registry import FAMILIES, family_for_pipeline, family_info, read_config, role_path

SPEC_DEFAULTS_FILE = "srserve.json"  # optional serving defaults next to model_index.json

__all__ = ["ModelSpecError", "resolve_model_spec", "validate_model_spec"]


def resolve_model_spec(model: str | os.PathLike | ModelSpec, *, check_backend: bool = True,
                       **overrides: Any) -> ModelSpec:
    """The checked spec of `model`, with `overrides` (ModelSpec fields; None leaves a field as it is)."""
    if isinstance(model, ModelSpec):
        spec = model
    elif model is None:
        raise ModelSpecError("no model given: a diffusers directory or a YAML/JSON spec file (the bundled demo "
                             "model is srserve.tiny.default_model_path())")
    else:
        path = Path(model).expanduser()
        if path.is_dir():
            spec = _spec_from_directory(path)
        elif path.is_file():
            spec = _spec_from_file(path)
        else:
            raise ModelSpecError(f"--model {str(model)!r}: no such directory or spec file")
    if overrides:
        spec = spec.model_copy(update={k: v for k, v in overrides.items() if v is not None})
        spec = ModelSpec.model_validate(spec.model_dump())
    validate_model_spec(spec, check_backend=check_backend)
    return spec


def _spec_from_directory(path: Path) -> ModelSpec:
    index = read_config(path / "model_index.json", "the model directory")
    info = family_for_pipeline(index.get("_class_name"))
    if info is None:
        supported = sorted(f.pipeline_class for f in FAMILIES.values())
        raise ModelSpecError(f"{path}/model_index.json: pipeline {index.get('_class_name')!r} is not supported; "
                             f"supported: {supported}")
    fields: dict[str, Any] = {"name": path.name, "family": info.name, "base_path": str(path.resolve())}
    defaults_file = path / SPEC_DEFAULTS_FILE
    if defaults_file.is_file():
        fields.update(read_config(defaults_file, "the serving defaults"))
    return ModelSpec(**fields)


def _spec_from_file(path: Path) -> ModelSpec:
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ModelSpecError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from None
    if not isinstance(data, dict):
        raise ModelSpecError(f"{path}: expected a mapping of spec fields")
    # Paths in a spec file are relative to the file, so a spec can travel with its checkpoints.
    for key in ("base_path", "sketch_transformer", "render_transformer", "render_base_path"):
        if isinstance(data.get(key), str):
            data[key] = str((path.parent / os.path.expanduser(data[key])).resolve())
    try:
        return ModelSpec(**data)
    except Exception as err:
        raise ModelSpecError(f"{path}: {err}") from None


def validate_model_spec(spec: ModelSpec, *, check_backend: bool = True) -> None:
    """ModelSpecError naming the problem: missing paths, mismatched sketch/render, unusable attention backend.

    `check_backend=False` leaves out whether a non-native attention backend is installed here (it imports
    diffusers): the ingress, which never runs the model, checks the rest.
    """
    base = Path(spec.base_path)
    if not base.is_dir():
        raise ModelSpecError(f"base_path {spec.base_path!r} does not exist")
    configs = {role: read_config(Path(role_path(spec, role)) / "config.json", f"the {role} transformer")
               for role in ("sketch", "render")}
    vae = read_config(base / "vae" / "config.json", "the VAE")
    read_config(base / "scheduler" / "scheduler_config.json", "the scheduler")
    for part in ("text_encoder", "tokenizer"):
        if not (base / part).is_dir():
            raise ModelSpecError(f"base_path {spec.base_path!r} has no {part}/ directory")
    latent = vae.get("z_dim", vae.get("latent_channels"))
    for role, config in configs.items():
        if config.get("in_channels") != latent and config.get("in_channels") != 2 * latent:
            raise ModelSpecError(f"{role} transformer in_channels={config.get('in_channels')} does not match the "
                                 f"VAE's latent channels {latent}")
    sketch, render = configs["sketch"], configs["render"]
    for key in ("in_channels", "out_channels", "text_dim", "text_embed_dim", "patch_size", "patch_size_t"):
        if sketch.get(key) != render.get(key):
            raise ModelSpecError(f"sketch and render transformers differ in {key}: "
                                 f"{sketch.get(key)} vs {render.get(key)}; they must share latents and text")
    info = family_info(spec.family)
    info.validate(spec, {"vae": vae, **configs})
    if spec.attention_backend == "native":
        return
    if not info.attention_backends:
        raise ModelSpecError(f"attention_backend {spec.attention_backend!r}: the {spec.family} family supports "
                             f"only 'native' (its diffusers models have no attention dispatcher)")
    if check_backend:
        _check_attention_backend(spec.attention_backend)


def _check_attention_backend(name: str) -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        backend = AttentionBackendName(name)
    except ValueError:
        names = sorted(b.value for b in AttentionBackendName)
        raise ModelSpecError(f"attention_backend {name!r} is unknown; one of {names}") from None
    try:
        _check_attention_backend_requirements(backend)
    except Exception as err:
        raise ModelSpecError(f"attention_backend {name!r} is not usable here: {err}") from None
