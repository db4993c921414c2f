"""Model families: how to load, encode, run one guided denoising step, and decode, per architecture.

Importing this package imports no torch: the registry's facts serve spec checks and the request card (also in
the ingress); a family's implementation is imported by `load_family`, and `ROLES` / `Family` on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from srserve.pipeline.families.registry import FAMILIES, FamilyInfo, family_for_pipeline, family_info, role_path

if TYPE_CHECKING:
    from srserve.config import ModelSpec
    from srserve.pipeline.families.base import Family


def load_family(spec: ModelSpec, roles: Iterable[str] | None = None) -> Family:
    """The family object for `spec` with the weights of `roles` loaded (default: all; others stay on disk)."""
    from srserve.pipeline.families.base import ROLES

    roles = ROLES if roles is None else tuple(roles)
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; roles are {list(ROLES)}")
    return family_info(spec.family).load()(spec, roles)


def __getattr__(name: str) -> Any:
    # `ROLES` and `Family` live in base.py, which imports torch: resolved on first use only.
    if name in ("ROLES", "Family"):
        from srserve.pipeline.families import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FAMILIES", "ROLES", "Family", "FamilyInfo", "family_for_pipeline", "family_info", "load_family",
           "role_path"]
