"""Shared fixtures: tiny random-weight models saved to temp dirs and loaded through the real loaders."""
from __future__ import annotations

import atexit
import os
import shutil

import pytest

# No test touches the network: diffusers/transformers must never try a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# The Ray Serve mode `srserve serve` runs (throughput-optimized, HAProxy in front), before anything imports Ray
# or starts a cluster: the suite tests the mode that serves.
from srserve.serving.serve_env import apply_serve_env, local_cluster_options, local_haproxy  # noqa: E402

apply_serve_env()
_haproxy_dir = local_haproxy()  # one private directory for every cluster of the session, removed at exit
if _haproxy_dir:
    atexit.register(shutil.rmtree, _haproxy_dir, True)


@pytest.fixture(scope="session")
def wan_unipc_dir(tmp_path_factory):
    from srserve.tiny.random_model import build_random_wan

    return build_random_wan(tmp_path_factory.mktemp("wan-unipc"), seed=0, scheduler="unipc")


@pytest.fixture(scope="session")
def wan_euler_dir(tmp_path_factory):
    from srserve.tiny.random_model import build_random_wan

    return build_random_wan(tmp_path_factory.mktemp("wan-euler"), seed=1, scheduler="euler")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster for object-store tests (no dashboard, two CPUs, the pool resources)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(num_cpus=2, include_dashboard=False, resources={"sketch_pool": 1, "render_pool": 1},
             log_to_driver=False, **local_cluster_options())
    yield ray
    ray.shutdown()


@pytest.fixture()
def one_torch_thread():
    """Tiny models run fastest on one thread; more only contend on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
