"""`srserve serve [CONFIG] [--host H] [--port P]`: a local Ray cluster with the pools the config needs, the app(s)
on it, the URL printed, and a clean stop on Ctrl-C or SIGTERM.

CONFIG is a Ray Serve config file (the `serve run CONFIG` format: `applications:` with `import_path` and
`args:`); without one, the default `AppArgs` (bundled model) are served. `--address` joins a running cluster
instead, whose nodes must then advertise the pool resources themselves (as KubeRay worker groups do).
"""
from __future__ import annotations

import argparse
import importlib
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Any

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
    return parser.parse_args(argv)


def load_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {"applications": [dict(DEFAULT_APP)]}
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict) or not data.get("applications"):
        raise ValueError(f"{path}: expected a Serve config with an `applications:` list")
    return data


def import_builder(import_path: str) -> Any:
    module, _, attr = import_path.partition(":")
    if not attr:
        module, _, attr = import_path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def pool_resources(config: dict[str, Any]) -> dict[str, float]:
    """Custom resources all srserve apps of the config need at their replica counts, rounded up."""
    from srserve.serving.args import AppArgs

    total: dict[str, float] = {}
    for app in config["applications"]:
        if app.get("import_path", "").startswith("srserve.serving"):
            for name, amount in AppArgs.model_validate(app.get("args") or {}).resources_needed().items():
                total[name] = total.get(name, 0.0) + amount
    return {name: float(math.ceil(amount - 1e-9)) for name, amount in total.items()}


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

    import ray
    from ray import serve

    stop = threading.Event()
    previous: dict[int, Any] = {}
    try:
        if opts.address:
            ray.init(address=opts.address, include_dashboard=False)
        else:
            ray.init(num_cpus=opts.num_cpus, num_gpus=opts.num_gpus, resources=resources, include_dashboard=False)
        # After ray.init, which installs its own SIGTERM handler (it aborts the process).
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        serve.start(http_options={"host": host, "port": port})
        for app in config["applications"]:
            builder = import_builder(app["import_path"])
            target = builder(app.get("args") or {}) if callable(builder) else builder
            prefix = app.get("route_prefix", "/")
            serve.run(target, name=app.get("name", "default"), route_prefix=prefix)
            print(f"srserve: {app.get('name', 'default')} ready at http://{host}:{port}{prefix.rstrip('/')}/v1 "
                  f"(docs: http://{host}:{port}{prefix.rstrip('/')}/docs)", flush=True)
        while not stop.wait(0.5):
            pass
        print("srserve: stopping", flush=True)
        return 0
    except Exception as err:
        print(f"srserve serve: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(serve_main())
