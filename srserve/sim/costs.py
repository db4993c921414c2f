"""Typed access to the cost table (`costs.json`): what a named model costs on a named GPU, and what fits where.

    from srserve.sim.costs import default_table
    table = default_table()                       # costs.json, then a GPU check's measurements if there are any
    table.step_seconds("wan2.1-t2v-14b", "h100", "480p", batch=1)   # 5.056 (published)
    table.fits(["wan2.1-t2v-14b", "umt5-xxl", "wan-vae"], "l40s")   # False: a colocated large model wants 80 GB
    table.price("l4")                             # USD per GPU-hour
    table.entry("step_seconds", "wan2.1-t2v-1.3b", "l4", "480p")    # the number with its status and formula/source

A resolution is "480p" (832x480x81), "720p" (1280x720x81) or a (frames, height, width) tuple: other shapes scale the
nearest standard entry by the FLOPs ratio (`derive.forward_flops`), so a published or measured number stays the
anchor. A GPU check writes `benchmarks/results/gpu/measured_costs.json`; its numbers replace the table's (status
`measured`, the device named). Its format (one device, or {"measurements": [...]} for several):

    {"device": "NVIDIA H200", "gpu": "h200", "measured_at": "2026-12-01T00:00:00Z", "source": "benchmarks/gpu/run.sh",
     "step_seconds": {"wan2.1-t2v-14b": {"480p": {"1": 4.9, "2": 9.6}}},     # seconds per CFG step by batch size
     "text_encode_seconds": 0.41, "vae_decode_seconds": {"480p": 2.2}}

`benchmarks/gpu/real_shapes.py` output (`{"device", "latent_shape", "step_seconds": {backend: {model: {"median"}}}}`)
is read too: the fastest backend's medians become the 480p batch-1 numbers.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Union

from srserve.sim import derive

Resolution = Union[str, tuple[int, int, int]]
TABLE_PATH = derive.TABLE_PATH
DEFAULT_MEASURED = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "gpu" / "measured_costs.json"
MODELS = tuple(derive.TRANSFORMERS)
AUX_MODELS = ("umt5-xxl", "wan-vae")  # the encode and decode roles' models
_DEVICE_PATTERNS = (  # device name (torch.cuda.get_device_name / nvidia-smi) -> table key; first match wins
    (r"H200", "h200"), (r"H100", "h100"), (r"A100.*80\s*GB|A100-SXM4-80GB|A100 80GB", "a100-80g"),
    (r"L40S", "l40s"), (r"\bL4\b", "l4"), (r"4090", "rtx4090"),
)
_ALIASES = {"a100": "a100-80g", "a100-80gb": "a100-80g", "4090": "rtx4090", "rtx-4090": "rtx4090",
            "h100-sxm": "h100", "h200-sxm": "h200"}


class CostError(ValueError):
    """A model, GPU or resolution the table does not have."""


def gpu_key(name: str) -> str | None:
    """The table key of a GPU named by the table ("h100"), an alias ("4090") or its device name."""
    text = name.strip()
    low = text.lower()
    if low in derive.GPUS:
        return low
    if low in _ALIASES:
        return _ALIASES[low]
    for pattern, key in _DEVICE_PATTERNS:
        if re.search(pattern, text, flags=re.IGNORECASE):
            return key
    return None


def shape_of(resolution: Resolution) -> tuple[int, int, int]:
    if isinstance(resolution, str):
        if resolution not in derive.RESOLUTIONS:
            raise CostError(f"resolution {resolution!r}: one of {sorted(derive.RESOLUTIONS)} or "
                            "(frames, height, width)")
        return derive.RESOLUTIONS[resolution]
    frames, height, width = (int(v) for v in resolution)
    if frames < 1 or height < 16 or width < 16:
        raise CostError(f"resolution {resolution!r}: frames >= 1 and height, width >= 16")
    return frames, height, width


def nearest_resolution(resolution: Resolution) -> str:
    """The standard resolution a shape scales from: the one with the closest latent token count."""
    if isinstance(resolution, str):
        shape_of(resolution)
        return resolution
    tokens = derive.latent_tokens(*shape_of(resolution))
    return min(derive.RESOLUTIONS, key=lambda r: abs(math.log(tokens / derive.latent_tokens(*derive.RESOLUTIONS[r]))))


class CostTable:
    """The table's numbers (each with its provenance) and the memory and batching rules that use them."""

    def __init__(self, data: dict[str, Any], measurements: Iterable[dict[str, Any]] = ()) -> None:
        if data.get("version") != derive.TABLE_VERSION:
            raise CostError(f"cost table version {data.get('version')!r}, expected {derive.TABLE_VERSION}")
        self.data = copy.deepcopy(data)
        self.measured_devices: dict[str, str] = {}  # table key -> device name
        self.ignored_measurements: list[str] = []
        for m in measurements:
            self._apply(m)

    # --- loading --------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None = None, measured: str | Path | None = DEFAULT_MEASURED) -> "CostTable":
        """The table at `path` (default: the shipped costs.json) with the measurements at `measured` applied when
        that file exists (None: none)."""
        with open(path or TABLE_PATH) as f:
            data = json.load(f)
        return cls(data, read_measurements(measured) if measured is not None else ())

    def _apply(self, m: dict[str, Any]) -> None:
        device = str(m.get("device", ""))
        key = gpu_key(str(m.get("gpu") or device))
        if key is None:
            self.ignored_measurements.append(f"{device or m.get('gpu')!r}: not a GPU of the table")
            return
        where = f"measured on {device or key} ({m.get('source', 'GPU check')}, {m.get('measured_at', 'undated')})"
        for model, per_res in (m.get("step_seconds") or {}).items():
            if model not in self.data["step_seconds"]:
                self.ignored_measurements.append(f"{device}: model {model!r} is not in the table")
                continue
            for res, by_batch in per_res.items():
                if res not in derive.RESOLUTIONS:
                    self.ignored_measurements.append(f"{device}: resolution {res!r} is not in the table")
                    continue
                by_batch = {int(b): float(s) for b, s in (by_batch.items() if isinstance(by_batch, dict)
                                                          else {1: by_batch}.items())}
                if 1 not in by_batch:
                    self.ignored_measurements.append(f"{device}: {model} {res} has no batch-1 time")
                    continue
                self.data["step_seconds"][model][key][res] = {"value": by_batch[1], "status": "measured",
                                                              "source": where}
                if len(by_batch) > 1 and res == "480p":
                    b = max(by_batch)
                    marginal = (by_batch[b] / by_batch[1] - 1) / (b - 1)
                    self.data["batch"][model].setdefault("measured", {})[key] = {
                        "value": round(marginal, 4), "status": "measured", "source": where,
                        "formula": f"(step({b}) / step(1) - 1) / ({b} - 1)"}
        if m.get("text_encode_seconds") is not None:
            self.data["text_encode_seconds"][key] = {"value": float(m["text_encode_seconds"]), "status": "measured",
                                                     "source": where}
        for res, seconds in (m.get("vae_decode_seconds") or {}).items():
            if res in derive.RESOLUTIONS:
                self.data["vae_decode_seconds"][key][res] = {"value": float(seconds), "status": "measured",
                                                             "source": where}
        self.measured_devices[key] = device or key

    # --- lookups --------------------------------------------------------------------------------------------
    @property
    def gpus(self) -> list[str]:
        return list(self.data["gpus"])

    @property
    def models(self) -> list[str]:
        return list(self.data["step_seconds"])

    def gpu(self, name: str) -> str:
        key = gpu_key(name)
        if key is None or key not in self.data["gpus"]:
            raise CostError(f"GPU {name!r} is not in the cost table; one of {self.gpus}")
        return key

    def model(self, name: str) -> str:
        if name not in self.data["step_seconds"] and name not in self.data["models"]:
            raise CostError(f"model {name!r} is not in the cost table; one of {self.models + list(AUX_MODELS)}")
        return name

    def entry(self, kind: str, *keys: str) -> dict[str, Any]:
        """A number with its provenance: entry("step_seconds", model, gpu, res), entry("price", gpu), ..."""
        if kind == "price":
            return self.data["gpus"][self.gpu(keys[0])]["price_per_hour"]
        node: Any = self.data[kind]
        for k in keys:
            if k not in node and gpu_key(k) in node:  # a GPU by another of its names
                k = gpu_key(k)
            if k not in node:
                raise CostError(f"{kind}: no entry {k!r}; one of {sorted(node)}")
            node = node[k]
        return node

    def step_seconds(self, model: str, gpu: str, resolution: Resolution = "480p", batch: int = 1,
                     guided: bool = True) -> float:
        """Seconds of one denoising step of `batch` same-shape requests (guided: two forwards, CFG)."""
        model, gpu = self.model(model), self.gpu(gpu)
        if batch < 1:
            raise CostError(f"batch must be >= 1, got {batch}")
        base = nearest_resolution(resolution)
        seconds = self.data["step_seconds"][model][gpu][base]["value"]
        if not isinstance(resolution, str):
            seconds *= (derive.forward_flops(model, *shape_of(resolution))["total"]
                        / derive.forward_flops(model, *derive.RESOLUTIONS[base])["total"])
        if not guided:
            seconds /= 2
        return seconds * (1 + (batch - 1) * self.batch_marginal(model, gpu))

    def batch_marginal(self, model: str, gpu: str | None = None) -> float:
        """Cost of each request beyond the first in a batch, as a fraction of the first's."""
        batch = self.data["batch"][self.model(model)]
        if gpu is not None and self.gpu(gpu) in batch.get("measured", {}):
            return batch["measured"][self.gpu(gpu)]["value"]
        return batch["marginal"]["value"]

    def text_encode_seconds(self, gpu: str) -> float:
        return self.data["text_encode_seconds"][self.gpu(gpu)]["value"]

    def vae_decode_seconds(self, gpu: str, resolution: Resolution = "480p") -> float:
        base = nearest_resolution(resolution)
        seconds = self.data["vae_decode_seconds"][self.gpu(gpu)][base]["value"]
        if not isinstance(resolution, str):
            f, h, w = shape_of(resolution)
            f0, h0, w0 = derive.RESOLUTIONS[base]
            seconds *= f * h * w / (f0 * h0 * w0)
        return seconds

    def price(self, gpu: str) -> float:
        """List price, USD per GPU-hour."""
        return self.data["gpus"][self.gpu(gpu)]["price_per_hour"]["value"]

    def memory_gb(self, gpu: str) -> float:
        return self.data["gpus"][self.gpu(gpu)]["memory_gb"]["value"]

    def bf16_tflops(self, gpu: str) -> float:
        return self.data["gpus"][self.gpu(gpu)]["bf16_dense_tflops"]["value"]

    # --- memory ---------------------------------------------------------------------------------------------
    def need_gb(self, models: str | Iterable[str], resolution: Resolution = "480p", batch: int = 1,
                processes: int | None = None) -> float:
        """GPU memory a set of co-resident models needs: their weights, the largest activation peak (one computes
        at a time), and the runtime overhead once per process (default: one process per model, as separate Serve
        replicas on one GPU are)."""
        names = [models] if isinstance(models, str) else list(models)
        if not names:
            return 0.0
        weights = sum(self.data["models"][self.model(n)]["weights_gb"]["value"] for n in names)
        activation = max(self._activation_gb(n, resolution, batch) for n in names)
        overhead = self.data["assumptions"]["runtime_overhead_gb"]["value"]
        return weights + activation + overhead * (len(names) if processes is None else processes)

    def _activation_gb(self, model: str, resolution: Resolution, batch: int) -> float:
        base = nearest_resolution(resolution)
        gb = self.data["models"][model]["activation_gb"][base]["value"]
        if not isinstance(resolution, str):
            if model in derive.TRANSFORMERS:
                gb = derive.transformer_activation_gb(model, *shape_of(resolution))
            elif model == "wan-vae":
                gb = derive.vae_activation_gb(*shape_of(resolution))
        return gb * (batch if model in derive.TRANSFORMERS else 1)

    def fits(self, models: str | Iterable[str], gpu: str, resolution: Resolution = "480p", batch: int = 1,
             processes: int | None = None) -> bool:
        """Whether `models` (one role, or the roles sharing a GPU) fit in `gpu`'s usable memory."""
        usable = self.data["assumptions"]["usable_memory_fraction"]["value"] * self.memory_gb(gpu)
        return self.need_gb(models, resolution, batch, processes) <= usable


def read_measurements(path: str | Path | None) -> list[dict[str, Any]]:
    """The measurements in a GPU check's file (none when it does not exist)."""
    if path is None or not Path(path).is_file():
        return []
    with open(path) as f:
        data = json.load(f)
    items = data.get("measurements", [data]) if isinstance(data, dict) else list(data)
    return [_from_real_shapes(m) if _is_real_shapes(m) else m for m in items]


def _is_real_shapes(m: dict[str, Any]) -> bool:
    steps = m.get("step_seconds") or {}
    return "latent_shape" in m and any(isinstance(v, dict) and any(isinstance(x, dict) and "median" in x
                                                                   for x in v.values()) for v in steps.values())


def _from_real_shapes(m: dict[str, Any]) -> dict[str, Any]:
    """`benchmarks/gpu/real_shapes.py` output as a measurement: the fastest backend's median, at 480p, batch 1."""
    if list(m["latent_shape"]) != [1, 16, 21, 60, 104]:
        return {"device": m.get("device", ""), "step_seconds": {}}
    best: dict[str, float] = {}
    for per_model in m["step_seconds"].values():
        for model, stats in per_model.items():
            best[model] = min(best.get(model, math.inf), float(stats["median"]))
    return {"device": m.get("device", ""), "source": "benchmarks/gpu/real_shapes.py (fastest attention backend)",
            "measured_at": m.get("measured_at", "undated"),
            "step_seconds": {model: {"480p": {"1": s}} for model, s in best.items()}}


@functools.lru_cache(maxsize=1)
def default_table() -> CostTable:
    """The shipped table with the repository's GPU measurements applied (read once per process)."""
    return CostTable.load()


def step_seconds(model: str, gpu: str, resolution: Resolution = "480p", batch: int = 1, guided: bool = True) -> float:
    return default_table().step_seconds(model, gpu, resolution, batch, guided)


def fits(models: str | Iterable[str], gpu: str, resolution: Resolution = "480p", batch: int = 1) -> bool:
    return default_table().fits(models, gpu, resolution, batch)


def price(gpu: str) -> float:
    return default_table().price(gpu)


def text_encode_seconds(gpu: str) -> float:
    return default_table().text_encode_seconds(gpu)


def vae_decode_seconds(gpu: str, resolution: Resolution = "480p") -> float:
    return default_table().vae_decode_seconds(gpu, resolution)
