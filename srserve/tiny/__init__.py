"""The bundled demo family: srd-tiny (trained), its procedural domain, training and evaluator."""
from __future__ import annotations

import os
from pathlib import Path

BUNDLE_PATH = Path(__file__).parent / "bundle" / "srd-tiny"


def default_model_path() -> str:
    """The trained srd-tiny bundle when shipped; otherwise a tiny random-weight pair built once in the cache."""
    if (BUNDLE_PATH / "model_index.json").is_file():
        return str(BUNDLE_PATH)
    from srserve.tiny.random_model import build_random_wan

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "srserve" / "tiny-random"
    if not (cache / "model_index.json").is_file():
        build_random_wan(cache)
    return str(cache)
