"""The /v1/videos protocol and routes over an in-memory service: validation, refusals, both body encodings."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from fakes import MemoryVideoService
from srserve.api.protocol import ModelCard, RequestLimits, VideoCreateBody, resolve_create
from srserve.api.routes import create_app

MODEL = ModelCard(name="tiny", fps=8, default_num_frames=9, default_height=32, default_width=32, default_steps=8,
                  default_switch="adaptive")
LIMITS = RequestLimits(max_prompt_chars=50, max_width=64, max_height=64, max_frames=33, max_steps=20)


@pytest.fixture
def client():
    service = MemoryVideoService(MODEL, LIMITS)
    with TestClient(create_app(service, api_docs=True)) as c:
        c.service = service
        yield c


def test_json_and_multipart_bodies_with_extra_fields(client):
    r = client.post("/v1/videos", json={"prompt": "a red circle moving right", "seed": 7, "size": "64x32",
                                        "num_inference_steps": 6, "switch": "step:3", "guidance_scale": 4.5})
    assert r.status_code == 200, r.text
    assert r.json()["size"] == "64x32" and r.json()["status"] == "queued" and r.json()["object"] == "video"
    form = {"prompt": "a blue square moving up", "seconds": "2", "seed": "3", "fps": "8"}
    r = client.post("/v1/videos", files={k: (None, v) for k, v in form.items()})  # multipart, as openai sends
    assert r.status_code == 200, r.text
    first, second = client.service.requests
    assert first.generation.seed == 7 and first.generation.switch == "step:3" and first.generation.width == 64
    assert second.generation.num_frames == 17 and second.seconds == "2"  # 2 s x 8 fps -> 4k+1 = 17 frames


def test_seconds_map_to_stride_frames():
    body = VideoCreateBody(prompt="x", seconds="1")
    assert resolve_create(body, MODEL, LIMITS).generation.num_frames == 9
    body = VideoCreateBody(prompt="x", seconds="1.3", fps=10)
    assert resolve_create(body, MODEL, LIMITS).generation.num_frames == 13
    body = VideoCreateBody(prompt="x")
    resolved = resolve_create(body, MODEL, LIMITS)
    assert resolved.generation.num_frames == 9 and resolved.seconds == "1.125" and resolved.size == "32x32"


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "x" * 51}, "prompt", "at most 50 characters"),
    ({"prompt": "  "}, "prompt", "empty"),
    ({"prompt": "ok", "size": "big"}, "size", "WIDTHxHEIGHT"),
    ({"prompt": "ok", "size": "40x32"}, "size", "multiples of 16"),
    ({"prompt": "ok", "size": "128x32"}, "size", "at most 64x64"),
    ({"prompt": "ok", "num_frames": 10}, "num_frames", "4k+1"),
    ({"prompt": "ok", "num_frames": 37}, "num_frames", "at most 33 frames"),
    ({"prompt": "ok", "seconds": "60"}, "seconds", "at most 33 frames"),
    ({"prompt": "ok", "seconds": "soon"}, "seconds", "number of seconds"),
    ({"prompt": "ok", "num_inference_steps": 21}, "num_inference_steps", "between 1 and 20"),
    ({"prompt": "ok", "guidance_scale": 99}, "guidance_scale", "between 0 and 20"),
    ({"prompt": "ok", "guidance_scale_2": -1}, "guidance_scale_2", "between 0 and 20"),
    ({"prompt": "ok", "switch": "sometimes"}, "switch", "adaptive"),
    ({"prompt": "ok", "model": "sora-2"}, "model", "unknown model 'sora-2'"),
    ({"prompt": "ok", "fps": 0}, "fps", "between 1"),
    ({"prompt": "ok", "seed": -1}, "seed", "2**63"),
    ({"prompt": "ok", "colour": "red"}, "colour", "unknown field"),
    ({"prompt": "ok", "seed": "abc"}, "seed", "integer"),
    ({"size": "32x32"}, "prompt", "required"),
])
def test_refusals_name_the_field_and_limit(client, body, param, words):
    r = client.post("/v1/videos", json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == param and words.lower() in error["message"].lower(), error


def test_unknown_ids_variants_and_bodies(client):
    assert client.get("/v1/videos/video_missing").status_code == 404
    assert client.delete("/v1/videos/video_missing").json()["error"]["code"] == "not_found"
    assert client.get("/v1/videos/video_missing/content", params={"variant": "gif"}).status_code == 422
    assert client.post("/v1/videos", content=b"not json", headers={"content-type": "application/json"}
                       ).status_code == 400
    assert client.get("/v1/videos", params={"limit": 0}).json()["error"]["param"] == "limit"


def test_health_models_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    schema = client.get("/openapi.json").json()
    create = schema["paths"]["/v1/videos"]["post"]
    assert set(create["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert "seed" in create["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"/v1/videos/{video_id}", "/v1/videos/{video_id}/content", "/v1/jobs/{video_id}"} <= set(schema["paths"])


def test_refused_creates_are_reported_to_the_hook():
    """`on_refused(status, code)` hears every create answered with an error (the ingress counts them by reason),
    and nothing else: not an accepted create, not a refusal of another route."""
    service, heard = MemoryVideoService(MODEL, LIMITS), []
    with TestClient(create_app(service, on_refused=lambda status, code: heard.append((status, code)))) as c:
        assert c.post("/v1/videos", json={"prompt": "ok", "size": "32x32"}).status_code == 200
        assert c.post("/v1/videos", json={"prompt": "ok", "size": "33x33"}).status_code == 422
        assert c.post("/v1/videos", json={"size": "32x32"}).status_code == 422  # body validation, in the route
        assert c.post("/v1/videos", content=b"x", headers={"content-type": "application/json"}).status_code == 400
        assert c.get("/v1/videos/video_missing").status_code == 404
        assert c.get("/v1/videos/video_missing/content", params={"variant": "gif"}).status_code == 422
    assert heard == [(422, "invalid_value"), (422, "missing"), (400, "invalid_body")]


@pytest.mark.parametrize("text, words", [
    ("step:" + "9" * 400, "between 0 and 999999"),    # was an OverflowError (float of a 400-digit int)
    ("step:" + "9" * 5000, "between 0 and 999999"),   # was past int()'s 4300-digit limit
    ("step:３", "whole number"), ("ratio:０.５", "plain decimal"), ("adaptive:min=１", "whole number"),
    ("ratio:1e999", "[0, 1]"), ("step: 3", "whole number"),
])
def test_switch_numbers_are_bounded_ascii(text, words):
    from srserve.pipeline.switch import parse_policy

    with pytest.raises(ValueError) as err:
        parse_policy(text)
    assert words in str(err.value) and len(str(err.value)) < 400, str(err.value)


def test_switch_policies_still_round_trip_through_str():
    from srserve.pipeline.switch import SwitchPolicy, parse_policy

    for policy in (SwitchPolicy("adaptive", 1e-05, 2, 9), SwitchPolicy("ratio", 1e-07), SwitchPolicy("step", 999999)):
        assert parse_policy(str(policy)) == policy
