"""The Serve configs in deployments/: valid for Ray Serve's schema, and for srserve's AppArgs where they build srserve."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

DEPLOYMENTS = Path(__file__).resolve().parents[1] / "deployments"

SERVE_CONFIGS = sorted(p for p in DEPLOYMENTS.glob("*.yaml") if "applications" in yaml.safe_load(p.read_text()))


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=[p.name for p in SERVE_CONFIGS])
def test_deployment_serve_configs_are_valid(path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema
    from srserve.serving.args import AppArgs

    config = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        if app["import_path"] == "srserve.serving:build_app":
            AppArgs.model_validate(app.get("args") or {})


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=[p.name for p in SERVE_CONFIGS])
def test_configs_on_a_public_host_require_api_keys(path: Path) -> None:
    from srserve.serving.runner import check_exposure

    config = yaml.safe_load(path.read_text())
    host = (config.get("http_options") or {}).get("host", "127.0.0.1")
    assert check_exposure(config, host) is None
