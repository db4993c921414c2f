"""GPU sampling through NVML (`nvidia-ml-py`): each replica samples only the GPUs it was given.

`start_gpu_sampler(pool)` (once per replica, in its `__init__`) maps CUDA_VISIBLE_DEVICES to NVML devices and
reads, every `interval_s` in a daemon thread (off the hot path), utilisation, memory used and total, power and
temperature into the srserve_gpu_* gauges, labelled `pool` and `gpu` (the NVML index; "3/mig1" for a MIG device).
Where NVML or a GPU is absent (CPU machines, CPU-only replicas): one log line, `srserve_gpu_sampler_up{pool} 0`,
no thread, no error.

CUDA_VISIBLE_DEVICES as CUDA reads it: unset = every GPU; a comma list of indices, `GPU-<uuid>` (a unique prefix
is enough) or MIG UUIDs (`MIG-<uuid>`, or the older `MIG-GPU-<uuid>/<gi>/<ci>`); an invalid entry hides itself and
everything after it (so "", "-1" and "NoDevFiles" mean none). Indices are taken as NVML (PCI bus) indices: what
Ray assigns, and what CUDA uses with CUDA_DEVICE_ORDER=PCI_BUS_ID.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from srserve.serving import metrics

logger = logging.getLogger("srserve.gpu")


@dataclass(frozen=True)
class Gpu:
    label: str  # the `gpu` label: NVML index, or "<parent index>/mig<j>"
    handle: Any


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _migs(nvml: Any, parent: Any) -> list[tuple[int, Any]]:
    try:
        count = nvml.nvmlDeviceGetMaxMigDeviceCount(parent)
    except nvml.NVMLError:  # MIG not supported or not enabled
        return []
    out = []
    for j in range(count):
        try:
            out.append((j, nvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, j)))
        except nvml.NVMLError:  # an empty slot
            continue
    return out


def _resolve(nvml: Any, token: str, parents: list[Any], uuids: list[str]) -> Gpu | None:
    if token.isdigit():
        index = int(token)
        return Gpu(str(index), parents[index]) if index < len(parents) else None
    if token.startswith("GPU-"):
        found = [i for i, uuid in enumerate(uuids) if uuid.startswith(token)]
        return Gpu(str(found[0]), parents[found[0]]) if len(found) == 1 else None
    if token.startswith("MIG-GPU-"):  # the pre-R470 form: parent UUID, GPU instance, compute instance
        parent_uuid, _, rest = token[len("MIG-"):].partition("/")
        gi, _, ci = rest.partition("/")
        for i, uuid in enumerate(uuids):
            if uuid == parent_uuid:
                for j, mig in _migs(nvml, parents[i]):
                    if (str(nvml.nvmlDeviceGetGpuInstanceId(mig)) == gi
                            and str(nvml.nvmlDeviceGetComputeInstanceId(mig)) == ci):
                        return Gpu(f"{i}/mig{j}", mig)
        return None
    if token.startswith("MIG-"):
        for i, parent in enumerate(parents):
            for j, mig in _migs(nvml, parent):
                if _text(nvml.nvmlDeviceGetUUID(mig)).startswith(token):
                    return Gpu(f"{i}/mig{j}", mig)
    return None


def visible_gpus(nvml: Any, visible: str | None) -> list[Gpu]:
    """The NVML devices that CUDA_VISIBLE_DEVICES=`visible` exposes, in its order (nvmlInit already done)."""
    parents = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    if visible is None:
        return [Gpu(str(i), handle) for i, handle in enumerate(parents)]
    uuids = [_text(nvml.nvmlDeviceGetUUID(handle)) for handle in parents]
    out: list[Gpu] = []
    for token in visible.split(","):
        gpu = _resolve(nvml, token.strip(), parents, uuids)
        if gpu is None:
            break  # CUDA hides an invalid entry and every one after it
        if all(g.label != gpu.label for g in out):
            out.append(gpu)
    return out


# gauge -> how to read it from (pynvml, device handle)
READINGS: dict[str, Callable[[Any, Any], float]] = {
    "srserve_gpu_utilization_percent": lambda nvml, h: nvml.nvmlDeviceGetUtilizationRates(h).gpu,
    "srserve_gpu_memory_used_bytes": lambda nvml, h: nvml.nvmlDeviceGetMemoryInfo(h).used,
    "srserve_gpu_memory_total_bytes": lambda nvml, h: nvml.nvmlDeviceGetMemoryInfo(h).total,
    "srserve_gpu_power_watts": lambda nvml, h: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0,  # milliwatts
    "srserve_gpu_temperature_celsius": lambda nvml, h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
}


class GpuSampler:
    """Samples the replica's GPUs into srserve_gpu_* gauges; `start()` is False (and logs once) without NVML."""

    def __init__(self, pool: str, interval_s: float = 5.0, env: Mapping[str, str] | None = None,
                 nvml: Any = None) -> None:
        if interval_s <= 0:
            raise ValueError(f"GPU sample interval must be > 0 s, got {interval_s}")
        self.pool, self.interval_s = pool, interval_s
        self.visible = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
        self._nvml, self.gpus = nvml, []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned: set[tuple[str, str]] = set()

    def _up(self, value: int) -> None:
        metrics.record("srserve_gpu_sampler_up", value, {"pool": self.pool})

    def start(self) -> bool:
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            self.gpus = visible_gpus(self._nvml, self.visible)
        except Exception as err:  # no library, no driver, no device: the normal case on CPU machines
            logger.info("GPU sampler off (pool %s): NVML unavailable (%s: %s)", self.pool, type(err).__name__, err)
            self._up(0)
            return False
        if not self.gpus:
            logger.info("GPU sampler off (pool %s): no GPU visible (CUDA_VISIBLE_DEVICES=%r)", self.pool,
                        self.visible)
            self._shutdown()
            self._up(0)
            return False
        self.sample()
        self._up(1)
        self._thread = threading.Thread(target=self._run, name=f"srserve-gpu-sampler-{self.pool}", daemon=True)
        self._thread.start()
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def _read(self, gpu: Gpu, name: str, read: Callable[[Any, Any], float]) -> float | None:
        try:
            return float(read(self._nvml, gpu.handle))
        except Exception as err:  # e.g. NotSupported (power, utilisation on MIG): skip that gauge
            if (gpu.label, name) not in self._warned:
                self._warned.add((gpu.label, name))
                logger.info("GPU %s: no %s (%s)", gpu.label, name, type(err).__name__)
            return None

    def sample(self) -> dict[str, dict[str, float]]:
        """Read every GPU once into the gauges; returns {gpu label: {metric: value}} (what was readable)."""
        out = {}
        for gpu in self.gpus:
            readings = {name: self._read(gpu, name, read) for name, read in READINGS.items()}
            out[gpu.label] = {name: value for name, value in readings.items() if value is not None}
            tags = {"pool": self.pool, "gpu": gpu.label}
            for name, value in out[gpu.label].items():
                metrics.record(name, value, tags)
        return out

    def _shutdown(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5)
            self._thread = None
            self._shutdown()


_samplers: dict[str, GpuSampler] = {}
_samplers_lock = threading.Lock()


def start_gpu_sampler(pool: str, interval_s: float = 5.0) -> GpuSampler:
    """The process's sampler for `pool`, started on first call (a Colocated replica calls it once per role)."""
    with _samplers_lock:
        if pool not in _samplers:
            _samplers[pool] = GpuSampler(pool, interval_s)
            _samplers[pool].start()
        return _samplers[pool]
