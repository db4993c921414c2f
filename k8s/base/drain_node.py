"""preStop hook of srserve's GPU worker pods: drain this pod's Ray node before Kubernetes stops it.

Without it, Kubernetes' SIGTERM stops `ray start` and with it every replica on the node at once; a video
half-way through its sketch is then lost and retried from scratch by the job watchdog. Draining first tells Ray
the node is going away: nothing new is scheduled here, Serve starts replacement replicas elsewhere and stops the
ones here gracefully, each finishing its in-flight requests within its `graceful_shutdown_timeout_s` (at the
latest when the drain deadline minus that timeout is reached). This script asks for the drain, then waits until
no Serve replica is left on the node or the deadline passes, and exits 0 in every case so the pod always stops.

    python drain_node.py --deadline-s 1860

The deadline must be at least the longest `graceful_shutdown_timeout_s` of the stages on this pod's worker group,
and the pod's terminationGracePeriodSeconds longer than the deadline (tests/test_manifests.py checks both).
Uses `ray drain-node` (a hidden CLI in Ray 2.60: the call the v2 autoscaler makes before removing a node) and
Ray's state API. Standard library and Ray only; it is mounted from a ConfigMap, not part of the srserve package.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from typing import Any, Iterable

REPLICA_PREFIX = "ServeReplica:"  # Serve's replica actors are named ServeReplica:<app>:<deployment>


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Drain this Ray node, then wait for its Serve replicas to leave.")
    parser.add_argument("--deadline-s", type=int, required=True,
                        help="seconds until the node may be killed (>= the longest graceful_shutdown_timeout_s)")
    parser.add_argument("--poll-s", type=float, default=5.0, help="how often to look for replicas left")
    parser.add_argument("--reason", default="DRAIN_NODE_REASON_PREEMPTION",
                        help="Ray drain reason (PREEMPTION is accepted even while replicas run)")
    parser.add_argument("--node-id", default=None, help="the Ray node to drain (default: this pod's own node)")
    args = parser.parse_args(argv)
    if args.deadline_s <= 0:
        parser.error("--deadline-s must be positive")
    return args


def replicas_left(actors: Iterable[Any]) -> list[str]:
    """Class names of the live Serve replicas among `actors` (ActorState objects or dicts)."""
    names = []
    for actor in actors:
        name = actor.get("class_name") if isinstance(actor, dict) else getattr(actor, "class_name", None)
        if isinstance(name, str) and name.startswith(REPLICA_PREFIX):
            names.append(name)
    return sorted(names)


def drain_command(gcs_address: str, node_id: str, reason: str, deadline_s: int) -> list[str]:
    # `python -m ray.scripts.scripts` is the `ray` CLI of this very interpreter, whatever PATH says.
    return [sys.executable, "-m", "ray.scripts.scripts", "drain-node", "--address", gcs_address,
            "--node-id", node_id, "--reason", reason,
            "--reason-message", "Kubernetes is stopping this pod (srserve preStop hook)",
            "--deadline-remaining-seconds", str(deadline_s)]


def log(message: str) -> None:
    print(f"drain_node: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    give_up = time.monotonic() + args.deadline_s
    try:
        import ray
        from ray.util.state import list_actors

        ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
        context = ray.get_runtime_context()
        node_id, gcs_address = args.node_id or context.get_node_id(), context.gcs_address
    except Exception as err:  # no Ray node running here (it crashed or never started): nothing to drain
        log(f"no Ray node to drain ({err})")
        return 0

    result = subprocess.run(drain_command(gcs_address, node_id, args.reason, args.deadline_s),
                            capture_output=True, text=True)
    if result.returncode != 0:
        log(f"drain of node {node_id} not accepted: {(result.stderr or result.stdout).strip()}")
        return 0
    log(f"draining node {node_id}, deadline {args.deadline_s} s")

    while time.monotonic() < give_up:
        try:
            actors = list_actors(filters=[("node_id", "=", node_id), ("state", "=", "ALIVE")], limit=10_000,
                                 raise_on_missing_output=False)
        except Exception as err:  # the state API can be briefly unavailable; keep waiting until the deadline
            log(f"listing actors failed ({err}); retrying")
        else:
            left = replicas_left(actors)
            if not left:
                log("no Serve replica left on this node")
                return 0
            log(f"waiting for {len(left)} replica(s): {', '.join(left)}")
        time.sleep(args.poll_s)
    log("deadline reached with replicas still running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
