"""Model families: how to load, encode, run one guided denoising step, and decode, per architecture.

Importing this package imports no torch: the registry's facts serve spec checks and the request card (also in
the ingress); a family's implementation is imported by `load_family` / `load_engine`, and `Family` on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

from srserve.pipeline.families.registry import (ROLES, FAMILIES, FamilyInfo, family_for_pipeline, family_info,
                                                role_path)

if TYPE_CHECKING:
    from srserve.config import ModelSpec
    from srserve.pipeline.families.base import Family


def check_roles(roles: Iterable[str] | None) -> tuple[str, ...]:
    """`roles` as a tuple (default: all), ValueError naming any unknown one."""
    roles = ROLES if roles is None else tuple(roles)
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; roles are {list(ROLES)}")
    return roles


def load_family(spec: ModelSpec, roles: Iterable[str] | None = None) -> Family:
    """The family object for `spec` with the weights of `roles` loaded (default: all; others stay on disk)."""
    return family_info(spec.family).load()(spec, check_roles(roles))


def load_engine(spec: ModelSpec, roles: Iterable[str] | None = None) -> Any:
    """The engine that runs `spec` with the weights of `roles` loaded: `SREngine` (torch, diffusers), or the
    family's own (the simulated family's imports neither)."""
    return family_info(spec.family).load_engine().load(spec, check_roles(roles))


def __getattr__(name: str) -> Any:
    # `Family` lives in base.py, which imports torch: resolved on first use only.
    if name == "Family":
        from srserve.pipeline.families import base

        return base.Family
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FAMILIES", "ROLES", "Family", "FamilyInfo", "check_roles", "family_for_pipeline", "family_info",
           "load_engine", "load_family", "role_path"]
