"""Recovery on a real local Ray cluster: a job whose render replica is killed resumes from its sketch checkpoint
(no sketch step rerun, the uninterrupted frames bit for bit, no checkpoint left), and with two ingress replicas
killing one leaves the API answering while the other takes its jobs over. One cluster for the module."""
from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from srserve.serving.serve_env import local_cluster_options

pytestmark = pytest.mark.slow

APP = "srserve-recovery"
PROMPT = "a red circle moving right"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, every: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def handle(deployment: str):
    from ray import serve

    return serve.get_deployment_handle(deployment, APP)


def record(video_id: str) -> dict:
    """The whole record, from the store (the API's view hides the driver that owns it)."""
    return handle("JobStore").get.remote(video_id, True).result()


def kill_replica(deployment: str, replica: str | None = None) -> str:
    """ray.kill one replica of `deployment` (that one when `replica` names it); returns its replica id."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    name = next(n for n in names if replica is None or n.endswith(f"#{replica}"))
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return name.rsplit("#", 1)[-1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import ray
    from ray import serve

    from srserve.serving import build_app

    tmp = tmp_path_factory.mktemp("recovery")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, resources={"sketch_pool": 1, "render_pool": 1}, include_dashboard=False,
                 log_to_driver=False, **local_cluster_options())
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    fast = {"graceful_shutdown_timeout_s": 5, "progress_interval_s": 0.2, "health_check_period_s": 1.0}
    args = {
        "job_store_path": str(tmp / "jobs.sqlite"), "artifacts_url": str(tmp / "artifacts"), "save_frames_npy": True,
        "sketch": {**fast, "torch_threads": 1}, "render": {**fast, "torch_threads": 1},
        "encode": {**fast, "torch_threads": 1}, "decode": {**fast, "torch_threads": 1},
        "ingress": {"num_replicas": 2, "health_check_period_s": 1.0},
        "limits": {"max_steps": 400, "max_width": 64, "max_height": 64, "max_frames": 33},
        "max_retries": 2, "retry_after_s": 2,
        "watchdog": {"interval_s": 0.5, "lease_s": 3.0, "stage_timeout_s": 60.0, "cancel_grace_s": 2.0},
    }
    try:
        serve.run(build_app(args), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}", tmp / "artifacts"
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


def create(http: httpx.Client, **extra) -> str:
    body = {"prompt": PROMPT, "size": "32x32", "num_frames": 9, **extra}
    response = http.post("/v1/videos", json=body)
    assert response.status_code == 200, response.text
    return response.json()["id"]


def finished(video_id: str, timeout: float = 90.0) -> dict:
    return wait_for(lambda: (j := record(video_id))["status"] in ("completed", "failed", "cancelled") and j,
                    timeout, 0.2, f"job {video_id} to finish")


def in_render(video_id: str, min_step: int) -> bool:
    job = record(video_id)
    return job["stage"] == "render" and job["step"] >= min_step


def frames(http: httpx.Client, video_id: str) -> np.ndarray:
    return np.load(io.BytesIO(http.get(f"/v1/videos/{video_id}/content", params={"variant": "npy"}).content))


def expected_frames(job: dict) -> np.ndarray:
    from srserve.config import GenerationRequest
    from srserve.pipeline.engine import SREngine
    from srserve.pipeline.spec import resolve_model_spec
    from srserve.tiny import default_model_path

    engine = SREngine.load(resolve_model_spec(default_model_path()))
    return engine.generate(GenerationRequest.model_validate(job["request"]["generation"])).frames


def test_a_killed_render_replica_resumes_from_the_sketch_checkpoint(served):
    url, artifacts = served
    http = httpx.Client(base_url=url, timeout=30)
    video_id = create(http, seed=31, num_inference_steps=400, switch="step:12")
    wait_for(lambda: in_render(video_id, 30), 60, 0.05, "the job to be rendering")
    sketch_loads = handle("Sketch").handoff_loads.remote().result()
    killed = kill_replica("Render")
    job = finished(video_id)
    assert job["status"] == "completed" and job["failures"] == 1 and job["attempt"] == 2, job
    stages = job["stages"]
    # The retried attempt began at Encode (it loaded the checkpoint) and went on at render: no sketch step again.
    assert stages["sketch"]["attempt"] == 1 and stages["render"]["attempt"] == 2 and stages["encode"]["attempt"] == 2
    assert stages["render"]["replica"] != killed and job["checkpoint"] == "render"
    assert handle("Sketch").handoff_loads.remote().result() == sketch_loads
    assert np.array_equal(frames(http, video_id), expected_frames(job))
    assert sorted(p.name for p in (artifacts / video_id).iterdir()) == [
        "frames.npy", "spritesheet.jpg", "thumbnail.webp", "video.mp4"]  # the checkpoints are gone


def test_with_two_ingress_replicas_killing_one_leaves_the_api_answering(served):
    url, _ = served
    http = httpx.Client(base_url=url, timeout=30)
    video_id = create(http, seed=32, num_inference_steps=400, switch="step:12")
    wait_for(lambda: in_render(video_id, 30), 60, 0.05, "the job to be rendering")
    owner = record(video_id)["owner"]
    answers: list[tuple[float, int]] = []  # (time, status; 0 for no answer within 2 s)
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=url, timeout=2.0) as client:
            while not stop.is_set():
                began = time.monotonic()
                try:
                    status = client.get("/v1/videos", params={"limit": 1}).status_code
                except httpx.HTTPError:
                    status = 0
                answers.append((began, status))
                time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    time.sleep(0.5)
    killed_at = time.monotonic()
    kill_replica("Ingress", owner)
    time.sleep(6.0)
    stop.set()
    poller.join(5)
    after = [(t - killed_at, s) for t, s in answers if t >= killed_at]
    failed = [t for t, s in after if s != 200]
    assert after and all(t < 3.0 for t in failed), f"API not answering {failed} s after the kill"
    assert sum(s == 200 for _, s in after) >= 0.8 * len(after), after
    # The surviving replica takes the job over once its lease lapsed, and resumes it after its sketch checkpoint.
    job = finished(video_id)
    assert job["status"] == "completed" and job["owner"] != owner, job
    assert any("was lost" in h for h in job["history"]), job["history"]
    # Resumed (Encode ran again, loading a checkpoint), not restarted: the sketch ran in the first attempt only.
    assert job["stages"]["sketch"]["attempt"] == 1 and job["stages"]["encode"]["attempt"] == job["attempt"] >= 2
    assert not (Path(served[1]) / video_id / "checkpoints").exists()
