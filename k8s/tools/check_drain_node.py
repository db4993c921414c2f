"""Checks k8s/base/drain_node.py on a local three-node Ray cluster (no Kubernetes), by hand:

    .venv/bin/python k8s/tools/check_drain_node.py

A Serve replica on worker node 1 is busy with a 20 s request when the hook drains node 1. Expected (as Ray 2.60
does): Serve starts a replacement on worker node 2, lets the busy replica finish its request, stops it, and the
hook returns once node 1 has no replica left; the request succeeds and later requests go to node 2. Takes about a
minute; not part of the test suite (it starts a Ray cluster).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import ray
from ray import serve
from ray.cluster_utils import Cluster

HOOK = Path(__file__).resolve().parents[1] / "base" / "drain_node.py"


@serve.deployment(num_replicas=1, graceful_shutdown_timeout_s=40, max_ongoing_requests=2,
                  ray_actor_options={"num_cpus": 0, "resources": {"sketch_pool": 1}})
class Slow:
    def __call__(self, seconds: float) -> str:
        time.sleep(seconds)
        return ray.get_runtime_context().get_node_id()


def main() -> int:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True})
    for _ in range(2):
        cluster.add_node(num_cpus=0, resources={"sketch_pool": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        handle = serve.run(Slow.bind(), name="app", route_prefix=None)
        node = handle.remote(0).result()
        outcome: dict = {}

        def busy() -> None:
            try:
                outcome["node"] = handle.remote(20).result()
            except Exception as err:  # reported below
                outcome["error"] = repr(err)

        thread = threading.Thread(target=busy)
        thread.start()
        time.sleep(2)
        start = time.monotonic()
        hook = subprocess.run([sys.executable, str(HOOK), "--deadline-s", "90", "--poll-s", "2", "--node-id", node],
                              env=dict(os.environ, RAY_ADDRESS=cluster.address), capture_output=True, text=True,
                              timeout=180)
        took = time.monotonic() - start
        thread.join()
        after = handle.remote(0).result()
        print(hook.stderr.strip())
        print(f"hook rc {hook.returncode} after {took:.1f} s; in-flight request: {outcome}; next request on "
              f"{'another node' if after != node else 'the drained node'}")
        ok = (hook.returncode == 0 and outcome.get("node") == node and after != node and took < 80
              and "no Serve replica left" in hook.stderr)
        print("OK" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
