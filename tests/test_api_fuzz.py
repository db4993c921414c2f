"""Fuzzing the edge: requests generated from the served OpenAPI (schemathesis, valid and schema-violating) and
hand-written hostile ones (hypothesis), against the real `create_app` and `resolve_create` over an in-memory
service, in process. Every answer is below 500, and every 4xx has the OpenAI error shape and quotes little.

More than 2,000 generated requests in all (PLAN), derandomized so the suite is the same on every run.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from fakes import MemoryVideoService
from srserve.api.auth import KeyRing
from srserve.api.protocol import ModelCard, RequestLimits, VideoCreateBody
from srserve.api.routes import create_app

MODEL = ModelCard(name="tiny", fps=8, default_num_frames=9, default_height=32, default_width=32, default_steps=8)
LIMITS = RequestLimits(max_prompt_chars=200, max_width=64, max_height=64, max_frames=33, max_steps=20)
KEY = "sk-fuzz-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 64 << 10
MAX_MESSAGE = 1500  # fixed text plus at most ~100 quoted characters (repr may spell one as \U0001f600)
FIELDS = sorted(VideoCreateBody.model_fields)
ROUTES = [("GET", "/v1/models"), ("POST", "/v1/videos"), ("GET", "/v1/videos"), ("GET", "/v1/videos/video_0"),
          ("DELETE", "/v1/videos/video_0"), ("GET", "/v1/videos/video_0/content"), ("GET", "/v1/jobs/video_0")]


APP = create_app(MemoryVideoService(MODEL, LIMITS), keys=KeyRing.parse(f"fuzz:{KEY}"),
                 max_body_bytes=MAX_BODY)
SCHEMA = schemathesis.openapi.from_dict(APP.openapi())  # the schema the server would serve at /openapi.json
FUZZ = settings(deadline=None, database=None, derandomize=True, print_blob=True,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def send():
    """send(method, url, **httpx kwargs) -> response, through the app's ASGI interface in one event loop. App
    exceptions are raised (not turned into a 500), so a failure shows its traceback."""
    loop = asyncio.new_event_loop()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=APP), base_url="http://testserver")

    def request(method: str, url: str, **kwargs: Any) -> httpx.Response:
        return loop.run_until_complete(client.request(method, url, **kwargs))
    yield request
    loop.run_until_complete(client.aclose())
    loop.close()


def check(response: httpx.Response, what: Any) -> dict[str, Any] | None:
    """No 5xx; a 4xx in the OpenAI error shape with a bounded message. Returns the error, if any."""
    status = response.status_code
    assert status < 500, (status, response.text[:500], what)
    if status < 400:
        return None
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, (body, what)
    error = body["error"]
    assert isinstance(error["message"], str) and 0 < len(error["message"]) <= MAX_MESSAGE, (error, what)
    assert error["type"] == "invalid_request_error", (error, what)
    assert error["param"] is None or (isinstance(error["param"], str) and len(error["param"]) <= 103), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return error


# --- schema-driven: every operation of the served OpenAPI ----------------------------------------------------------

def _plan() -> list[tuple[str, str, GenerationMode, str | None, int]]:
    """(method, path, mode, media type, examples); the create body gets most of them."""
    plan = []
    for media, (valid, invalid) in {"application/json": (250, 350), "multipart/form-data": (200, 300)}.items():
        plan += [("POST", "/v1/videos", GenerationMode.POSITIVE, media, valid),
                 ("POST", "/v1/videos", GenerationMode.NEGATIVE, media, invalid)]
    plan += [("GET", "/v1/videos", GenerationMode.POSITIVE, None, 80),
             ("GET", "/v1/videos", GenerationMode.NEGATIVE, None, 120)]
    for method, path in (("GET", "/v1/videos/{video_id}"), ("DELETE", "/v1/videos/{video_id}"),
                         ("GET", "/v1/videos/{video_id}/content"), ("GET", "/v1/jobs/{video_id}")):
        plan += [(method, path, GenerationMode.POSITIVE, None, 40), (method, path, GenerationMode.NEGATIVE, None, 60)]
    return plan


PLAN = _plan()
HOSTILE_PLAN = {"json": 300, "multipart": 200, "raw": 100, "auth": 100}
assert sum(n for *_, n in PLAN) + sum(HOSTILE_PLAN.values()) >= 2000


def _wire(kwargs: dict[str, Any]) -> dict[str, Any]:
    """schemathesis' request kwargs as httpx takes them: form values as text (JSON spelling for non-strings)."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("cookies",) and v not in (None, {})}
    if "files" in kwargs:
        kwargs["files"] = [(name, (part[0], part[1] if isinstance(part[1], (str, bytes)) else
                                   json.dumps(part[1]) if not isinstance(part[1], (int, float)) or
                                   isinstance(part[1], bool) else str(part[1])) + tuple(part[2:]))
                           for name, part in kwargs["files"]]
    return kwargs


def test_every_operation_of_the_served_schema_is_fuzzed():
    operations = {(op.ok().method.upper(), op.ok().path) for op in SCHEMA.get_all_operations()}
    fuzzed = {(method, path) for method, path, *_ in PLAN}
    assert fuzzed == operations - {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/v1/models")}  # no inputs


@pytest.mark.parametrize("method, path, mode, media, examples", PLAN,
                         ids=[f"{m} {p} {mode.value} {media or ''}".strip() for m, p, mode, media, _ in PLAN])
def test_schema_driven_requests_never_5xx(send, method, path, mode, media, examples):
    operation = SCHEMA[path][method]
    sent = []

    @given(case=operation.as_strategy(generation_mode=mode, media_type=media))
    @settings(FUZZ, max_examples=examples)
    def run(case):
        kwargs = _wire(case.as_transport_kwargs(base_url="http://testserver", headers=AUTH))
        error = check(send(kwargs.pop("method"), kwargs.pop("url"), **kwargs), case.body)
        sent.append(error)
        if mode is GenerationMode.POSITIVE and error is not None:  # valid by the schema: refused by a rule,
            assert error["param"] or error["code"], error          # which the error names
    run()
    assert len(sent) >= examples * 0.9, len(sent)  # a few may be rejected while generating


# --- hostile, hand-written -----------------------------------------------------------------------------------------

_FULL_WIDTH = "".join(chr(0xFF10 + d) for d in range(10))
texts = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec=None, categories=["Cs", "Cc", "Nd", "Zs"]), max_size=20),  # surrogates..
    st.text(alphabet=_FULL_WIDTH + "xX.", min_size=1, max_size=9),
    st.integers(4290, 6000).map(lambda n: "9" * n),                              # past int()'s digit limit
    st.integers(300, 5000).map(lambda n: "step:" + "9" * n),                     # past float() in parse_policy
    st.sampled_from(["1e-320", "1e400", "nan", "-0", "0x10", "1_0", " 4 ", "32x32", "64x32", "step:3", "ratio:0.5",
                     "adaptive:1e-05", "adaptive:min=1:max=99999999999999", "2.5", "tiny", ""]),
)
_json_text = texts.map(lambda s: json.dumps(s))  # ensure_ascii: a lone surrogate travels as a \ud800 escape
fragments = st.one_of(  # JSON value text, so values json.dumps cannot write (ints past 4300 digits) are sent too
    _json_text, _json_text, st.booleans().map(json.dumps), st.none().map(json.dumps),
    st.integers().map(str), st.integers(4290, 6000).map(lambda n: "9" * n),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-0", "1e-320", "[]", "{}"]),
    st.integers(20, 3000).map(lambda d: "[" * d + "]" * d), st.integers(20, 200).map(lambda d: '{"a":' * d + "1" + "}" * d),
)
names = st.one_of(st.sampled_from(FIELDS), st.text(max_size=30))


@st.composite
def json_bodies(draw) -> bytes:
    fields = draw(st.dictionaries(names, fragments, max_size=6))
    if draw(st.booleans()):
        fields.setdefault("prompt", json.dumps("a red circle"))
    return ("{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in fields.items()) + "}").encode("utf-8", "surrogatepass")


@st.composite
def multipart_bodies(draw) -> tuple[bytes, str]:
    """A form by hand (so names and values may be anything), with text and file parts."""
    boundary = "fuzzboundary"
    parts = draw(st.lists(st.tuples(names, texts, st.booleans()), max_size=6))
    if draw(st.booleans()):
        parts.append(("prompt", "a red circle", False))
    out = b""
    for name, value, as_file in parts:
        disposition = f'form-data; name="{name}"' + ('; filename="f.bin"' if as_file else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode("utf-8", "surrogatepass")
        out += value.encode("utf-8", "surrogatepass") + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@given(body=json_bodies())
@settings(FUZZ, max_examples=HOSTILE_PLAN["json"])
def test_hostile_json_bodies_never_5xx(send, body):
    check(send("POST", "/v1/videos", content=body, headers={**AUTH, "content-type": "application/json"}), body)


@given(form=multipart_bodies())
@settings(FUZZ, max_examples=HOSTILE_PLAN["multipart"])
def test_hostile_forms_never_5xx(send, form):
    body, content_type = form
    check(send("POST", "/v1/videos", content=body, headers={**AUTH, "content-type": content_type}), body)


@given(body=st.binary(max_size=512), content_type=st.sampled_from(
    ["application/json", "multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; boundary=b",
     "application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=b; charset=unicode_escape"]))
@settings(FUZZ, max_examples=HOSTILE_PLAN["raw"])
def test_raw_bodies_never_5xx(send, body, content_type):
    check(send("POST", "/v1/videos", content=body, headers={**AUTH, "content-type": content_type}), body)


@given(route=st.sampled_from(ROUTES), header=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF),
                                                     max_size=60))
@settings(FUZZ, max_examples=HOSTILE_PLAN["auth"])
def test_any_other_authorization_header_is_a_401(send, route, header):
    response = send(*route, headers={"Authorization": header.encode("latin-1")}, json={"prompt": "a cat"})
    error = check(response, header)
    assert response.status_code == 401 and error["code"] == "invalid_api_key", (header, error)
    assert response.headers["www-authenticate"] == "Bearer"


# --- hostile, one by one: what was found, and the limits ------------------------------------------------------------

def _json(text: str) -> dict[str, Any]:
    return {"content": text.encode("utf-8", "surrogatepass"), "headers": {**AUTH, "content-type": "application/json"}}


def _form(*parts: tuple[str, str, bool]) -> dict[str, Any]:
    files = [(name, ("f.bin" if as_file else None, value)) for name, value, as_file in parts]
    return {"files": files, "headers": AUTH}


def _chunks(total: int, size: int = 8192, first: bytes = b""):
    """A streamed body (no Content-Length: httpx sends it chunked)."""
    async def body():
        yield first
        for _ in range(total // size + 1):
            yield b" " * size
    return body()


_FILE_PART = b'--b\r\nContent-Disposition: form-data; name="input_reference"; filename="x.png"\r\n\r\n'


NINES = "9" * 5000
HOSTILE = {  # label: (httpx kwargs of a POST /v1/videos, status, param)
    "json nested 1000 deep": (_json('{"prompt": "x", "negative_prompt": ' + "[" * 1000 + "]" * 1000 + "}"), 400, "body"),
    "json nested 30000 deep": (_json("[" * 30000 + "]" * 30000), 400, "body"),
    "json nested 40 deep, in depth": (_json('{"input_reference": ' + '{"a":' * 40 + "1" + "}" * 41), 400, "body"),
    "lone surrogate in negative_prompt": (_json('{"prompt": "x", "negative_prompt": "a\\ud800b"}'), 422,
                                          "negative_prompt"),
    "lone surrogate in prompt": (_json('{"prompt": "\\udfff"}'), 422, "prompt"),
    "lone surrogate in a field name": (_json('{"prompt": "x", "\\ud800": 1}'), 422, "body"),
    "size with 5000 digits": ({"json": {"prompt": "x", "size": NINES + "x32"}, "headers": AUTH}, 422, "size"),
    "step:K with 400 digits": ({"json": {"prompt": "x", "switch": "step:" + "9" * 400}, "headers": AUTH}, 422, "switch"),
    "step:K with 5000 digits": ({"json": {"prompt": "x", "switch": "step:" + NINES}, "headers": AUTH}, 422, "switch"),
    "seed with 5000 digits": (_json('{"prompt": "x", "seed": ' + NINES + "}"), 400, "body"),
    "guidance with 400 digits": (_json('{"prompt": "x", "guidance_scale": ' + "9" * 400 + "}"), 422,
                                 "guidance_scale"),
    "NaN": (_json('{"prompt": "x", "guidance_scale": NaN}'), 400, "body"),
    "num_frames true": ({"json": {"prompt": "x", "num_frames": True}, "headers": AUTH}, 422, "num_frames"),
    "seed false": ({"json": {"prompt": "x", "seed": False}, "headers": AUTH}, 422, "seed"),
    "guidance_scale true": ({"json": {"prompt": "x", "guidance_scale": True}, "headers": AUTH}, 422, "guidance_scale"),
    "seconds true": ({"json": {"prompt": "x", "seconds": True}, "headers": AUTH}, 422, "seconds"),
    "num_frames 9.0": ({"json": {"prompt": "x", "num_frames": 9.0}, "headers": AUTH}, 422, "num_frames"),
    "full-width size": ({"json": {"prompt": "x", "size": "３２x３２"}, "headers": AUTH}, 422, "size"),
    "full-width seconds": ({"json": {"prompt": "x", "seconds": "１"}, "headers": AUTH}, 422, "seconds"),
    "full-width seed in a form": (_form(("prompt", "x", False), ("seed", "３", False)), 422, "seed"),
    "full-width ratio": ({"json": {"prompt": "x", "switch": "ratio:０.５"}, "headers": AUTH}, 422, "switch"),
    "seconds 1e-320": ({"json": {"prompt": "x", "seconds": "1e-320"}, "headers": AUTH}, 422, "seconds"),
    "seconds 1e-320 as a number": ({"json": {"prompt": "x", "seconds": 1e-320}, "headers": AUTH}, 422, "seconds"),
    "seconds nan": ({"json": {"prompt": "x", "seconds": "nan"}, "headers": AUTH}, 422, "seconds"),
    "a control character": ({"json": {"prompt": "a\x07b"}, "headers": AUTH}, 422, "prompt"),
    "a C1 control character in size": ({"json": {"prompt": "x", "size": "32x32\x85"}, "headers": AUTH}, 422, "size"),
    "a file as prompt": (_form(("prompt", "a cat", True)), 422, "prompt"),
    "a file as negative_prompt": (_form(("prompt", "x", False), ("negative_prompt", "y", True)), 422,
                                  "negative_prompt"),
    "a file as input_reference": (_form(("prompt", "x", False), ("input_reference", "png", True)), 422,
                                  "input_reference"),
    "two files": (_form(("prompt", "x", False), ("a", "1", True), ("b", "2", True)), 400, "body"),
    "too many form fields": (_form(*[(f"f{i}", "x", False) for i in range(40)]), 400, "body"),
    "Content-Length past the limit": (_json(" " * (MAX_BODY + 1)), 413, "body"),
    "chunked past the limit": ({"content": _chunks(MAX_BODY * 3), "headers": {**AUTH, "content-type":
                                                                             "application/json"}}, 413, "body"),
    "a chunked file part past the limit": ({"content": _chunks(MAX_BODY * 3, first=_FILE_PART), "headers": {
        **AUTH, "content-type": "multipart/form-data; boundary=b"}}, 413, "body"),
    "a form without a boundary": ({"content": b"x", "headers": {**AUTH, "content-type": "multipart/form-data"}},
                                  400, "body"),
    "a long unknown field": ({"json": {"prompt": "x", "k" * 5000: 1}, "headers": AUTH}, 422, "k" * 100 + "..."),
    "a long model": ({"json": {"prompt": "x", "model": "m" * 5000}, "headers": AUTH}, 422, "model"),
}


@pytest.mark.parametrize("label", list(HOSTILE))
def test_hostile_requests_are_refused_naming_the_field(send, label):
    kwargs, status, param = HOSTILE[label]
    response = send("POST", "/v1/videos", **kwargs)
    error = check(response, label)
    assert response.status_code == status and error["param"] == param, (label, response.status_code, error)
    for run in ("9" * 101, "k" * 101, "m" * 101):  # at most ~100 characters of the input quoted
        assert run not in error["message"], error
    if status == 413:
        assert error["code"] == "body_too_large"


def test_a_form_text_part_is_bounded_below_the_body_limit():
    from fastapi.testclient import TestClient

    from srserve.api.routes import FORM_MAX_PART_BYTES

    app = create_app(MemoryVideoService(MODEL, LIMITS), max_body_bytes=4 * FORM_MAX_PART_BYTES)
    with TestClient(app) as client:
        r = client.post("/v1/videos", files={"prompt": (None, "x" * (FORM_MAX_PART_BYTES + 1))})
        assert r.status_code == 400 and r.json()["error"]["param"] == "body" and "Part" in r.text, r.text
        r = client.post("/v1/videos", files={"prompt": (None, "x"), "input_reference": ("x.png", b"0" * 3 *
                                                                                         FORM_MAX_PART_BYTES)})
        assert r.status_code == 422 and r.json()["error"]["param"] == "input_reference", r.text


def test_text_keeps_newlines_and_tabs_and_seconds_read_as_plain_decimals(send):
    response = send("POST", "/v1/videos", headers=AUTH, json={"prompt": "line one\r\n\tline two", "seconds": "01.50"})
    assert response.status_code == 200, response.text
    assert response.json()["seconds"] == "1.5"  # reported as a plain decimal, not as sent
    response = send("POST", "/v1/videos", headers=AUTH, json={"prompt": "x", "seconds": 2, "seed": "7"})
    assert response.status_code == 200 and response.json()["seconds"] == "2", response.text


def test_long_path_and_query_values_are_refused_not_echoed(send):
    for url, param in ((f"/v1/videos/{'a' * 5000}", "video_id"), (f"/v1/jobs/{'a' * 5000}", "video_id"),
                       (f"/v1/videos?after={'a' * 5000}", "after"),
                       (f"/v1/videos/video_0/content?variant={'v' * 5000}", "variant")):
        error = check(send("GET", url, headers=AUTH), url)
        assert error["param"] == param and "a" * 101 not in error["message"] and "v" * 101 not in error["message"]


def test_unknown_routes_and_methods_answer_in_the_error_shape(send):
    assert check(send("GET", "/v2/nothing"), "404")["code"] == "not_found"
    assert check(send("PUT", "/v1/videos", headers=AUTH), "405")["code"] == "method_not_allowed"
