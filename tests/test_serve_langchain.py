"""LangChain's OpenAI clients against the server on a real uvicorn (127.0.0.1): `ChatOpenAI`
(which sends max_completion_tokens, streams with stream_options.include_usage) and the legacy
completions `OpenAI` (a list of prompts per request). Greedy answers must equal the Session's.
Skips without langchain-openai (not in the CI extras; `pip install langchain-openai`)."""
from __future__ import annotations

import pytest

from conftest import core_or_skip

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
lc_openai = pytest.importorskip("langchain_openai")
messages = pytest.importorskip("langchain_core.messages")

from openelm_rt.serve import ServeOptions, create_app, wait_ready  # noqa: E402
from test_serve import serving  # noqa: E402

KEY = "lc-key"


@pytest.fixture(scope="module")
def lc(tiny_f32):
    """(base URL, a reference Session on the same model)."""
    ort = core_or_skip()
    sess = ort.Session(str(tiny_f32.oelm), threads=1, max_batch=4)
    ref = ort.Session(str(tiny_f32.oelm), threads=1)
    with serving(create_app(ServeOptions(api_key=KEY, max_batch=4, max_queue=8), session=sess)) as base:
        wait_ready(base)
        yield base, ref
    sess.close()
    ref.close()


def test_chat_openai_invoke_and_stream(lc):
    base, ref = lc
    llm = lc_openai.ChatOpenAI(base_url=base + "/v1", api_key=KEY, model="f32", temperature=0, max_tokens=20,
                               max_retries=0, stream_usage=True)
    msgs = [messages.SystemMessage("Be brief."), messages.HumanMessage("Name a colour.")]
    want = ref.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
                    max_new_tokens=20, temperature=0)
    r = llm.invoke(msgs)
    assert r.content == want.text
    assert r.usage_metadata["output_tokens"] == len(want.token_ids)
    assert r.response_metadata["finish_reason"] == ("length" if want.finish_reason == "length" else "stop")
    chunks = list(llm.stream(msgs))
    assert "".join(c.content for c in chunks) == want.text
    assert sum((c.usage_metadata or {}).get("output_tokens", 0) for c in chunks) == len(want.token_ids)
    # a batch of conversations (concurrent requests), each as alone
    outs = llm.batch([[messages.HumanMessage(t)] for t in ("Hello", "Count to three")])
    for t, o in zip(("Hello", "Count to three"), outs):
        assert o.content == ref.chat([{"role": "user", "content": t}], max_new_tokens=20, temperature=0).text


def test_legacy_openai_completions(lc):
    base, ref = lc
    llm = lc_openai.OpenAI(base_url=base + "/v1", api_key=KEY, model="f32", temperature=0, max_tokens=12,
                           max_retries=0)
    prompts = ["The capital of France is", "Once upon a time"]
    want = [ref.generate(p, max_new_tokens=12, temperature=0).text for p in prompts]
    assert llm.invoke(prompts[0]) == want[0]
    assert "".join(llm.stream(prompts[1])) == want[1]
    res = llm.generate(prompts)  # one request with a list of prompts
    assert [g[0].text for g in res.generations] == want
    assert res.llm_output["token_usage"]["completion_tokens"] == sum(
        len(ref.generate(p, max_new_tokens=12, temperature=0).token_ids) for p in prompts)


def test_errors_surface_as_openai_exceptions(lc):
    import openai

    base, _ = lc
    bad = lc_openai.ChatOpenAI(base_url=base + "/v1", api_key="wrong", model="f32", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.invoke("hi")
    llm = lc_openai.ChatOpenAI(base_url=base + "/v1", api_key=KEY, model="f32", max_retries=0, max_tokens=10 ** 6)
    with pytest.raises(openai.BadRequestError, match="context"):
        llm.invoke("hi")
