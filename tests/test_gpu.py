"""srserve/serving/gpu.py: CUDA_VISIBLE_DEVICES -> NVML devices and the sampling, on a fake pynvml; and the
absent path on this machine's real pynvml (no NVML library here): one log line, sampler_up 0, nothing else."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest

from srserve.serving import metrics
from srserve.serving.gpu import GpuSampler, visible_gpus
from srserve.serving.prom import parse_exposition


class FakeNVML:
    """Three GPUs; GPU 1 is in MIG mode with two instances (slots 0 and 2; slot 1 empty)."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    UUIDS = ["GPU-aaaa1111", "GPU-bbbb2222", "GPU-aaaa3333"]
    MIGS = {1: {0: ("MIG-cccc0000", 1, 0), 2: ("MIG-dddd2222", 2, 0)}}  # slot: (uuid, gpu instance, compute)

    def __init__(self, fail_init: bool = False) -> None:
        self.fail_init, self.inits, self.shutdowns = fail_init, 0, 0

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise self.NVMLError("NVML Shared Library Not Found")
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.UUIDS)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> tuple:
        return ("gpu", i)

    def nvmlDeviceGetUUID(self, h: tuple) -> str:
        return self.UUIDS[h[1]] if h[0] == "gpu" else self.MIGS[h[1]][h[2]][0]

    def nvmlDeviceGetMaxMigDeviceCount(self, h: tuple) -> int:
        if h[1] not in self.MIGS:
            raise self.NVMLError("Not Supported")
        return 3

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: tuple, j: int) -> tuple:
        if j not in self.MIGS[h[1]]:
            raise self.NVMLError("Not Found")
        return ("mig", h[1], j)

    def nvmlDeviceGetGpuInstanceId(self, h: tuple) -> int:
        return self.MIGS[h[1]][h[2]][1]

    def nvmlDeviceGetComputeInstanceId(self, h: tuple) -> int:
        return self.MIGS[h[1]][h[2]][2]

    def nvmlDeviceGetUtilizationRates(self, h: tuple) -> SimpleNamespace:
        if h[0] == "mig":
            raise self.NVMLError("Not Supported")
        return SimpleNamespace(gpu=10 * (h[1] + 1), memory=5)

    def nvmlDeviceGetMemoryInfo(self, h: tuple) -> SimpleNamespace:
        return SimpleNamespace(used=(h[1] + 1) * 2**30, total=80 * 2**30, free=0)

    def nvmlDeviceGetPowerUsage(self, h: tuple) -> int:
        if h[0] == "mig":
            raise self.NVMLError("Not Supported")
        return 350_500  # milliwatts

    def nvmlDeviceGetTemperature(self, h: tuple, sensor: int) -> int:
        return 61


@pytest.mark.parametrize("visible, labels", [
    (None, ["0", "1", "2"]),                       # unset: every GPU
    ("2,0", ["2", "0"]),                           # CUDA's order, not NVML's
    ("0, 1", ["0", "1"]),
    ("0,7,1", ["0"]),                              # an invalid entry hides it and what follows
    ("0,0", ["0"]),
    ("", []), ("-1", []), ("NoDevFiles", []),
    ("GPU-bbbb", ["1"]),                           # a unique UUID prefix
    ("GPU-aaaa", []),                              # ambiguous: two GPUs start so
    ("GPU-aaaa3333,GPU-aaaa1111", ["2", "0"]),
    ("MIG-dddd2222", ["1/mig2"]),
    ("MIG-GPU-bbbb2222/1/0,2", ["1/mig0", "2"]),   # the older MIG form: parent UUID / GPU instance / compute
    ("MIG-eeee", []),
])
def test_visible_devices_map_to_nvml(visible, labels) -> None:
    assert [g.label for g in visible_gpus(FakeNVML(), visible)] == labels


@pytest.fixture()
def registry():
    metrics.configure("prometheus")
    yield lambda: parse_exposition(generate_latest(metrics.registry()).decode())
    metrics.configure("auto")


def test_sampler_reads_its_gpus_into_gauges(registry) -> None:
    nvml = FakeNVML()
    sampler = GpuSampler("sketch_pool", interval_s=0.05, env={"CUDA_VISIBLE_DEVICES": "2,MIG-cccc0000"}, nvml=nvml)
    assert sampler.start()
    try:
        readings = sampler.sample()
        assert readings["2"] == {
            "srserve_gpu_utilization_percent": 30.0, "srserve_gpu_memory_used_bytes": 3 * 2**30,
            "srserve_gpu_memory_total_bytes": 80 * 2**30, "srserve_gpu_power_watts": 350.5,
            "srserve_gpu_temperature_celsius": 61.0}
        assert set(readings["1/mig0"]) == {"srserve_gpu_memory_used_bytes", "srserve_gpu_memory_total_bytes",
                                           "srserve_gpu_temperature_celsius"}  # MIG: no utilisation, no power
    finally:
        sampler.stop()
    assert nvml.shutdowns == 1
    samples = {(s.name, s.labels.get("gpu")): s for s in registry()}
    assert samples[("ray_srserve_gpu_sampler_up", None)].value == 1
    assert samples[("ray_srserve_gpu_power_watts", "2")].labels["pool"] == "sketch_pool"
    assert ("ray_srserve_gpu_utilization_percent", "1/mig0") not in samples
    assert ("ray_srserve_gpu_utilization_percent", "0") not in samples  # not given to this replica


@pytest.mark.parametrize("nvml, env", [(None, None), (FakeNVML(fail_init=True), None),
                                       (FakeNVML(), {"CUDA_VISIBLE_DEVICES": ""})])
def test_absent_nvml_or_gpu_logs_once_and_reports_sampler_down(registry, caplog, nvml, env) -> None:
    """None: this machine's real pynvml, whose library is missing; then a failing init; then no GPU given."""
    caplog.set_level(logging.INFO, logger="srserve.gpu")
    sampler = GpuSampler("render_pool", env=env if env is not None else {}, nvml=nvml)
    if nvml is None:
        pytest.importorskip("pynvml")
        try:
            import pynvml

            pynvml.nvmlInit()
            pynvml.nvmlShutdown()
            pytest.skip("NVML works here: the absent path is exercised with fakes only")
        except pynvml.NVMLError:
            pass
    assert sampler.start() is False
    assert sampler._thread is None
    assert [r.name for r in caplog.records] == ["srserve.gpu"]
    assert "GPU sampler off (pool render_pool)" in caplog.records[0].getMessage()
    srserve = [s for s in registry() if s.name.startswith("ray_srserve_")]
    assert [(s.name, s.labels["pool"], s.value) for s in srserve] == [("ray_srserve_gpu_sampler_up", "render_pool", 0)]


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval"):
        GpuSampler("p", interval_s=0)
