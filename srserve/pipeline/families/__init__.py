"""Model families: how to load, encode, run one guided denoising step, and decode, per architecture."""
from __future__ import annotations

from typing import Iterable

from srserve.config import ModelSpec
from srserve.pipeline.families.base import ROLES, Family


def load_family(spec: ModelSpec, roles: Iterable[str] = ROLES) -> Family:
    """The family object for `spec` with the weights of `roles` loaded (others stay on disk)."""
    roles = tuple(roles)
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; roles are {list(ROLES)}")
    if spec.family == "wan":
        from srserve.pipeline.families.wan import WanFamily

        return WanFamily(spec, roles)
    if spec.family == "cogvideox":
        from srserve.pipeline.families.cogvideox import CogVideoXFamily

        return CogVideoXFamily(spec, roles)
    raise ValueError(f"unknown model family {spec.family!r}")


__all__ = ["ROLES", "Family", "load_family"]
