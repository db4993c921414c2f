"""Disaggregated serving on Ray Serve: stage deployments, the app builder, the job store and artifacts.

Imported lazily: an Ingress replica imports `srserve.serving.ingress` (and so this package), and must not load
the engine, torch or diffusers that `app.py` pulls in through the stage deployments.
"""
from __future__ import annotations

from typing import Any

__all__ = ["AppArgs", "build_app"]


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from srserve.serving.app import build_app

        return build_app
    if name == "AppArgs":
        from srserve.serving.args import AppArgs

        return AppArgs
    raise AttributeError(f"module 'srserve.serving' has no attribute {name!r}")
