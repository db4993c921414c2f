"""k8s/base/drain_node.py, the preStop hook that drains a Ray node so a video in progress can finish, and the
parts of Ray it relies on."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

K8S = Path(__file__).resolve().parents[1] / "k8s"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_drain_hook_helpers() -> None:
    drain = _load(K8S / "base" / "drain_node.py", "srserve_k8s_drain_node")
    args = drain.parse_args(["--deadline-s", "1860"])
    assert args.deadline_s == 1860 and args.reason == "DRAIN_NODE_REASON_PREEMPTION"
    with pytest.raises(SystemExit):
        drain.parse_args(["--deadline-s", "0"])
    actors = [{"class_name": "ServeReplica:srserve:Sketch"}, {"class_name": "ProxyActor"},
              type("ActorState", (), {"class_name": "ServeReplica:srserve:Render"})()]
    assert drain.replicas_left(actors) == ["ServeReplica:srserve:Render", "ServeReplica:srserve:Sketch"]
    command = drain.drain_command("10.0.0.1:6379", "abc", "DRAIN_NODE_REASON_PREEMPTION", 90)
    assert command[1:4] == ["-m", "ray.scripts.scripts", "drain-node"]
    assert command[-2:] == ["--deadline-remaining-seconds", "90"]


def test_drain_reason_and_cli_exist_in_this_ray() -> None:
    pytest.importorskip("ray")
    from ray.core.generated import autoscaler_pb2
    from ray.scripts.scripts import cli

    assert "DRAIN_NODE_REASON_PREEMPTION" in autoscaler_pb2.DrainNodeReason.keys()
    drain = cli.commands["drain-node"]
    assert {"--node-id", "--address", "--reason", "--reason-message", "--deadline-remaining-seconds"} <= {
        opt for param in drain.params for opt in param.opts}
