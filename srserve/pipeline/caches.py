"""Step-skipping caches (diffusers' `enable_cache`) with one state per request.

diffusers keys a cache's state by the name a pipeline gives `model.cache_context(name, step_index=..., sigma=...)`:
WanPipeline says "cond" and "uncond", one trajectory each. A serving batch holds many trajectories at different
steps, so each request's calls are named `"{key}/cond"`, `"{key}/uncond"` and carry that request's own step index
and sigma; its states are freed when it leaves the batch. diffusers decides to skip once per forward for the whole
batch, so a role with a cache steps each request alone (see `DenoiseBatch`).

Not every kind keeps its state by name: pyramid_attention_broadcast and faster hold one state per hook (swapped
here per name before each call) and read the timestep through a callback; MagCache counts steps itself and reads
its ratios from a config made for one step count (both set here per call, so any step count and any start work).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from srserve.config import CacheConfig, GenerationRequest, ModelSpec
from srserve.pipeline.families.base import DTYPES

WAN_ONLY = {"mag", "taylorseer", "pyramid_attention_broadcast", "faster", "sea"}


def diffusers_config(config: CacheConfig, timestep: Any) -> Any:
    """The diffusers config for `config`; `timestep()` returns the current call's timestep (PAB, FasterCache)."""
    import diffusers

    p = config.params()
    if config.kind == "first_block":
        return diffusers.FirstBlockCacheConfig(**p)
    if config.kind == "mag":
        # num_inference_steps and the ratios' length are set per request (StepCache.context)
        ratios = p.pop("mag_ratios")
        return diffusers.MagCacheConfig(**p, num_inference_steps=len(ratios) if ratios else 2,
                                        mag_ratios=list(ratios) if ratios else None)
    if config.kind == "taylorseer":
        p["taylor_factors_dtype"] = DTYPES[p["taylor_factors_dtype"]]
        p["cache_identifiers"] = list(p["cache_identifiers"])
        return diffusers.TaylorSeerCacheConfig(**p)
    if config.kind == "pyramid_attention_broadcast":
        return diffusers.PyramidAttentionBroadcastConfig(**p, current_timestep_callback=timestep)
    if config.kind == "faster":
        weight = p.pop("attention_weight")
        return diffusers.FasterCacheConfig(**p, current_timestep_callback=timestep,
                                           attention_weight_callback=lambda _module: weight)
    if config.kind == "sea":
        return diffusers.SeaCacheConfig(**p)
    raise ValueError(f"unknown cache kind {config.kind!r}")


class StepCache:
    """One transformer's diffusers cache, its state kept per request (`context`) and freed per request (`release`)."""

    def __init__(self, model: torch.nn.Module, config: CacheConfig) -> None:
        from diffusers.hooks.hooks import StateManager

        self.model, self.config = model, config
        self._timestep = 0.0
        self._diffusers = diffusers_config(config, self._current_timestep)
        model.enable_cache(self._diffusers)
        hooks = [h for m in model.modules() if getattr(m, "_diffusers_hook", None) is not None
                 for h in m._diffusers_hook.hooks.values()]
        managers = {id(a): a for h in hooks for a in vars(h).values() if isinstance(a, StateManager)}
        self._managers = list(managers.values())
        # hooks that keep a single `state` rather than one per context name (PAB, FasterCache)
        self._single = [h for h in hooks if h._is_stateful and hasattr(h, "state")
                        and not any(isinstance(a, StateManager) for a in vars(h).values())]
        self._states: dict[str, list[Any]] = {}
        self._ratios: dict[int, torch.Tensor] = {}
        self.calibrated: dict[str, list[float]] = {}  # mag with calibrate=True: the "cond" ratios per released key
        model.srserve_cache = self

    @classmethod
    def attach(cls, model: torch.nn.Module, config: CacheConfig, field: str) -> "StepCache":
        """Enable `config` on `model`; ValueError naming `field` where the model cannot take it."""
        if config.kind in WAN_ONLY and type(model).__name__ != "WanTransformer3DModel":
            raise ValueError(f"{field}: the {config.kind} cache is offered for Wan transformers only; "
                             f"{type(model).__name__} takes first_block")
        layers = getattr(model.config, "num_layers", 2)
        if config.kind == "first_block" and layers < 2:
            raise ValueError(f"{field}: FirstBlockCache needs a transformer with >= 2 blocks, it has {layers}")
        return cls(model, config)

    @property
    def batches_cfg(self) -> bool:
        """FasterCache approximates the unconditional branch from the conditional one: both in one forward."""
        return self.config.kind == "faster"

    def _current_timestep(self) -> float:
        return self._timestep

    @contextlib.contextmanager
    def context(self, key: str, branch: str, step_index: int, num_steps: int, timestep: torch.Tensor,
                sigma: float | None) -> Iterator[None]:
        """Scope one transformer call of request `key` (branch "cond", "uncond", ...) at a global step."""
        name = f"{key}/{branch}"
        self._timestep = float(timestep)
        if self._single:
            states = self._states.get(name)
            if states is None:
                states = self._states[name] = [type(h.state)() for h in self._single]
            for hook, state in zip(self._single, states):
                hook.state = state
        mag = self.config.kind == "mag"
        if mag:
            # one past the end while calibrating, so diffusers does not reset the ratios before `release` reads them
            self._diffusers.num_inference_steps = num_steps + 1 if self.config.calibrate else num_steps
            if not self.config.calibrate:
                self._diffusers.mag_ratios = self._mag_ratios(num_steps)
        with self.model.cache_context(name, step_index=step_index, sigma=sigma, num_inference_steps=num_steps):
            if mag:
                for manager in self._managers:
                    manager.get_state().step_index = step_index  # MagCache counts from 0 otherwise
            yield

    def _mag_ratios(self, num_steps: int) -> torch.Tensor:
        if num_steps not in self._ratios:
            from diffusers.hooks.mag_cache import nearest_interp

            self._ratios[num_steps] = nearest_interp(torch.tensor(self.config.mag_ratios), num_steps)
        return self._ratios[num_steps]

    def release(self, key: str) -> None:
        """Free every state of request `key` (diffusers has no public call to drop one context)."""
        prefix = f"{key}/"
        for manager in self._managers:
            names = [n for n in manager._state_cache if n.startswith(prefix)]
            if self.config.kind == "mag" and self.config.calibrate and f"{key}/cond" in names:
                self.calibrated[key] = list(manager._state_cache[f"{key}/cond"].calibration_ratios)
            for name in names:
                del manager._state_cache[name]
        for name in [n for n in self._states if n.startswith(prefix)]:
            del self._states[name]

    def active_keys(self) -> set[str]:
        """Requests holding state here (for tests and leak checks)."""
        names = {n for m in self._managers for n in m._state_cache} | set(self._states)
        return {n.rsplit("/", 1)[0] for n in names}


def step_cache(model: torch.nn.Module | None) -> StepCache | None:
    """The StepCache attached to `model` by `StepCache.attach`, if any."""
    return getattr(model, "srserve_cache", None)


def calibrate_mag_ratios(spec: ModelSpec, role: str, request: GenerationRequest) -> list[float]:
    """MagCache's ratios for `role`'s model, measured as diffusers' calibration mode does, on one run of that model
    over every step (`none` for the sketch model, `small-only` for the render model). Put them in
    `CacheConfig(kind="mag", mag_ratios=...)`; diffusers resamples them to other step counts."""
    from srserve.pipeline.engine import DenoiseBatch, SREngine

    if role not in ("sketch", "render"):
        raise ValueError(f"role must be sketch or render, got {role!r}")
    spec = spec.model_copy(update={f"{role}_cache": CacheConfig(kind="mag", calibrate=True)})
    engine = SREngine.load(spec, roles=("encode", role))
    request = request.model_copy(update={"switch": "none" if role == "sketch" else "small-only"})
    state = engine.prepare(request, engine.encode(request))
    batch = DenoiseBatch(engine.family, role)
    batch.add("calibration", state)
    while batch:
        batch.step()
    return step_cache(engine.family.transformers[role]).calibrated.pop("calibration")
