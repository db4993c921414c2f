"""The handoff state: everything a stage needs to continue a request where the previous one stopped.

One frozen, versioned object of CPU tensors and plain data. It pickles as is (so `ray.put` moves it through the
object store), and `to_bytes`/`from_bytes` give a checked wire form. Restoring the scheduler from it reproduces
the in-process run bit for bit: multistep schedulers (UniPC, DPM) keep their history in instance attributes,
which are carried whole.
"""
from __future__ import annotations

import copy
import dataclasses
import pickle
from dataclasses import dataclass, field
from typing import Any

import torch

from srserve.config import GenerationRequest
from srserve.pipeline.stepping import PromptEmbeddings  # noqa: F401  (torch-free home; families import it here)

# 2: no `switch_policy` (read `request.switch`), no `previous_output` (the adaptive rule runs within one sketch
# segment), embeddings may be None on the wire.
HANDOFF_VERSION = 2
# Attributes of a scheduler that are configuration or derived from it, not carried state.
_SCHEDULER_SKIP = {"_internal_dict"}


@dataclass(frozen=True)
class HandoffState:
    request: GenerationRequest  # resolved: no None left; `request.switch` is the switch policy
    family: str
    latents: torch.Tensor
    step_index: int  # the next denoising step to run
    timesteps: torch.Tensor
    scheduler_class: str
    scheduler_config: dict[str, Any]
    scheduler_state: dict[str, Any]
    # None while shipped apart (the object store holds them once for many hops); re-attach with
    # `state.replace(embeddings=...)` before a denoising stage
    embeddings: PromptEmbeddings | None
    generator_state: torch.Tensor  # CPU generator state after the initial noise (schedulers that draw noise)
    switch_step: int | None  # number of sketch steps; None until the adaptive rule decides
    switch_diffs: tuple[float, ...] = ()  # the adaptive rule's d_i, written by the sketch for diagnostics only
    family_state: dict[str, Any] = field(default_factory=dict)  # e.g. the latent space a family put them in
    version: int = HANDOFF_VERSION

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    @property
    def done(self) -> bool:
        return self.step_index >= self.num_steps

    def replace(self, **changes: Any) -> "HandoffState":
        return dataclasses.replace(self, **changes)

    def for_decode(self) -> "HandoffState":
        """A copy holding what Decode reads (latents, the labels of `family_state`) and the small metadata stages
        report (request, steps, switch step); the rest emptied, so the hop to Decode moves little but the latents.
        Tensors in `family_state` are denoising carry (CogVideoX's x0 for its solver); no family decodes with them.
        """
        return self.replace(
            scheduler_config={}, scheduler_state={}, embeddings=None,
            generator_state=torch.empty(0, dtype=torch.uint8), switch_diffs=(),
            family_state={k: v for k, v in self.family_state.items() if not isinstance(v, torch.Tensor)},
        )

    def nbytes(self) -> int:
        """Approximate size of the tensors carried, for metrics."""
        return sum(t.numel() * t.element_size() for t in _tensors(self))

    def to_bytes(self) -> bytes:
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def from_bytes(data: bytes) -> "HandoffState":
        state = pickle.loads(data)
        if not isinstance(state, HandoffState):
            raise TypeError(f"expected a HandoffState, got {type(state).__name__}")
        check_version(state)
        return state


def check_version(state: HandoffState) -> None:
    """ValueError unless `state` has this code's handoff layout (a pickle of another layout loads but misreads)."""
    version = getattr(state, "version", None)
    if version != HANDOFF_VERSION:
        raise ValueError(f"handoff version {version} is not supported (expected {HANDOFF_VERSION})")


def _tensors(obj: Any):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name))
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def to_cpu(value: Any) -> Any:
    """Deep copy with tensors moved to contiguous CPU memory: the receiver may sit on another GPU or none."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True).contiguous()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_cpu(v) for v in value]
    if isinstance(value, tuple):
        return tuple(to_cpu(v) for v in value)
    return copy.deepcopy(value)


def _to_device(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return copy.deepcopy(value)


def _on_accelerator(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.device.type != "cpu"
    if isinstance(value, (list, tuple)):
        return any(_on_accelerator(v) for v in value)
    return False


def capture_scheduler(scheduler: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(class name, config, carried state) of a diffusers scheduler, with its tensors on CPU.

    The state remembers which attributes lived on the accelerator (the sample history) so `restore_scheduler`
    puts them back there, while attributes diffusers keeps on CPU on purpose (sigmas) stay on CPU.
    """
    attrs = {k: v for k, v in vars(scheduler).items() if k not in _SCHEDULER_SKIP}
    on_device = sorted(k for k, v in attrs.items() if _on_accelerator(v))
    return type(scheduler).__name__, dict(scheduler.config), {"attrs": to_cpu(attrs), "on_device": on_device}


def restore_scheduler(state: HandoffState, device: torch.device | str = "cpu") -> Any:
    """A scheduler exactly as it was when the state was captured."""
    import diffusers

    cls = getattr(diffusers, state.scheduler_class)
    scheduler = cls.from_config(state.scheduler_config)
    attrs = copy.deepcopy(state.scheduler_state["attrs"])
    for key in state.scheduler_state["on_device"]:
        attrs[key] = _to_device(attrs[key], device)
    vars(scheduler).update(attrs)
    return scheduler
