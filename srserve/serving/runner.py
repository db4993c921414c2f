"""`srserve serve [CONFIG] [--host H] [--port P]`: a local Ray cluster with the pools the config needs, the app(s)
on it, the URL printed, and a clean stop on Ctrl-C or SIGTERM.

CONFIG is a Ray Serve config file (the `serve run CONFIG` format: `applications:` with `import_path` and
`args:`); without one, the default `AppArgs` (bundled model) are served. `--address` joins a running cluster
instead, whose nodes must then advertise the pool resources themselves (as KubeRay worker groups do).

Metrics: it prints each node's metrics endpoint (Ray's metrics agent: `ray_serve_*` and srserve's
`ray_srserve_*`); `--metrics-port` fixes the local node's, and a local cluster served on a loopback host exports
them on loopback only. `--prometheus` also runs Prometheus (Debian's `prometheus` binary) scraping them, on
`--prometheus-port`, with its data in a temporary directory; the dashboards are in deployments/monitoring/.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import yaml

DEFAULT_APP = {"name": "srserve", "route_prefix": "/", "import_path": "srserve.serving:build_app", "args": {}}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="srserve serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="Serve config YAML (default: the bundled model, local pools)")
    parser.add_argument("--host", default=None, help="bind address (default: the config's, else 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: the config's, else 8000)")
    parser.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    parser.add_argument("--num-cpus", type=float, default=None, help="CPUs of the local cluster")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs of the local cluster")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="Ray's metrics export port on the local cluster (default: a free one, printed)")
    parser.add_argument("--prometheus", action="store_true",
                        help="also run Prometheus, scraping this cluster's metrics (needs the prometheus binary)")
    parser.add_argument("--prometheus-port", type=int, default=9090, help="Prometheus' port (default 9090)")
    return parser.parse_args(argv)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def metrics_endpoints(nodes: list[dict[str, Any]]) -> list[str]:
    """host:port of every live node's metrics agent (from `ray.nodes()`)."""
    return [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in nodes
            if n.get("Alive") and n.get("MetricsExportPort")]


def start_prometheus(targets: list[str], port: int) -> Any:
    """Prometheus on 127.0.0.1:`port` scraping `targets` every 5 s."""
    from srserve.serving.prom import PrometheusServer, scrape_config

    return PrometheusServer(scrape_config(targets, interval_s=5.0), port=port).start()


@contextlib.contextmanager
def loopback_node(enabled: bool) -> Iterator[None]:
    """While Ray starts a local node: make its IP loopback, so that its metrics agent listens on loopback only.
    Ray offers no bind address for it: it binds loopback when the node IP is loopback, else all interfaces, and on
    Linux the node IP is loopback only under RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which Ray reads at import (done
    by now), hence the constant too. Both get their old values back; without that constant, nothing changes."""
    from ray._private import ray_constants

    name = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    env_before, const_before = os.environ.get(name), getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if enabled and const_before is not None:
        os.environ[name] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if enabled and const_before is not None:
            ray_constants.ENABLE_RAY_CLUSTER = const_before
            if env_before is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = env_before


def check_exposure(config: dict[str, Any], host: str) -> str | None:
    """Why serving `config` on `host` must not start (an srserve app without API keys on a non-loopback host,
    unless its args say `open_access: true`), or None."""
    from srserve.serving.args import AppArgs

    if host in LOOPBACK:
        return None
    for app in config["applications"]:
        if app.get("import_path", "").startswith("srserve.serving"):
            args = AppArgs.model_validate(app.get("args") or {})
            if args.auth is None and not args.open_access:
                return (f"application {app.get('name', 'default')!r} would serve {host} without API keys: set "
                        "`auth: {api_keys_file: PATH}` in its args, or `open_access: true` to serve everyone on "
                        "purpose (or bind 127.0.0.1)")
    return None


def check_keys(config: dict[str, Any]) -> str | None:
    """Why an srserve app's keys file cannot serve (unreadable, malformed), or None: said before Ray starts, not
    as a failed replica deep in Serve's logs."""
    from srserve.api.auth import KeyRing
    from srserve.serving.args import AppArgs

    for app in config["applications"]:
        if app.get("import_path", "").startswith("srserve.serving"):
            args = AppArgs.model_validate(app.get("args") or {})
            if args.auth is not None:
                try:
                    KeyRing.load(str(Path(args.auth.api_keys_file).expanduser()))
                except ValueError as err:
                    return f"auth.api_keys_file: {err}"
    return None


POLICY = "srserve.control.autoscale:StageRatioPolicy"


def check_autoscaling(config: dict[str, Any]) -> str | None:
    """Why an srserve app's `autoscaling_policy` cannot work as configured, or None: said before Ray starts (Serve
    would only log a failing policy in its controller, and a stage with Serve's own delays would lag the policy's).
    """
    from srserve.control.autoscale import StageRatioPolicy
    from srserve.serving.args import AppArgs

    for app in config["applications"]:
        policy = app.get("autoscaling_policy")
        if not policy or not app.get("import_path", "").startswith("srserve.serving"):
            continue
        name = app.get("name", "default")
        if policy.get("policy_function") != POLICY:
            continue  # someone else's policy: theirs to check
        try:
            built = StageRatioPolicy(**(policy.get("policy_kwargs") or {}))
        except (TypeError, ValueError) as err:
            return f"application {name!r}: autoscaling_policy.policy_kwargs: {err}"
        args = AppArgs.model_validate(app.get("args") or {})
        stages = {stage: options for stage, options in args.stages().items() if options.autoscaling_config}
        if not stages:
            return f"application {name!r}: autoscaling_policy is set but no stage has an autoscaling_config"
        sized = {stage: deployment for deployment, stage in built.deployments.items()}
        for stage, options in stages.items():
            if stage not in sized:
                return f"application {name!r}: the policy does not size stage {stage!r} (its `deployments`)"
            delays = {k: options.autoscaling_config.get(k) for k in ("upscale_delay_s", "downscale_delay_s")}
            if any(v != 0 for v in delays.values()):
                return (f"application {name!r}: {stage}.autoscaling_config must set upscale_delay_s and "
                        f"downscale_delay_s to 0 under the policy (it has its own delays), got {delays}")
            wanted = options.max_batch_size if stage in ("sketch", "render") else 1
            if built.concurrency.get(stage, 1) != wanted:
                return (f"application {name!r}: autoscaling_policy.policy_kwargs.concurrency.{stage} must be the "
                        f"requests one replica serves at once ({wanted}), got {built.concurrency.get(stage, 1)}")
        unknown = sorted(set(built.concurrency) - set(stages))
        if unknown:
            return f"application {name!r}: policy concurrency names stages that do not autoscale: {unknown}"
    return None


def load_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {"applications": [dict(DEFAULT_APP)]}
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict) or not data.get("applications"):
        raise ValueError(f"{path}: expected a Serve config with an `applications:` list")
    return data


def pool_resources(config: dict[str, Any]) -> dict[str, float]:
    """Custom resources all srserve apps of the config need at their replica counts, rounded up."""
    from srserve.serving.args import AppArgs

    total: dict[str, float] = {}
    for app in config["applications"]:
        if app.get("import_path", "").startswith("srserve.serving"):
            for name, amount in AppArgs.model_validate(app.get("args") or {}).resources_needed().items():
                total[name] = total.get(name, 0.0) + amount
    return {name: float(math.ceil(amount - 1e-9)) for name, amount in total.items()}


def deploy_schema(config: dict[str, Any], host: str, port: int) -> Any:
    """The config as Ray's `ServeDeploySchema`, srserve apps' local paths made absolute here (the controller
    builds the apps in its own process). Deploying the schema, as `serve deploy` does, is what honours an
    application's `autoscaling_policy` (srserve's stage-ratio policy); `serve.run` of a built app cannot carry it."""
    from ray.serve.schema import ServeDeploySchema

    from srserve.serving.args import AppArgs

    apps = []
    for app in config["applications"]:
        entry = {k: v for k, v in app.items() if k != "args"}
        args = app.get("args") or {}
        if app.get("import_path", "").startswith("srserve.serving"):
            args = AppArgs.model_validate(args).resolved().model_dump(mode="json")
        apps.append({"name": "default", **entry, "args": args})
    extra = {k: v for k, v in config.items() if k in ("proxy_location", "logging_config")}
    return ServeDeploySchema.model_validate({**extra, "http_options": {"host": host, "port": port},
                                             "applications": apps})


def deploy(config: dict[str, Any], host: str, port: int, stop: threading.Event, timeout_s: float = 1800.0) -> None:
    """Deploy every application of `config` and wait until all run (RuntimeError naming a failed one)."""
    import time

    from ray import serve
    from ray.serve.context import _get_global_client

    schema = deploy_schema(config, host, port)
    _get_global_client().deploy_apps(schema)
    names, deadline = [app.name for app in schema.applications], time.monotonic() + timeout_s
    while not stop.wait(0.5):
        statuses = serve.status().applications
        states = {name: str(getattr(statuses.get(name), "status", "NOT_STARTED")) for name in names}
        failed = [name for name, state in states.items() if "FAILED" in state]
        if failed:
            message = statuses[failed[0]].message
            raise RuntimeError(f"application {failed[0]!r} failed to deploy: {message}")
        if all(state.endswith("RUNNING") for state in states.values()):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"applications not running after {timeout_s:.0f} s: {states}")


def serve_main(argv: list[str] | None = None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(opts.config)
        resources = pool_resources(config)
    except Exception as err:
        print(f"srserve serve: {err}", file=sys.stderr)
        return 2
    http = config.get("http_options") or {}
    host, port = opts.host or http.get("host", "127.0.0.1"), opts.port or int(http.get("port", 8000))
    refusal = check_exposure(config, host) or check_keys(config) or check_autoscaling(config)
    if refusal:
        print(f"srserve serve: refusing to start: {refusal}", file=sys.stderr)
        return 2

    if opts.prometheus:
        from srserve.serving.prom import MISSING_PROMETHEUS

        if not shutil.which("prometheus"):
            print(f"srserve serve --prometheus: {MISSING_PROMETHEUS}", file=sys.stderr)
            return 2

    # Serve's throughput-optimized mode behind HAProxy (serve_env.py), set before Ray starts, so that the local
    # cluster's workers inherit it (joining a running cluster, only this driver's handles see it).
    from srserve.serving.serve_env import apply_serve_env, local_cluster_options, local_haproxy

    in_force = apply_serve_env()
    private_haproxy_dir = None if opts.address else local_haproxy()  # removed at the end, when made here
    if in_force.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        print("srserve: Serve's HTTP proxy in front (no HAProxy binary, or RAY_SERVE_ENABLE_HA_PROXY set)",
              flush=True)
    import ray
    from ray import serve

    stop = threading.Event()
    previous: dict[int, Any] = {}
    prometheus = None
    try:
        if opts.address:
            ray.init(address=opts.address, include_dashboard=False)
        else:
            loopback = host in LOOPBACK
            with loopback_node(loopback):
                # address="local": a new cluster, never one found through RAY_ADDRESS or a `ray start` here
                ray.init(address="local", num_cpus=opts.num_cpus, num_gpus=opts.num_gpus, resources=resources,
                         include_dashboard=False, _metrics_export_port=opts.metrics_port,
                         **local_cluster_options(loopback=loopback))
        # After ray.init, which installs its own SIGTERM handler (it aborts the process).
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        targets = metrics_endpoints(ray.nodes())
        print("srserve: metrics (Ray's metrics agent: ray_serve_*, ray_srserve_*) at "
              + ", ".join(f"http://{t}/metrics" for t in targets), flush=True)
        if opts.prometheus:
            prometheus = start_prometheus(targets, opts.prometheus_port)
            print(f"srserve: Prometheus at {prometheus.url} (scraping {', '.join(targets)}; "
                  "Grafana dashboards: deployments/monitoring/)", flush=True)
        serve.start(http_options={"host": host, "port": port})
        deploy(config, host, port, stop)
        for app in config["applications"]:
            prefix = app.get("route_prefix", "/")
            docs = (app.get("args") or {}).get("api_docs")
            print(f"srserve: {app.get('name', 'default')} ready at http://{host}:{port}{prefix.rstrip('/')}/v1"
                  + (f" (docs: http://{host}:{port}{prefix.rstrip('/')}/docs)" if docs else ""), flush=True)
        while not stop.wait(0.5):
            pass
        print("srserve: stopping", flush=True)
        return 0
    except Exception as err:
        print(f"srserve serve: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    finally:
        if prometheus is not None:
            prometheus.stop()
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        if private_haproxy_dir:
            shutil.rmtree(private_haproxy_dir, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(serve_main())
