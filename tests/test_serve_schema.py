"""Property-based requests against the server's own OpenAPI schema (schemathesis, bounded): whatever
a generated request holds, the server answers it without a 5xx, and every error is an OpenAI-style
{"error": {"message": ...}} body. Skips without schemathesis or the extra [serve]."""
from __future__ import annotations

import pytest

from conftest import core_or_skip

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
from hypothesis import HealthCheck, settings  # noqa: E402

from test_serve import serving  # noqa: E402

from openelm_rt.serve import ServeOptions, create_app, wait_ready  # noqa: E402


@pytest.fixture(scope="module")
def base_url(tiny_f32):
    ort = core_or_skip()
    # A queue deep enough that a generated n (<= 64) never meets a full queue: a 503 would be
    # correct there but is not what this test looks for.
    sess = ort.Session(str(tiny_f32.oelm), threads=1, max_batch=8, max_context=64)
    app = create_app(ServeOptions(max_batch=8, max_queue=256), session=sess)
    with serving(app) as base:
        wait_ready(base)
        yield base
    sess.close()


@pytest.fixture(scope="module")
def api_schema(base_url):
    return schemathesis.openapi.from_url(base_url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, base_url):
    r = case.call(base_url=base_url, timeout=30)
    assert r.status_code < 500, (case.path, case.body, r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"], r.text
