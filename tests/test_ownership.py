"""Ownership and hygiene: a video belongs to the key that created it; records show owners no paths and short
errors; deleted prompts are erased; expired and deleted records are swept. Store-level, plus one served app."""
from __future__ import annotations

import json
import sqlite3
import time

import pytest

from srserve.serving.serve_env import local_cluster_options

from srserve.api.auth import ANONYMOUS, Caller
from srserve.serving.job_record import public_record, reason, short_message
from srserve.serving.jobs import SQLiteJobStore

REQUEST = {"generation": {"prompt": "a secret prompt", "negative_prompt": "blurry"}, "fps": 8, "seconds": "1",
           "size": "32x32"}


def new_job(store, job_id, tenant, **kw):
    now = time.time()
    return store.create({"id": job_id, "created_at": now, "model": "m", "request": REQUEST, "owner": "ingress-a",
                         "lease_until": now + 30, "tenant": tenant, **kw})


@pytest.fixture
def store(tmp_path):
    store = SQLiteJobStore(str(tmp_path / "jobs.sqlite"))
    for i in range(6):
        new_job(store, f"v{i}", "alice" if i % 2 == 0 else "bob")
    return store


def test_list_is_filtered_by_tenant_in_sql_and_pagination_does_not_leak(store):
    ids = lambda page: [j["id"] for j in page[0]]
    assert ids(store.list(tenant="alice")) == ["v4", "v2", "v0"]
    assert ids(store.list(tenant="bob", order="asc")) == ["v1", "v3", "v5"]
    assert ids(store.list()) == ["v5", "v4", "v3", "v2", "v1", "v0"]  # an admin
    assert ids(store.list(tenant="alice", after="v4", limit=1)) == ["v2"] and store.list(tenant="alice",
                                                                                      after="v4", limit=1)[1]
    # bob's id as alice's cursor is an unknown id: her first page, nothing of where bob's job sits
    assert store.list(tenant="alice", after="v3") == store.list(tenant="alice")
    assert store.list(tenant="alice", after="nope") == store.list(tenant="alice")
    assert store.list(tenant="carol") == ([], False)
    plan = " ".join(str(r) for r in store._db.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE deleted = 0 AND tenant = ? ORDER BY seq DESC", ("alice",)))
    assert "jobs_tenant" in plan


def test_delete_only_by_its_owner_or_an_admin_and_the_prompt_is_erased(store):
    assert store.delete("v0", tenant="bob") is None  # another key: as if there were no such job
    assert store.get("v0")["request"]["generation"]["prompt"] == "a secret prompt"
    assert store.delete("v0", tenant="alice")["status"] == "queued"
    assert store.delete("v0", tenant="alice") is None  # already deleted
    erased = store.get("v0", include_deleted=True)
    assert erased["request"]["generation"]["prompt"] == "" and erased["request"]["generation"]["negative_prompt"] == ""
    raw = store._db.execute("SELECT data FROM jobs WHERE id = 'v0'").fetchone()[0]
    assert "secret" not in raw and "blurry" not in raw  # gone from the stored row, not only from the view
    assert store.delete("v1")["tenant"] == "bob"  # an admin deletes any


def test_old_records_belong_to_anonymous(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, data TEXT NOT NULL,"
               " status TEXT NOT NULL)")
    record = {"id": "old", "created_at": 1.0, "model": "m", "request": REQUEST, "status": "completed"}
    db.execute("INSERT INTO jobs (id, data, status) VALUES (?, ?, ?)", ("old", json.dumps(record), "completed"))
    db.commit()
    db.close()
    store = SQLiteJobStore(str(path))
    job = store.get("old")
    assert job["tenant"] == "anonymous" and job["cost"] == 0 and job["expires_at"] is None
    assert [j["id"] for j in store.list(tenant="anonymous")[0]] == ["old"] and store.list(tenant="alice")[0] == []


def test_ingress_visibility_rule():
    from srserve.serving.ingress import visible

    job = {"id": "v", "tenant": "alice"}
    assert visible(job, Caller("alice")) and not visible(job, Caller("bob"))
    assert visible(job, Caller("ops", admin=True)) and not visible(None, Caller("ops", admin=True))
    assert visible({"id": "old"}, ANONYMOUS) and not visible({"id": "old"}, Caller("alice"))


def test_the_owner_sees_no_paths_no_leases_and_short_errors(store):
    store.begin_attempt("v0", "ingress-a", 30.0)
    store.stage_started("v0", 1, "sketch", "abc123")
    trace = ("RayTaskError(RuntimeError): ray::ServeReplica:app:Sketch.handle_request() (pid=4242, ip=10.1.2.3)\n"
             '  File "/work/main/srserve/serving/stages.py", line 200, in __call__\n' + "x" * 5000)
    assert store.fail("v0", 1, "generation_failed", trace)
    job = store.get("v0")
    assert len(job["error"]["message"]) <= 200 and "stages.py" not in job["error"]["message"]
    assert "10.1.2.3" not in job["error"]["message"]
    new_job(store, "done", "alice")
    store.begin_attempt("done", "ingress-a", 30.0)
    store.complete("done", 1, {"artifacts": {"video.mp4": "/srv/data/artifacts/done/video.mp4",
                                             "thumbnail.webp": "s3://bucket/done/thumbnail.webp"}})
    shown = public_record(store.get("done"))
    assert shown["artifacts"] == ["thumbnail.webp", "video.mp4"]
    assert "owner" not in shown and "lease_until" not in shown and "/srv/" not in json.dumps(shown)
    assert shown["tenant"] == "alice" and shown["request"]["generation"]["prompt"] == "a secret prompt"


def test_reason_codes_classify_failures_in_one_place():
    assert reason("generation_failed", "OutOfMemoryError: CUDA out of memory")["code"] == "out_of_memory"
    assert reason("generation_failed", "ActorDiedError: The actor died unexpectedly")["code"] == "replica_lost"
    assert reason("generation_failed", "ValueError: bad shape")["code"] == "generation_failed"
    assert reason("timeout", "job ran longer than 1800s") == {"code": "timeout", "message": "job ran longer than 1800s"}
    assert short_message("FileNotFoundError: /var/lib/srserve/a/b.mp4 missing") == "FileNotFoundError: b.mp4 missing"
    assert short_message("x" * 300).endswith("...") and len(short_message("x" * 300)) == 200


def test_retried_failures_keep_short_histories(store):
    for attempt in (1, 2, 3):
        store.begin_attempt("v2", "a", 30.0)
        store.retry_or_fail("v2", attempt, "RayActorError: died\n" + "Traceback line\n" * 50, 2)
    job = store.get("v2")
    assert job["status"] == "failed" and job["error"]["code"] == "retries_exhausted"
    assert all("Traceback" not in h and len(h) <= 200 for h in job["history"]) and "died" in job["history"][0]
    assert len(job["error"]["message"]) <= 200


def test_expired_and_deleted_records_are_listed_then_purged(tmp_path):
    store = SQLiteJobStore(str(tmp_path / "jobs.sqlite"))
    now = time.time()
    new_job(store, "fresh", "alice", expires_at=now + 3600)
    new_job(store, "stale", "alice", expires_at=now - 1)
    new_job(store, "running", "alice", expires_at=now - 1)
    for job_id in ("fresh", "stale"):
        store.begin_attempt(job_id, "a", 30.0)
        store.complete(job_id, 1, {"artifacts": {}})
    store.begin_attempt("running", "a", 30.0)  # not finished: the watchdog ends it first
    new_job(store, "gone", "bob", expires_at=now + 3600)
    store.delete("gone")
    store.mark_cancelled("gone")
    assert store.expired(now) == ["stale"]  # deleted just now: still counts for bob's per-minute quota
    assert sorted(store.expired(now + 61)) == ["gone", "stale"]
    assert store.purge(["stale", "gone", "running"]) == 2  # never an unfinished job
    assert store.get("stale", include_deleted=True) is None and store.get("running") is not None
    assert store.expired(now + 61) == [] and store.purge([]) == 0


# --- one served app, two keys --------------------------------------------------------------------------------
@pytest.mark.slow
def test_other_keys_see_nothing_and_admins_see_all(tmp_path):
    openai = pytest.importorskip("openai")
    import httpx
    import ray
    from ray import serve
    from test_serving_e2e import free_port, wait_for  # tests/ is on sys.path (rootdir-relative imports)

    from srserve.serving import build_app

    keys = tmp_path / "keys.txt"
    keys.write_text("alice:sk-alice-0123456789\nbob:sk-bob-0123456789 max_per_minute=2\n"
                    "ops:sk-ops-0123456789 admin\n")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, resources={"sketch_pool": 1, "render_pool": 1}, include_dashboard=False,
                 log_to_driver=False, **local_cluster_options())
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {"job_store_path": str(tmp_path / "jobs.sqlite"), "artifacts_url": str(tmp_path / "artifacts"),
                "auth": {"api_keys_file": str(keys)}, "job_ttl_s": 3600, "limits": {"max_width": 64,
                "max_height": 64, "max_frames": 33}, "save_frames_npy": True,
                "admission": {"max_request_cost_s": 5.0}}
        serve.run(build_app(args), name="ownership", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        client = {name: openai.OpenAI(base_url=f"{url}/v1", api_key=f"sk-{name}-0123456789", max_retries=0,
                                      timeout=60) for name in ("alice", "bob", "ops")}
        http = {name: httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer sk-{name}-0123456789"})
                for name in ("alice", "bob", "ops")}
        created = client["alice"].videos.create(prompt="alice's secret", size="32x32",
                                                extra_body={"num_frames": 9, "num_inference_steps": 4, "seed": 1})
        video_id = created.id
        assert created.expires_at is not None and created.expires_at - created.created_at in (3599, 3600, 3601)
        job = wait_for(lambda: (j := http["alice"].get(f"/v1/jobs/{video_id}").json())["status"] == "completed"
                       and j, 180, what="alice's job")
        assert job["tenant"] == "alice" and job["artifacts"] == ["frames.npy", "spritesheet.jpg", "thumbnail.webp",
                                                                 "video.mp4"]
        assert str(tmp_path) not in json.dumps(job) and "owner" not in job
        bob = client["bob"]
        for attempt in (lambda: bob.videos.retrieve(video_id), lambda: bob.videos.download_content(video_id),
                        lambda: bob.videos.delete(video_id)):
            with pytest.raises(openai.NotFoundError):
                attempt()
        assert http["bob"].get(f"/v1/jobs/{video_id}").status_code == 404
        assert http["bob"].get(f"/v1/videos/{video_id}/content", params={"variant": "npy"}).status_code == 404
        assert [v.id for v in bob.videos.list()] == []
        assert http["bob"].get("/v1/videos", params={"after": video_id}).json()["data"] == []
        assert http["alice"].get("/v1/videos").status_code == 200 and httpx.get(f"{url}/v1/videos").status_code == 401
        # bob's quota, the cost ceiling and a deadline that cannot be met, through the served API
        small = {"prompt": "p", "size": "32x32", "num_frames": 9, "num_inference_steps": 2}
        assert [http["bob"].post("/v1/videos", json=small).status_code for _ in range(2)] == [200, 200]
        r = http["bob"].post("/v1/videos", json=small)
        assert r.status_code == 429 and r.json()["error"]["code"] == "quota_per_minute"
        assert "max_per_minute=2" in r.json()["error"]["message"] and 1 <= int(r.headers["retry-after"]) <= 60
        r = http["alice"].post("/v1/videos", json={**small, "size": "64x64", "num_frames": 33,
                                                   "num_inference_steps": 100, "switch": "none"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "num_inference_steps"
        assert r.json()["error"]["code"] == "cost_too_high" and "max_request_cost_s=5" in r.json()["error"]["message"]
        r = http["alice"].post("/v1/videos", json={**small, "deadline_s": 0.001})
        assert r.status_code == 422 and r.json()["error"]["param"] == "deadline_s"
        # the admin sees everyone's
        assert video_id in [v.id for v in client["ops"].videos.list()]
        assert client["ops"].videos.retrieve(video_id).status == "completed"
        assert client["ops"].videos.download_content(video_id).content[4:8] == b"ftyp"
        # alice's delete works, erases the prompt, and the sweep purges the record and its files
        assert client["alice"].videos.delete(video_id).deleted
        erased = http["alice"].get(f"/v1/jobs/{video_id}").json()
        assert erased["request"]["generation"]["prompt"] == "" and erased["deleted"]
        with pytest.raises(openai.NotFoundError):
            client["alice"].videos.retrieve(video_id)
        db = sqlite3.connect(tmp_path / "jobs.sqlite")
        db.execute("UPDATE jobs SET created_at = created_at - 120 WHERE id = ?", (video_id,))  # out of the window
        db.commit()
        db.close()
        ingress = serve.get_deployment_handle("Ingress", "ownership")
        assert ingress.sweep.remote().result() == 1
        assert http["ops"].get(f"/v1/jobs/{video_id}").status_code == 404
        assert not (tmp_path / "artifacts" / video_id).exists()
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
