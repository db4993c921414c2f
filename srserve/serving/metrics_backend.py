"""Where srserve's metrics go: Ray's metrics API inside Ray, prometheus-client outside, or nowhere.

`metrics.py` says *what* is measured; this module only turns a `MetricDef` into a recorder, once per process.
prometheus-client is used here because Ray's metrics API records nothing outside a Ray worker: unit tests and
in-process `srserve generate` (served by `prom.serve_metrics`) still get the very series the dashboards query.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

logger = logging.getLogger("srserve.metrics")

NAMESPACE = "ray"  # Ray's metrics agent prefixes every series with it; the prometheus backend does the same
Kind = Literal["counter", "gauge", "histogram"]
Recorder = Callable[[float, dict[str, str]], None]


@dataclass(frozen=True)
class MetricDef:
    name: str  # as given to Ray: srserve_...
    kind: Kind
    description: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    def series(self) -> tuple[str, ...]:
        """The names Prometheus stores, as dashboards query them."""
        base = f"{NAMESPACE}_{self.name}"
        if self.kind == "counter":
            return (f"{base}_total",)
        if self.kind == "histogram":
            return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
        return (base,)


class _Backend:
    name = "none"

    def make(self, d: MetricDef) -> Recorder:
        return _noop


class _RayBackend(_Backend):
    """Ray's metrics API. Ray 2.60's metrics agent drops a gauge's series once its process has not set it for two
    report intervals (`metrics_report_interval_ms`, 10 s by default), so a gauge that stays put (no jobs in flight,
    a sampler that is off) would vanish from Prometheus: a daemon thread sets every gauge's last values again each
    half interval (a few `Gauge.set` calls, off the hot path)."""

    name = "ray"

    def __init__(self) -> None:
        self._gauges: list[tuple[Any, dict[tuple, tuple[float, dict[str, str]]]]] = []
        self._gauge_lock = threading.Lock()
        self._refresher: threading.Thread | None = None

    def make(self, d: MetricDef) -> Recorder:
        from ray.serve import metrics as serve_metrics  # adds deployment/replica/application inside a replica

        if d.kind == "histogram":
            return serve_metrics.Histogram(d.name, d.description, list(d.buckets), tag_keys=d.labels).observe
        if d.kind == "counter":
            return serve_metrics.Counter(d.name, d.description, tag_keys=d.labels).inc
        gauge, last = serve_metrics.Gauge(d.name, d.description, tag_keys=d.labels), {}
        with self._gauge_lock:
            self._gauges.append((gauge, last))

        def set_gauge(value: float, tags: dict[str, str]) -> None:
            gauge.set(value, tags)
            with self._gauge_lock:
                last[tuple(tags.items())] = (value, tags)
            if self._refresher is None:
                self._start_refresher()

        return set_gauge

    def _start_refresher(self) -> None:
        with self._gauge_lock:
            if self._refresher is not None:
                return
            self._refresher = threading.Thread(target=self._refresh, name="srserve-gauge-refresh", daemon=True)
        self._refresher.start()

    def _refresh(self) -> None:
        try:
            import ray

            period = max(ray._config.metrics_report_interval_ms(), 1000) / 2000.0
        except Exception:  # noqa: BLE001  (an older or a stubbed Ray: the default interval)
            period = 5.0
        while True:
            time.sleep(period)
            with self._gauge_lock:
                values = [(gauge, list(last.values())) for gauge, last in self._gauges]
            for gauge, entries in values:
                for value, tags in entries:
                    try:
                        gauge.set(value, tags)
                    except Exception:  # noqa: BLE001  (metrics are advisory)
                        pass


class _PromBackend(_Backend):
    name = "prometheus"

    def __init__(self, application: str) -> None:
        from prometheus_client import CollectorRegistry

        # A private registry: reconfiguring (tests) never collides with names already registered.
        self.registry, self.application = CollectorRegistry(), application

    def make(self, d: MetricDef) -> Recorder:
        import prometheus_client as pc

        name, labels = f"{NAMESPACE}_{d.name}", ("application",) + d.labels
        if d.kind == "histogram":
            metric: Any = pc.Histogram(name, d.description, labels, buckets=d.buckets, registry=self.registry)
        else:
            cls = pc.Counter if d.kind == "counter" else pc.Gauge
            metric = cls(name, d.description, labels, registry=self.registry)
        method, app = {"counter": "inc", "gauge": "set", "histogram": "observe"}[d.kind], self.application
        return lambda value, tags: getattr(metric.labels(application=app, **tags), method)(value)


def _noop(value: float, tags: dict[str, str]) -> None:
    return None


_lock = threading.Lock()
_backend: _Backend | None = None
_recorders: dict[str, Recorder] = {}


def configure(backend: Literal["auto", "ray", "prometheus", "none"] = "auto", application: str = "srserve"
              ) -> None:
    """Pick this process's backend (tests, `srserve generate`); "auto" decides again at the next record.
    `application` is the label value the prometheus backend adds (Serve adds its own inside replicas)."""
    global _backend
    makers: dict[str, Callable[[], _Backend | None]] = {
        "auto": lambda: None, "ray": _RayBackend, "none": _Backend,
        "prometheus": lambda: _PromBackend(application)}
    if backend not in makers:
        raise ValueError(f"metrics backend {backend!r}: expected one of {', '.join(makers)}")
    with _lock:
        _recorders.clear()
        _backend = makers[backend]()


def _current() -> _Backend:
    global _backend
    if _backend is None:
        ray = sys.modules.get("ray")  # never import Ray just to find out
        _backend = _RayBackend() if ray is not None and ray.is_initialized() else _PromBackend("srserve")
    return _backend


def backend_name() -> str:
    """"ray", "prometheus" or "none" (deciding now if `configure` left it to "auto")."""
    with _lock:
        return _current().name


def registry() -> Any:
    """This process's prometheus-client registry (None unless the prometheus backend is in use)."""
    with _lock:
        return getattr(_current(), "registry", None)


def record_metric(d: MetricDef, value: float, tags: Mapping[str, str]) -> None:
    """Record one value; a failing backend never fails the caller: the metric is disabled, with one warning."""
    recorder = _recorders.get(d.name)
    if recorder is None:
        with _lock:
            recorder = _recorders.get(d.name)
            if recorder is None:
                try:
                    recorder = _current().make(d)
                except Exception as err:
                    logger.warning("metric %s disabled: %s: %s", d.name, type(err).__name__, err)
                    recorder = _noop
                _recorders[d.name] = recorder
    try:
        recorder(float(value), dict(tags))
    except Exception as err:  # metrics are advisory
        logger.warning("metric %s disabled: %s: %s", d.name, type(err).__name__, err)
        _recorders[d.name] = _noop
