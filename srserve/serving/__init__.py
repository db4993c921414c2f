"""Disaggregated serving on Ray Serve: stage deployments, the app builder, the job store and artifacts."""
from srserve.serving.app import build_app
from srserve.serving.args import AppArgs

__all__ = ["AppArgs", "build_app"]
