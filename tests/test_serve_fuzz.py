"""Fuzzing the server's own request parsing (issue 19): arbitrary JSON bodies -- any shape, the
request fields with values of any type, nested messages and content parts, integers past 64
bits, NaN and Infinity (Python's JSON reader, which the server uses, accepts them) -- and raw
bytes, POSTed to every endpoint that takes a body, in process (no socket). Each answer must be
a success or a clean 4xx with an OpenAI-style {"error": {"message", "code"}} body; an exception
that escapes the app (a 500) fails the test with the input that caused it.

schemathesis (tests/test_serve_schema.py) covers the OpenAPI schema; this covers the checks
behind it (Server.sampling, chat_ids, the prompt forms, the engine's submit). Bounded:
$OELM_SERVE_FUZZ_EXAMPLES inputs per endpoint (default 150); raise it for a local campaign
(tests/fuzz/README.md). Skips without the extra [serve].
"""
from __future__ import annotations

import json
import math
import os

import pytest

from conftest import core_or_skip

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from openelm_rt.serve import ServeOptions, create_app  # noqa: E402

EXAMPLES = int(os.environ.get("OELM_SERVE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, print_blob=True,
                suppress_health_check=list(HealthCheck))

# Every field the request models know (app.py), so that most bodies reach the checks behind
# validation rather than stopping at "field required".
SAMPLING = ["model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
            "presence_penalty", "frequency_penalty", "logit_bias", "user", "top_k", "min_p",
            "repetition_penalty"]
FIELDS = {
    "/v1/completions": SAMPLING + ["prompt", "logprobs", "echo", "best_of", "suffix"],
    "/v1/chat/completions": SAMPLING + ["messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools",
                                        "tool_choice", "functions", "function_call", "response_format"],
    "/tokenize": ["model", "prompt", "messages", "add_special_tokens"],
    "/detokenize": ["model", "tokens"],
}
REQUIRED = {"/v1/completions": "prompt", "/v1/chat/completions": "messages", "/detokenize": "tokens"}

# Numbers at the edges: 0, ±1, the bounds of 31/32/63/64-bit integers, far past them, NaN, ±Inf.
EDGE_INTS = [0, 1, -1, 2, 3, 16, 20, 21, 63, 64, 65, 1023, 1024, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 63 - 1,
             2 ** 63, 2 ** 64, -2 ** 63 - 1, 10 ** 30]
ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers(), st.integers(-5, 1100))
floats = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 1e-300, 1e300, math.nan, math.inf, -math.inf]),
                   st.floats(allow_nan=True, allow_infinity=True))
scalars = st.one_of(st.none(), st.booleans(), ints, floats, st.text(max_size=40),
                    st.sampled_from(["", "text", "user", "system", "assistant", "developer", "tool", "none",
                                     "auto", "json_object", "\x00", "\ud800", "<0xFF>", "</s>", "<s>"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=12), inner, max_size=6)), max_leaves=24)
token_lists = st.lists(ints, max_size=12)
content_part = st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", ""]),
                                                "text": st.one_of(st.text(max_size=30), json_values)}),
                         json_values)
message = st.one_of(
    st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
                                             json_values)},
                          optional={"content": st.one_of(st.text(max_size=60), st.lists(content_part, max_size=3),
                                                         json_values),
                                    "name": json_values}),
    json_values)
# Values shaped like what a field expects (half the time) or anything at all.
SHAPED = {
    "prompt": st.one_of(st.text(max_size=60), st.lists(st.text(max_size=20), max_size=4), token_lists,
                        st.lists(token_lists, max_size=4)),
    "messages": st.lists(message, max_size=4),
    "tokens": token_lists,
    "stop": st.one_of(st.text(max_size=8), st.lists(st.text(max_size=8), max_size=5)),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": json_values}),
    "logit_bias": st.dictionaries(st.text(max_size=5), floats, max_size=3),
    "response_format": st.fixed_dictionaries({}, optional={"type": json_values}),
}
SHAPED.update({n: ints for n in ("max_tokens", "n", "seed", "top_k", "logprobs", "best_of",
                                 "max_completion_tokens", "top_logprobs")})
SHAPED.update({n: floats for n in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p",
                                   "repetition_penalty")})
SHAPED.update({n: st.booleans() for n in ("stream", "echo", "add_special_tokens")})


def field_value(name):
    return st.one_of(SHAPED.get(name, scalars), json_values)


# Valid requests (cheap: one token) that the fuzzer changes a few fields of, so that one odd value
# at a time reaches the checks behind validation instead of the first error another field causes.
VALID = {
    "/v1/completions": {"prompt": "hi", "max_tokens": 1},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    "/tokenize": {"prompt": "hi"},
    "/detokenize": {"tokens": [1, 5]},
}


@st.composite
def bodies(draw, path):
    """JSON text: half the time a valid request with one to three fields set to anything;
    else an object of known fields (the required one most of the time), with extra unknown
    keys now and then; sometimes any JSON value at all."""
    kind = draw(st.integers(0, 9))
    if kind < 5:
        value = dict(VALID[path])
        for n in draw(st.lists(st.sampled_from(FIELDS[path]), unique=True, min_size=1, max_size=3)):
            value[n] = draw(field_value(n))
    elif kind == 5:
        value = draw(json_values)
    else:
        names = draw(st.lists(st.sampled_from(FIELDS[path]), unique=True, max_size=8))
        req = REQUIRED.get(path)
        if req and req not in names and draw(st.integers(0, 5)):
            names.append(req)
        value = {n: draw(field_value(n)) for n in names}
        value.update(draw(st.dictionaries(st.text(max_size=10), json_values, max_size=2)))
    return json.dumps(value, allow_nan=True)


@pytest.fixture(scope="module")
def http(tiny_f32):
    ort = core_or_skip()
    # A short context keeps each accepted request cheap (n <= 64 choices of <= 32 tokens); a queue
    # deep enough that a generated n never meets a full queue (a 503 there is right, but not what
    # this looks for).
    sess = ort.Session(str(tiny_f32.oelm), threads=1, max_batch=8, max_context=32)
    app = create_app(ServeOptions(max_batch=8, max_queue=256, keepalive_s=0), session=sess)
    # raise_server_exceptions: an exception that escapes the app raises here, with its traceback.
    with TestClient(app, raise_server_exceptions=True) as c:
        yield c
    sess.close()


def check(http, path: str, body: bytes, content_type="application/json"):
    r = http.post(path, content=body, headers={"content-type": content_type})
    assert r.status_code < 500, (path, body[:300], r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"], r.text
        assert err["code"] == r.status_code, r.text
        return r
    if "text/event-stream" in r.headers.get("content-type", ""):
        events = [ln[len("data: "):] for ln in r.text.split("\n") if ln.startswith("data: ")]
        assert events and events[-1] == "[DONE]", r.text[-300:]
        for e in events[:-1]:
            assert "error" not in json.loads(e), e  # a failed generation is a server error too
    else:
        r.json()
    return r


@pytest.mark.parametrize("path", sorted(FIELDS))
def test_arbitrary_json_bodies_get_clean_answers(http, path):
    @FUZZ
    @given(bodies(path))
    def run(text):
        check(http, path, text.encode("utf-8", "surrogatepass"))

    run()


@FUZZ
@given(path=st.sampled_from(sorted(FIELDS)), raw=st.binary(max_size=200),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]))
def test_raw_bytes_get_clean_answers(http, path, raw, content_type):
    check(http, path, raw, content_type)


def test_the_checks_behind_validation_are_reached(http):
    """Not only validation errors: the fuzzer's inputs reach the server's own checks (a guard
    against a strategy that only ever produces 'field required'), and the edge values it
    draws answer as the API documents."""
    cases = [
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2 ** 64}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 1, "top_k": 2 ** 64}, 200, None),  # = off (was a 500)
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_k": 2 ** 31}, 200, None),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 1, "temperature": math.nan}, 400, None),
        ("/v1/completions", {"prompt": [[1, 2 ** 63]], "max_tokens": 1}, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 1, "n": 2 ** 70}, 400, "n"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
         400, "messages[0].content"),
        ("/detokenize", {"tokens": [2 ** 64]}, 400, "tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "seed": -2 ** 70}, 200, None),
    ]
    for path, body, status, param in cases:
        r = check(http, path, json.dumps(body, allow_nan=True).encode())
        assert r.status_code == status, (path, body, r.status_code, r.text)
        if param is not None:
            assert r.json()["error"]["param"] == param, r.text
