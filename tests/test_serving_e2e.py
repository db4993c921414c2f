"""The served app on a real local Ray cluster with simulated pools, driven over HTTP by the official openai client.

One cluster and one app for the module; tests run in file order (the replica kills come last).
"""
from __future__ import annotations

import io
import re
import socket
import time

import httpx
import numpy as np
import pytest

from srserve.serving.serve_env import local_cluster_options

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

APP = "srserve-e2e"
PROMPT = "a red circle moving right"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 120.0, every: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Served:
    def __init__(self, url: str, tmp) -> None:
        self.url, self.tmp = url, tmp
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="anything", max_retries=0, timeout=60)
        self.http = httpx.Client(base_url=url, timeout=60)

    def create(self, **extra) -> str:
        """A job at a small fixed shape, so test times do not depend on the bundled model's default size."""
        prompt, size = extra.pop("prompt", PROMPT), extra.pop("size", "32x32")
        extra.setdefault("num_frames", 9)
        return self.client.videos.create(prompt=prompt, size=size, extra_body=extra).id

    def job(self, video_id: str) -> dict:
        return self.http.get(f"/v1/jobs/{video_id}").json()

    def finished(self, video_id: str, timeout: float = 180.0) -> dict:
        return wait_for(lambda: (j := self.job(video_id))["status"] in ("completed", "failed", "cancelled") and j,
                        timeout, what=f"job {video_id} to finish")

    def frames(self, video_id: str) -> np.ndarray:
        data = self.client.videos.download_content(video_id, variant="npy").content
        return np.load(io.BytesIO(data))


def handle(deployment: str):
    from ray import serve

    return serve.get_deployment_handle(deployment, APP)


def kill_replicas(deployment: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    for name in names:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return names


def wait_replaced(deployment: str, old: list[str]) -> None:
    import ray
    from ray import serve

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"

    def replaced() -> bool:
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}
        status = serve.status().applications[APP].deployments[deployment].status
        return bool(names - set(old)) and str(getattr(status, "value", status)) == "HEALTHY"

    wait_for(replaced, 180, 0.5, f"a new {deployment} replica")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import ray
    from ray import serve

    from srserve.serving import build_app

    tmp = tmp_path_factory.mktemp("serving")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, resources={"sketch_pool": 1, "render_pool": 1}, include_dashboard=False,
                 log_to_driver=False, **local_cluster_options())
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "job_store_path": str(tmp / "jobs.sqlite"), "artifacts_url": str(tmp / "artifacts"),
        "save_frames_npy": True, "api_docs": True,
        "sketch": {"max_batch_size": 2, "graceful_shutdown_timeout_s": 10, "progress_interval_s": 0.2},
        "render": {"max_batch_size": 2, "graceful_shutdown_timeout_s": 10, "progress_interval_s": 0.2},
        "encode": {"graceful_shutdown_timeout_s": 10}, "decode": {"graceful_shutdown_timeout_s": 10},
        "limits": {"max_steps": 400, "max_width": 64, "max_height": 64, "max_frames": 33, "max_prompt_chars": 200},
        "max_pending_jobs": 5, "retry_after_s": 3, "max_retries": 2,
        "watchdog": {"interval_s": 0.5, "lease_s": 3.0, "stage_timeout_s": 120.0, "cancel_grace_s": 2.0},
    }
    try:
        serve.run(build_app(args), name=APP, route_prefix="/")
        yield Served(f"http://127.0.0.1:{port}", tmp)
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


@pytest.fixture(scope="module")
def engine():
    from srserve.pipeline.engine import SREngine
    from srserve.pipeline.spec import resolve_model_spec
    from srserve.tiny import default_model_path

    return SREngine.load(resolve_model_spec(default_model_path()))


def in_process(engine, job: dict) -> np.ndarray:
    from srserve.config import GenerationRequest

    return engine.generate(GenerationRequest.model_validate(job["request"]["generation"])).frames


def overlap(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_openai_client_create_poll_download(served):
    import imageio.v3 as iio

    video = served.client.videos.create(prompt=PROMPT, extra_body={"seed": 3, "num_inference_steps": 240})  # long enough for several 0.2 s heartbeats
    assert video.status == "queued" and video.object == "video" and video.model
    progress = []
    while (video := served.client.videos.retrieve(video.id)).status in ("queued", "in_progress"):
        progress.append(video.progress)
        time.sleep(0.05)
    assert video.status == "completed" and video.progress == 100 and video.completed_at >= video.created_at
    assert progress == sorted(progress), progress  # rising with denoising steps
    assert len({p for p in progress if 5 < p < 95}) >= 3, progress
    width, height = map(int, video.size.split("x"))
    frames = iio.imread(io.BytesIO(served.client.videos.download_content(video.id).content), extension=".mp4")
    assert frames.shape[1:] == (height, width, 3) and frames.shape[0] == served.job(video.id)["request"][
        "generation"]["num_frames"]
    thumb = served.client.videos.download_content(video.id, variant="thumbnail").content
    assert thumb[:4] == b"RIFF" and thumb[8:12] == b"WEBP"
    assert video.id in [v.id for v in served.client.videos.list(limit=100)]
    assert served.http.get("/readyz").status_code == 200 and served.http.get("/healthz").status_code == 200
    assert "/v1/videos" in served.http.get("/openapi.json").json()["paths"]


def test_served_result_equals_in_process_engine_bit_for_bit(served, engine):
    job = served.finished(served.create(seed=4, num_inference_steps=12, switch="adaptive"))
    assert job["status"] == "completed" and job["switch_step"] is not None
    assert np.array_equal(served.frames(job["id"]), in_process(engine, job))
    # Each stage that received a state records the handoff: bytes moved and seconds on both sides.
    for stage in ("sketch", "render", "decode"):
        handoff = job["stages"][stage]["handoff"]
        assert handoff["bytes"] > 1000 and handoff["serialize_s"] > 0 and handoff["deserialize_s"] > 0
        assert 0 <= handoff["transit_s"] < job["completed_at"] - job["created_at"]
    assert job["stages"]["encode"]["handoff"] is None  # the ingress sends no state
    # Each hop carries what its receiver reads: the embeddings come by reference to both denoising stages
    # (put into the object store once, by Encode), Decode gets the latents and the family's state only.
    hops = {stage: job["stages"][stage]["handoff"] for stage in ("sketch", "render", "decode")}
    assert hops["sketch"]["embeddings_bytes"] == hops["render"]["embeddings_bytes"] > 0
    assert "embeddings_bytes" not in hops["decode"]
    assert hops["decode"]["bytes"] < hops["render"]["bytes"] < hops["render"]["embeddings_bytes"]


def test_a_stage_with_no_steps_is_skipped(served, engine):
    large = served.finished(served.create(seed=14, num_inference_steps=6, switch="none"))
    small = served.finished(served.create(seed=15, num_inference_steps=6, switch="small-only"))
    assert set(large["stages"]) == {"encode", "sketch", "decode"} and large["switch_step"] == 6
    assert set(small["stages"]) == {"encode", "render", "decode"} and small["switch_step"] == 0
    for job in (large, small):
        assert job["status"] == "completed" and job["progress"] == 100
        assert np.array_equal(served.frames(job["id"]), in_process(engine, job))


def side_app(served, name: str, args: dict):
    """A second app on the same cluster, at /NAME, with its own job store and artifacts."""
    from ray import serve

    from srserve.serving import build_app

    tmp = served.tmp
    args = {**args, "job_store_path": str(tmp / f"{name}-jobs.sqlite"),
            "artifacts_url": str(tmp / f"{name}-artifacts"),
            "save_frames_npy": True, "limits": {"max_width": 64, "max_height": 64, "max_frames": 33}}
    serve.run(build_app(args), name=f"{APP}-{name}", route_prefix=f"/{name}")
    try:
        yield Served(f"{served.url}/{name}", tmp)
    finally:
        serve.delete(f"{APP}-{name}")


@pytest.fixture(scope="module")
def colocated(served):
    """Colocated mode: each replica holds every role."""
    yield from side_app(served, "colocated", {"mode": "colocated", "colocated": {"pool": None, "max_batch_size": 2}})


def test_colocated_mode_runs_the_whole_request_in_one_replica(colocated, engine):
    job = colocated.finished(colocated.create(seed=13, num_inference_steps=12, switch="adaptive"))
    assert job["status"] == "completed" and job["progress"] == 100 and job["switch_step"] is not None
    assert set(job["stages"]) == {"encode", "sketch", "render", "decode"}
    assert len({s["replica"] for s in job["stages"].values()}) == 1
    assert all(s["handoff"] is None for s in job["stages"].values())  # in memory, no object store
    assert np.array_equal(colocated.frames(job["id"]), in_process(engine, job))


@pytest.fixture(scope="module")
def flexed(served):
    """Disaggregated pools with one flex replica beside them."""
    plain = {"pool": None, "graceful_shutdown_timeout_s": 5}
    yield from side_app(served, "flex", {"sketch": plain, "render": plain, "encode": plain, "decode": plain,
                                         "flex": {"pool": None}})


def test_a_flex_replica_takes_a_whole_job_while_the_pools_take_the_rest(flexed, engine):
    ids = [flexed.create(seed=20 + i, num_inference_steps=8, switch="step:4") for i in range(3)]
    jobs = [flexed.finished(i) for i in ids]
    assert all(j["status"] == "completed" for j in jobs)
    whole = [j for j in jobs if len({s["replica"] for s in j["stages"].values()}) == 1]
    assert len(whole) >= 1 and all(s["handoff"] is None for s in whole[0]["stages"].values())  # in memory
    assert len(whole) < 3  # one flex slot: the jobs created while it was busy went through the pools
    for job in jobs:
        assert np.array_equal(flexed.frames(job["id"]), in_process(engine, job))


def test_batched_requests_share_forward_passes(served, engine):
    """Two same-shape requests denoise in one batch on the same replica; each matches its own in-process run.

    Bit-for-bit holds for a request denoised alone; in a batch, CPU GEMM kernels differ with the batch size
    (max |diff| ~1e-6 in the latents), so batched frames are compared to a tight tolerance.
    """
    ids = [served.create(seed=seed, num_inference_steps=30, switch="step:15") for seed in (11, 12)]
    jobs = [served.finished(i) for i in ids]
    assert all(j["status"] == "completed" for j in jobs), jobs
    a, b = (j["stages"]["sketch"] for j in jobs)
    assert a["replica"] == b["replica"] and overlap(a, b), "the two requests did not share the sketch replica"
    for job in jobs:
        np.testing.assert_allclose(served.frames(job["id"]), in_process(engine, job), rtol=0, atol=1e-4)


def test_ingress_never_deserialises_the_handoff(served):
    assert handle("Ingress").handoff_loads.remote().result() == 0
    for module in ("torch", "diffusers", "srserve.pipeline.engine"):  # it validates requests from the card
        assert not handle("Ingress").has_imported.remote(module).result(), module
    for stage in ("Sketch", "Render", "Decode"):
        assert handle(stage).handoff_loads.remote().result() > 0


def test_render_of_one_overlaps_sketch_of_the_next(served):
    first = served.create(seed=21, num_inference_steps=60, switch="step:30")
    wait_for(lambda: served.job(first)["stage"] == "sketch", what="first job to start sketching")
    second = served.create(seed=22, num_inference_steps=60, switch="step:30")
    one, two = served.finished(first), served.finished(second)
    assert one["status"] == two["status"] == "completed"
    assert one["stages"]["sketch"]["replica"] != one["stages"]["render"]["replica"]
    assert overlap(one["stages"]["render"], two["stages"]["sketch"]), (one["stages"], two["stages"])


def test_delete_cancels_at_a_step_boundary_and_frees_the_replica(served):
    long = served.create(seed=5, num_inference_steps=400, switch="none")
    wait_for(lambda: (j := served.job(long))["stage"] == "sketch" and j["step"] >= 2, what="sketching")
    step_before = served.job(long)["step"]
    deleted_at = time.time()
    deleted = served.client.videos.delete(long)
    assert deleted.deleted and deleted.id == long and deleted.object == "video.deleted"
    with pytest.raises(openai.NotFoundError):
        served.client.videos.retrieve(long)
    record = wait_for(lambda: (j := served.job(long))["status"] == "cancelled" and j, 60, what="cancellation")
    assert record["stages"]["sketch"]["end"] is None and record["error"]["code"] == "cancelled"
    stopped_at = int(re.search(r"at step (\d+)", record["error"]["message"]).group(1))
    assert step_before <= stopped_at < 400, record["error"]  # at a step boundary, long before the end
    # within one progress interval (0.2 s here) and a step, plus the store and driver round trips
    assert record["completed_at"] - deleted_at < 2.0, record["completed_at"] - deleted_at
    wait_for(lambda: handle("Sketch").load.remote().result() == 0, 30, what="the sketch replica to be free")
    quick = served.finished(served.create(seed=6, num_inference_steps=4))
    assert quick["status"] == "completed"


def test_refusals(served):
    bad = [({"size": "33x33"}, "size"), ({"num_frames": 10}, "num_frames"), ({"num_inference_steps": 401},
           "num_inference_steps"), ({"switch": "sometimes"}, "switch"), ({"prompt": "x" * 201}, "prompt")]
    for extra, param in bad:
        with pytest.raises(openai.UnprocessableEntityError) as err:
            served.create(**extra)
        assert err.value.body["param"] == param and param in err.value.message
    with pytest.raises(openai.UnprocessableEntityError, match="unknown model"):
        served.client.videos.create(prompt=PROMPT, model="sora-2")
    with pytest.raises(openai.NotFoundError):
        served.client.videos.retrieve("video_nope")
    with pytest.raises(openai.NotFoundError):
        served.client.videos.delete("video_nope")
    slow = [served.create(seed=s, num_inference_steps=400, switch="none") for s in range(5)]
    with pytest.raises(openai.ConflictError):
        served.client.videos.download_content(slow[-1])
    r = served.http.post("/v1/videos", json={"prompt": PROMPT})
    assert r.status_code == 429 and r.headers["retry-after"] == "3" and "max_pending_jobs" in r.text
    for video_id in slow:
        served.client.videos.delete(video_id)
    for video_id in slow:
        wait_for(lambda: served.job(video_id)["status"] == "cancelled", 60, what="cancellations")


def test_a_dead_stage_replica_is_retried(served):
    video_id = served.create(seed=7, num_inference_steps=200, switch="none")
    wait_for(lambda: (j := served.job(video_id))["stage"] == "sketch" and j["step"] >= 2, what="sketching")
    killed = kill_replicas("Sketch")
    assert killed
    job = served.finished(video_id, timeout=300)
    assert job["status"] == "completed" and job["failures"] == 1 and job["attempt"] >= 2, job
    reason = job["history"][0]  # retried by the driver on the error itself, not by the lease lapsing
    assert reason.startswith("attempt 1") and "died" in reason and "was lost" not in reason, reason
    assert job["stages"]["sketch"]["replica"] not in {name.rsplit("#", 1)[-1] for name in killed}


def test_jobs_survive_ingress_and_job_store_restarts(served):
    done = served.finished(served.create(seed=8, num_inference_steps=4))
    running = served.create(seed=9, num_inference_steps=200, switch="none")
    wait_for(lambda: served.job(running)["stage"] == "sketch", what="sketching")
    old = kill_replicas("Ingress")
    wait_replaced("Ingress", old)
    assert served.client.videos.retrieve(done["id"]).status == "completed"
    resumed = served.finished(running, timeout=300)  # the new ingress takes over once the lease lapses
    assert resumed["status"] == "completed" and any("was lost" in h for h in resumed["history"]), resumed
    old = kill_replicas("JobStore")
    wait_replaced("JobStore", old)
    assert served.client.videos.retrieve(done["id"]).status == "completed"
    assert served.client.videos.download_content(done["id"]).content[4:8] == b"ftyp"
