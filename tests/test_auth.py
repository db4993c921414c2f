"""API keys: the keys file, constant-time authentication, and the routes' 401s, open health routes and docs switch.
The last test drives a real HTTP server (uvicorn on loopback) with the official openai client and a key."""
from __future__ import annotations

import hmac
import logging
import socket
import threading
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from fakes import MemoryVideoService
from srserve.api import auth as auth_module
from srserve.api.auth import ANONYMOUS, Caller, KeyRing
from srserve.api.protocol import ModelCard, RequestLimits
from srserve.api.routes import create_app

KEYS = """
# a comment, then blank lines

alice:sk-alice-0123456789   priority=batch max_in_flight=4 max_cost_in_flight=12.5
bob : sk-bob-0123456789
ops:sk-ops-0123456789 admin max_per_minute=none
"""
MODEL = ModelCard(name="tiny", fps=8, default_num_frames=9, default_height=32, default_width=32, default_steps=8)
LIMITS = RequestLimits(max_prompt_chars=50, max_width=64, max_height=64, max_frames=33, max_steps=20)


# --- the keys file ----------------------------------------------------------------------------------------------

def test_keys_file_lines_become_callers():
    ring = KeyRing.parse(KEYS)
    assert ring.names == ["alice", "bob", "ops"] and len(ring) == 3
    alice = ring.authenticate("Bearer sk-alice-0123456789")
    assert alice == Caller("alice", admin=False, priority="batch",
                           quota={"max_in_flight": 4, "max_cost_in_flight": 12.5})
    assert ring.authenticate("bearer   sk-bob-0123456789 ") == Caller("bob")  # scheme case, spaces
    ops = ring.authenticate("Bearer sk-ops-0123456789")
    assert ops.admin and ops.priority == "interactive" and ops.quota == {"max_per_minute": None}
    assert ANONYMOUS == Caller("anonymous") and not ANONYMOUS.admin


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic sk-bob-0123456789",
                                    "sk-bob-0123456789", "Bearer sk-bob-012345678", "Bearer sk-bob-0123456789x",
                                    "Bearer sk-alice-0123456789 priority=batch"])
def test_anything_but_a_configured_bearer_key_is_refused(header):
    assert KeyRing.parse(KEYS).authenticate(header) is None


@pytest.mark.parametrize("text, line, words", [
    ("alice", 1, "name:key"),
    ("\n\nal ice:sk-secret-1", 3, "name must be"),
    ("x" * 65 + ":sk-secret-1", 1, "name must be"),
    (":sk-secret-1", 1, "name must be"),
    ("alice:", 1, "key is empty"),
    ("alice:   admin", 1, "key is missing"),
    ("alice: max_in_flight=3", 1, "key is missing"),
    ("alice:sk-secret-1 sk-secret-2", 1, "the 1st flag is not known"),
    ("alice:sk-secret-1 priority=urgent", 1, "interactive or batch"),
    ("alice:sk-secret-1 admin max_in_flight=0", 1, "2nd flag: max_in_flight must be a whole number"),
    ("alice:sk-secret-1 max_per_minute=１０", 1, "max_per_minute must be"),
    ("alice:sk-secret-1 max_cost_in_flight=-1", 1, "max_cost_in_flight must be a number > 0"),
    ("alice:sk-sécret-1", 1, "printable ASCII"),
    ("alice:sk-secret-1\n# note\nalice:sk-secret-2", 3, "'alice' is already on line 1"),
    ("alice:sk-secret-1\nbob:sk-secret-1", 2, "same key as line 1"),
])
def test_malformed_keys_files_name_the_line_never_the_key(text, line, words):
    with pytest.raises(ValueError) as err:
        KeyRing.parse(text)
    message = str(err.value)
    assert f"line {line}:" in message and words in message, message
    assert "secret" not in message, message  # no part of any key


def test_an_empty_keys_file_is_refused_and_load_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="no keys"):
        KeyRing.parse("# nobody\n\n")
    path = tmp_path / "keys"
    path.write_text("bob:sk-bob-0123456789\nbad line\n")
    with pytest.raises(ValueError, match=rf"{path}: keys file line 2"):
        KeyRing.load(str(path))
    with pytest.raises(ValueError, match="cannot read the keys file"):
        KeyRing.load(str(tmp_path / "missing"))
    path.write_text(KEYS)
    assert KeyRing.load(str(path)).names == ["alice", "bob", "ops"]


def test_keys_are_kept_only_as_digests_and_never_shown():
    ring = KeyRing.parse(KEYS)
    shown = repr(ring) + str(ring) + repr(ring.authenticate("Bearer sk-ops-0123456789")) + repr(vars(ring))
    assert "sk-" not in shown and "alice" in repr(ring)


@pytest.mark.parametrize("header", ["Bearer sk-alice-0123456789", "Bearer sk-ops-0123456789", "Bearer wrong",
                                    "Bearer " + "x" * 400])
def test_every_key_is_compared_in_constant_time(monkeypatch, header):
    """compare_digest runs once per configured key whether the first, the last or none matches, on digests of
    one length: the time taken tells neither which key matched nor how much of one."""
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)
    monkeypatch.setattr(auth_module.hmac, "compare_digest", counting)
    ring = KeyRing.parse(KEYS)
    ring.authenticate(header)
    assert len(calls) == len(ring) == 3 and set(calls) == {(32, 32)}


# --- the routes -------------------------------------------------------------------------------------------------

@pytest.fixture
def served():
    service = MemoryVideoService(MODEL, LIMITS)
    heard = []
    app = create_app(service, keys=KeyRing.parse(KEYS), on_refused=lambda status, code: heard.append((status, code)))
    with TestClient(app) as client:
        client.service, client.heard = service, heard
        yield client


def _v1_requests(app) -> list[tuple[str, str]]:
    """(method, path) of every /v1 route the app serves, ids filled in: a new route cannot skip auth unseen."""
    out = []
    for route in app.routes:
        if getattr(route, "path", "").startswith("/v1"):
            out += [(method, route.path.replace("{video_id}", "video_0")) for method in route.methods]
    return out


def test_every_v1_route_refuses_without_a_valid_key_in_the_openai_shape(served):
    routes = _v1_requests(served.app)
    assert {("GET", "/v1/models"), ("POST", "/v1/videos"), ("GET", "/v1/videos"), ("GET", "/v1/videos/video_0"),
            ("DELETE", "/v1/videos/video_0"), ("GET", "/v1/videos/video_0/content"),
            ("GET", "/v1/jobs/video_0")} <= set(routes)
    for headers in ({}, {"Authorization": "Bearer sk-nobody"}, {"Authorization": "Basic sk-bob-0123456789"}):
        for method, path in routes:
            r = served.request(method, path, headers=headers, json={"prompt": "a cat"})
            assert r.status_code == 401, (method, path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            error = r.json()["error"]
            assert error == {"message": error["message"], "type": "invalid_request_error", "param": None,
                             "code": "invalid_api_key"}
            assert "sk-" not in error["message"]
    assert served.service.callers == []  # nothing reached the service
    assert set(served.heard) == {(401, "invalid_api_key")}  # refused creates are counted like the others


def test_a_valid_key_reaches_the_service_as_its_caller(served):
    bob = {"Authorization": "Bearer sk-bob-0123456789"}
    alice = {"Authorization": "Bearer sk-alice-0123456789"}
    assert served.post("/v1/videos", json={"prompt": "a cat"}, headers=alice).status_code == 200
    for method, path in _v1_requests(served.app):
        r = served.request(method, path, headers=bob, json={"prompt": "a dog"})
        assert r.status_code != 401, (method, path, r.text)
    who = {what: caller.name for what, caller in served.service.callers}
    assert who == {"create": "bob", "list": "bob", "retrieve": "bob", "delete": "bob", "content": "bob",
                   "job": "bob"}
    assert served.service.callers[0] == ("create", Caller("alice", priority="batch",
                                                          quota={"max_in_flight": 4, "max_cost_in_flight": 12.5}))


def test_health_routes_stay_open_and_no_keys_means_anonymous(served):
    assert served.get("/healthz").json() == {"status": "ok"}
    assert served.get("/readyz").json() == {"status": "ready"}
    service = MemoryVideoService(MODEL, LIMITS)
    with TestClient(create_app(service)) as open_client:
        assert open_client.post("/v1/videos", json={"prompt": "a cat"}).status_code == 200
        assert open_client.get("/v1/videos", headers={"Authorization": "Bearer anything"}).status_code == 200
    assert [caller for _, caller in service.callers] == [ANONYMOUS, ANONYMOUS]


@pytest.mark.parametrize("api_docs", [False, True])
def test_docs_pages_are_served_only_when_configured(api_docs):
    app = create_app(MemoryVideoService(MODEL, LIMITS), keys=KeyRing.parse(KEYS), api_docs=api_docs)
    with TestClient(app) as client:
        statuses = {path: client.get(path).status_code for path in ("/docs", "/redoc", "/openapi.json")}
        assert statuses == dict.fromkeys(statuses, 200 if api_docs else 404)
        if api_docs:  # the docs say how to authenticate
            schema = client.get("/openapi.json").json()
            assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_failed_logins_log_nothing_of_the_key(served, caplog):
    with caplog.at_level(logging.DEBUG):
        served.get("/v1/videos", headers={"Authorization": "Bearer sk-guess-secret"})
        served.get("/v1/videos", headers={"Authorization": "Bearer sk-bob-0123456789"})
    assert "sk-" not in caplog.text


# --- the official client over real HTTP --------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_server():
    import uvicorn

    service = MemoryVideoService(MODEL, LIMITS)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service, keys=KeyRing.parse(KEYS)), host="127.0.0.1",
                                           port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", service
    server.should_exit = True
    thread.join(10)


def test_the_openai_client_authenticates_with_its_api_key(http_server):
    url, service = http_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-bob-0123456789", max_retries=0, timeout=20)
    video = client.videos.create(prompt="a red circle", size="32x32", seconds="1")
    assert video.status == "queued" and video.size == "32x32"
    assert client.videos.retrieve(video.id).id == video.id
    assert [v.id for v in client.videos.list()] == [video.id]
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert {caller.name for _, caller in service.callers} == {"bob"}
    stranger = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-stranger", max_retries=0, timeout=20)
    with pytest.raises(openai.AuthenticationError) as err:
        stranger.videos.list()
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    assert httpx.get(f"{url}/healthz", timeout=20).status_code == 200


def test_the_anonymous_name_is_reserved():
    with pytest.raises(ValueError, match="line 1.*reserved"):
        KeyRing.parse("anonymous:sk-abcdef\n")
