"""Every bad model spec fails with a clear error naming the problem, before any weights load."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

from srserve.pipeline.spec import ModelSpecError, resolve_model_spec


@pytest.fixture()
def model_copy(wan_unipc_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(wan_unipc_dir, target)
    return target


def edit_config(path, **changes):
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_directory_resolves(wan_unipc_dir):
    spec = resolve_model_spec(wan_unipc_dir)
    assert spec.family == "wan" and spec.name == "tiny-random" and spec.default_num_frames == 9


def test_spec_file_with_separate_transformers(wan_unipc_dir, tmp_path):
    spec_file = tmp_path / "pair.yaml"
    spec_file.write_text(yaml.safe_dump({
        "name": "pair", "family": "wan", "base_path": str(wan_unipc_dir),
        "sketch_transformer": str(wan_unipc_dir / "transformer"),
        "render_transformer": str(wan_unipc_dir / "transformer_2"), "dtype": "float32",
        "sketch_cache": {"kind": "first_block", "threshold": 0.1},
    }))
    spec = resolve_model_spec(spec_file)
    assert spec.name == "pair" and spec.sketch_cache.threshold == 0.1


def test_relative_paths_in_a_spec_file_are_relative_to_it(wan_unipc_dir, tmp_path):
    shutil.copytree(wan_unipc_dir, tmp_path / "ckpt")
    (tmp_path / "pair.json").write_text(json.dumps({"base_path": "ckpt", "render_transformer": "ckpt/transformer_2"}))
    assert resolve_model_spec(tmp_path / "pair.json").base_path == str((tmp_path / "ckpt").resolve())


def test_missing_model_path():
    with pytest.raises(ModelSpecError, match="no such directory or spec file"):
        resolve_model_spec("/nonexistent/model")


def test_missing_transformer_dir(model_copy):
    shutil.rmtree(model_copy / "transformer_2")
    with pytest.raises(ModelSpecError, match="render transformer.*does not exist"):
        resolve_model_spec(model_copy)


def test_missing_render_path_in_spec_file(wan_unipc_dir, tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"base_path": str(wan_unipc_dir), "render_transformer": "/no"}))
    with pytest.raises(ModelSpecError, match="render transformer"):
        resolve_model_spec(tmp_path / "s.yaml")


def test_missing_base_path(tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"base_path": str(tmp_path / "nope")}))
    with pytest.raises(ModelSpecError, match="base_path .* does not exist"):
        resolve_model_spec(tmp_path / "s.yaml")


def test_unknown_spec_field(tmp_path, wan_unipc_dir):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"base_path": str(wan_unipc_dir), "dtpye": "bfloat16"}))
    with pytest.raises(ModelSpecError, match="dtpye"):
        resolve_model_spec(tmp_path / "s.yaml")


def test_mismatched_text_dim(model_copy):
    edit_config(model_copy / "transformer_2" / "config.json", text_dim=64)
    with pytest.raises(ModelSpecError, match="differ in text_dim"):
        resolve_model_spec(model_copy)


def test_mismatched_latent_channels(model_copy):
    edit_config(model_copy / "transformer_2" / "config.json", in_channels=16)
    with pytest.raises(ModelSpecError, match="in_channels=16 does not match the VAE's latent channels"):
        resolve_model_spec(model_copy)


def test_vae_that_does_not_fit_the_transformers(model_copy):
    edit_config(model_copy / "vae" / "config.json", z_dim=16)
    with pytest.raises(ModelSpecError, match="latent channels 16"):
        resolve_model_spec(model_copy)


def test_unknown_attention_backend(wan_unipc_dir):
    with pytest.raises(ModelSpecError, match="attention_backend 'warp-speed' is unknown"):
        resolve_model_spec(wan_unipc_dir, attention_backend="warp-speed")


def test_attention_backend_not_installed(wan_unipc_dir):
    pytest.importorskip("torch")
    try:
        import xformers  # noqa: F401
        pytest.skip("xformers is installed here")
    except ImportError:
        pass
    with pytest.raises(ModelSpecError, match="attention_backend 'xformers' is not usable here"):
        resolve_model_spec(wan_unipc_dir, attention_backend="xformers")


def test_attention_backend_on_a_family_without_dispatcher(wan_unipc_dir, tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"base_path": str(wan_unipc_dir), "family": "cogvideox",
                                                     "attention_backend": "flash"}))
    with pytest.raises(ModelSpecError, match="supports only 'native'"):
        resolve_model_spec(tmp_path / "s.yaml")


def test_unsupported_pipeline(model_copy):
    edit_config(model_copy / "model_index.json", _class_name="FluxPipeline")
    with pytest.raises(ModelSpecError, match="FluxPipeline"):
        resolve_model_spec(model_copy)


def test_native_attention_and_explicit_backend_work(wan_unipc_dir):
    assert resolve_model_spec(wan_unipc_dir, attention_backend="native").attention_backend == "native"


def test_unknown_family(wan_unipc_dir, tmp_path):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"base_path": str(wan_unipc_dir), "family": "flux"}))
    with pytest.raises(ModelSpecError, match="unknown model family 'flux'; one of"):
        resolve_model_spec(tmp_path / "s.yaml")


def test_backend_requirements_are_left_to_where_the_model_runs(wan_unipc_dir):
    # The ingress resolves the spec without importing diffusers; the stage replicas check the backend.
    spec = resolve_model_spec(wan_unipc_dir, attention_backend="flash", check_backend=False)
    assert spec.attention_backend == "flash"
