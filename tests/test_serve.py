"""The OpenAI-compatible server (openelm_rt.serve) against a real uvicorn on 127.0.0.1.

Clients: the openai SDK (chat, completions, streaming, usage chunk, errors as exceptions, 503
retry), httpx, and raw sockets that disconnect mid-stream, mid-prefill and while queued. Greedy
output over HTTP must equal Session.generate / Session.chat token for token; a bounded load
test checks every response at concurrency 1, 4, 8 and 16. Skips without the extra [serve].
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import pytest

from conftest import build_model, core_or_skip

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from openelm_rt.serve import ServeOptions, create_app, wait_ready  # noqa: E402

KEY = "test-key"
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Ünïcödé — naïve café, 東京 🙂",
           "In 1492,", "Q: what is 2+2?\nA:", "Lorem ipsum dolor", "a b c d e f g"]


@contextlib.contextmanager
def serving(app):
    """Runs `app` under uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not t.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(timeout=30)


@pytest.fixture(scope="module")
def ref(tiny_f32):
    ort = core_or_skip()
    s = ort.Session(str(tiny_f32.oelm), threads=1)
    yield s
    s.close()


@pytest.fixture(scope="module")
def srv(tiny_f32):
    """A server with a key, 4 slots and a queue of 16 (the load test goes to concurrency 16)."""
    ort = core_or_skip()
    sess = ort.Session(str(tiny_f32.oelm), threads=1, max_batch=4)
    app = create_app(ServeOptions(api_key=KEY, max_batch=4, max_queue=16, keepalive_s=0.05), session=sess)
    with serving(app) as base:
        wait_ready(base)
        yield base, app.state.server
    sess.close()


@pytest.fixture
def client(srv):
    return openai.OpenAI(base_url=srv[0] + "/v1", api_key=KEY, max_retries=0)


def auth():
    return {"Authorization": f"Bearer {KEY}"}


# ---------------------------------------------------------------------------------------------- basics
def test_health_models_tokenize(srv, ref):
    base, _ = srv
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    c = openai.OpenAI(base_url=base + "/v1", api_key=KEY)
    assert [m.id for m in c.models.list().data] == ["f32"]
    r = httpx.post(base + "/tokenize", json={"prompt": PROMPTS[3]}, headers=auth()).json()
    assert r["tokens"] == ref.tokenize(PROMPTS[3]) and r["count"] == len(r["tokens"])
    msgs = [{"role": "user", "content": "hi"}]
    r = httpx.post(base + "/tokenize", json={"messages": msgs}, headers=auth()).json()
    assert r["tokens"] == ref.chat_token_ids(msgs)
    r = httpx.post(base + "/detokenize", json={"tokens": ref.tokenize(PROMPTS[3])}, headers=auth()).json()
    assert r["prompt"] == PROMPTS[3]


def test_health_is_503_while_loading_and_500_on_a_bad_model(tiny_f32, tmp_path):
    # Without the lifespan (ASGITransport does not run it) the model never starts loading.
    app = create_app(ServeOptions(model=str(tiny_f32.oelm)))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.get("/health")
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            r = await c.post("/v1/completions", json={"prompt": "x"})
            assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
    asyncio.run(go())
    bad = tmp_path / "bad.oelm"
    bad.write_bytes(b"not a model")
    with serving(create_app(ServeOptions(model=str(bad)))) as base:
        deadline = time.time() + 10
        while httpx.get(base + "/health").status_code == 503 and time.time() < deadline:
            time.sleep(0.02)
        r = httpx.get(base + "/health")
        assert r.status_code == 500 and "bad.oelm" in r.json()["error"]


def test_api_key_and_body_cap(srv):
    base, _ = srv
    bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="Bearer"):
        bad.completions.create(model="f32", prompt="x", max_tokens=1)
    assert httpx.get(base + "/v1/models").status_code == 401
    assert httpx.get(base + "/health").status_code == 200  # open, for load balancers
    r = httpx.post(base + "/v1/completions", headers=auth(), content=b"{" + b" " * (4 * 1024 * 1024) + b"}")
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = httpx.post(base + "/v1/embeddings", headers=auth(), json={"input": "x"})  # OpenAI-style errors throughout
    assert r.status_code == 404 and "/v1/embeddings" in r.json()["error"]["message"]
    r = httpx.get(base + "/v1/completions", headers=auth())
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------------------------------------- equality
def test_chat_greedy_equals_session_chat(client, ref):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Name a colour."}]
    want = ref.chat(msgs, max_new_tokens=24, temperature=0)
    r = client.chat.completions.create(model="f32", messages=msgs, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(ref.chat_token_ids(msgs))
    assert r.usage.completion_tokens == len(want.token_ids)
    # max_completion_tokens alone (LangChain), content as text parts with cache_control, a null
    # content, the developer role, unknown fields: the same prompt, the same answer.
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be brief.", "cache_control": {"x": 1}}]},
             {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi."},
             {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}]
    r2 = client.chat.completions.create(model="f32", messages=parts, max_completion_tokens=24, temperature=0,
                                        top_p=None, seed=None, extra_body={"some_unknown_field": {"a": 1}})
    assert r2.choices[0].message.content == want.text
    r3 = client.chat.completions.create(model="f32", messages=[{"role": "assistant", "content": None},
                                                               {"role": "user", "content": "x"}],
                                        max_tokens=3, temperature=0)
    assert r3.choices[0].message.content == ref.chat([{"role": "assistant", "content": ""},
                                                      {"role": "user", "content": "x"}],
                                                     max_new_tokens=3, temperature=0).text


def test_completions_greedy_equals_generate(client, ref):
    want = ref.generate(PROMPTS[0], max_new_tokens=20, temperature=0)
    r = client.completions.create(model="f32", prompt=PROMPTS[0], max_tokens=20, temperature=0)
    assert r.choices[0].text == want.text
    r = client.completions.create(model="f32", prompt=[PROMPTS[0]], max_tokens=20, temperature=0)
    assert r.choices[0].text == want.text
    ids = ref.tokenize(PROMPTS[0])
    r = client.completions.create(model="f32", prompt=ids, max_tokens=20, temperature=0)
    assert r.choices[0].text == want.text
    # several prompts, n choices each: index = prompt * n + choice
    r = client.completions.create(model="f32", prompt=PROMPTS[:2], max_tokens=8, temperature=0, n=2)
    w2 = ref.generate(PROMPTS[1], max_new_tokens=8, temperature=0).text
    w1 = ref.generate(PROMPTS[0], max_new_tokens=8, temperature=0).text
    assert [(c.index, c.text) for c in sorted(r.choices, key=lambda c: c.index)] == \
        [(0, w1), (1, w1), (2, w2), (3, w2)]
    # default max_tokens of /v1/completions is OpenAI's 16
    r = client.completions.create(model="f32", prompt=PROMPTS[0], temperature=0)
    assert r.usage.completion_tokens == 16 and r.choices[0].text == ref.generate(
        PROMPTS[0], max_new_tokens=16, temperature=0).text


def test_seeded_sampling_streamed_equals_not_streamed(client, ref):
    kw = dict(model="f32", max_tokens=40, temperature=0.9, top_p=0.95, seed=1234)
    msgs = [{"role": "user", "content": PROMPTS[3]}]
    whole = client.chat.completions.create(messages=msgs, **kw)
    want = ref.chat(msgs, max_new_tokens=40, temperature=0.9, top_p=0.95, seed=1234).text
    assert whole.choices[0].message.content == want
    chunks = list(client.chat.completions.create(messages=msgs, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    body = [c for c in chunks if c.choices]
    assert body[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in body) == whole.choices[0].message.content
    # completions too, and the random model's byte-fallback pieces arrive as whole characters:
    # the streamed pieces join to exactly the non-streamed text
    kw = dict(model="f32", prompt=PROMPTS[3], max_tokens=60, temperature=1.0, seed=99)
    whole = client.completions.create(**kw).choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(pieces) == whole == ref.generate(PROMPTS[3], max_new_tokens=60, temperature=1.0, seed=99).text


def test_stop_strings_held_back_and_removed(client, ref):
    full = ref.generate(PROMPTS[2], max_new_tokens=30, temperature=0).text
    stop = full[10:13]
    assert len(stop) == 3
    want = full[:full.index(stop)]
    r = client.completions.create(model="f32", prompt=PROMPTS[2], max_tokens=30, temperature=0, stop=[stop, "zzzq"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in client.completions.create(
        model="f32", prompt=PROMPTS[2], max_tokens=30, temperature=0, stop=stop, stream=True) if c.choices]
    assert "".join(pieces) == want


def test_logprobs_and_echo_score_like_session(client, ref, srv):
    """echo + logprobs with max_tokens 0 is how lm-eval's API models score: the prompt's token
    log-probabilities must be Session.score's, and the top-1 tells greedy-ness."""
    ctx, cont = ref.tokenize("The capital of France"), ref.tokenize(" is Paris", add_bos=False)
    r = client.completions.create(model="f32", prompt=ctx + cont, max_tokens=0, echo=True, logprobs=1,
                                  temperature=0)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ctx) + len(cont)
    sc = ref.score(ctx, cont)
    assert lp.token_logprobs[len(ctx):] == pytest.approx(sc.logprobs, abs=1e-4)
    greedy = all(t == max(top.values()) for t, top in zip(lp.token_logprobs[len(ctx):], lp.top_logprobs[len(ctx):]))
    assert greedy == sc.is_greedy
    assert r.choices[0].text == ref.detokenize(ctx + cont)
    # generated tokens' logprobs: the top-k are sorted and the chosen greedy token is the first
    r = client.completions.create(model="f32", prompt=PROMPTS[0], max_tokens=5, logprobs=3, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 5 and all(len(t) == 3 for t in lp.top_logprobs)
    for tok_lp, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert tok_lp == pytest.approx(max(top.values()))
    c = client.chat.completions.create(model="f32", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == 4 and all(len(x.top_logprobs) == 2 for x in content)
    assert all(x.logprob == pytest.approx(x.top_logprobs[0].logprob) for x in content)


def test_prefix_cache_reports_cached_tokens(client):
    sys = {"role": "system", "content": "You are a helpful assistant who answers in one short sentence. " * 3}
    client.chat.completions.create(model="f32", messages=[sys, {"role": "user", "content": "one"}], max_tokens=2,
                                   temperature=0)
    r = client.chat.completions.create(model="f32", messages=[sys, {"role": "user", "content": "two"}],
                                       max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens >= 32  # at least the system prompt's whole blocks


# ---------------------------------------------------------------------------------------------- errors
def test_errors_are_clear_400s(client, ref):
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="f32", messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="f32", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_object"})
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model="f32", prompt="x", best_of=3)
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model="f32", prompt="x", suffix="y")
    n = len(ref.tokenize(PROMPTS[0]))
    with pytest.raises(openai.BadRequestError, match=rf"prompt \({n} tokens\) \+ max_tokens \(300\).*256"):
        client.completions.create(model="f32", prompt=PROMPTS[0], max_tokens=300)
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens"):
        client.chat.completions.create(model="f32", messages=[{"role": "user", "content": "x"}],
                                       max_completion_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(model="f32", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}])
    with pytest.raises(openai.BadRequestError, match="last message"):
        client.chat.completions.create(model="f32", messages=[{"role": "assistant", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="f32", prompt="x", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="repetition_penalty"):
        client.completions.create(model="f32", prompt="x", presence_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="f32", messages="hello")
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model="f32", prompt=[1, 99999])


# ---------------------------------------------------------------------------------------------- limits
def _raw_request(base, path, body, read_until=None):
    """Sends a POST over a raw socket; returns the socket (and what was read up to read_until)."""
    host, port = base.rsplit("/", 1)[-1].split(":")
    s = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json"
              f"\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    got = b""
    if read_until is not None:
        while read_until not in got:
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
    return s, got


def _wait_cancelled(server, before, timeout=2.0):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        st = server.engine.stats()
        if st["cancelled"] > before and st["running"] == 0 and st["waiting"] == 0:
            return time.perf_counter() - t0, st
        time.sleep(0.001)
    raise AssertionError(f"not cancelled within {timeout} s: {server.engine.stats()}")


@pytest.fixture(scope="module")
def slow(work_dir, tokenizer_path):
    """A model big enough that a generation and a long prefill take a while on one thread
    (~10M parameters, context 1024), served with one slot and one queue place."""
    ort = core_or_skip()
    m = build_model(work_dir, tokenizer_path, "serve_slow", seed=7,
                    config_overrides={"model_dim": 384, "num_transformer_layers": 6, "head_dim": 32,
                                      "max_context_length": 1024})
    sess = ort.Session(str(m.oelm), threads=1, max_batch=1)
    app = create_app(ServeOptions(api_key=KEY, max_batch=1, max_queue=1, keepalive_s=0.05), session=sess)
    with serving(app) as base:
        wait_ready(base)
        yield base, app.state.server, sess
    sess.close()


def test_disconnect_mid_stream_frees_the_sequence(slow):
    base, server, _ = slow
    before = server.engine.stats()
    s, got = _raw_request(base, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 900,
                                                    "temperature": 0, "stream": True, "seed": 1},
                          read_until=b'"text"')
    s.close()
    t_close = time.perf_counter()
    dt, st = _wait_cancelled(server, before["cancelled"])
    gen_at_cancel = st["generated"]
    assert st["generated"] - before["generated"] < 900
    time.sleep(0.1)
    assert server.engine.stats()["generated"] == gen_at_cancel  # no token after the sequence ended
    print(f"mid-stream disconnect freed the sequence in {1000 * dt:.1f} ms "
          f"({1000 * (time.perf_counter() - t_close):.0f} ms incl. the check)")
    assert dt < 0.25


def test_disconnect_mid_prefill_and_not_streamed(slow, ref):
    base, server, sess = slow
    long_prompt = [1] + [7 + (i * 31) % 1000 for i in range(1000)]
    for body in ({"prompt": long_prompt, "max_tokens": 20, "temperature": 0},     # cancelled during its prefill
                 {"prompt": "Once upon a time", "max_tokens": 900, "temperature": 0}):  # during decode
        before = server.engine.stats()
        s, _ = _raw_request(base, "/v1/completions", body)
        while server.engine.stats()["running"] == 0:
            time.sleep(0.001)
        if "max_tokens" in body and body["max_tokens"] == 20:
            time.sleep(0.05)
            assert server.engine.stats()["generated"] == before["generated"], "prefill already over"
        s.close()
        dt, st = _wait_cancelled(server, before["cancelled"])
        assert st["generated"] - before["generated"] < body["max_tokens"]
        print(f"disconnect ({'prefill' if body['max_tokens'] == 20 else 'decode'}, not streamed) freed the "
              f"sequence in {1000 * dt:.1f} ms")
        assert dt < 0.25


def test_full_queue_is_503_with_retry_after_and_sdk_retries(slow):
    base, server, _ = slow
    hold = [_raw_request(base, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 400,
                                                   "temperature": 0, "stream": True}, read_until=b'"text"')[0]]
    hold.append(_raw_request(base, "/v1/completions", {"prompt": "x", "max_tokens": 5, "temperature": 0})[0])
    try:
        deadline = time.time() + 5
        while server.engine.in_flight < 2 and time.time() < deadline:
            time.sleep(0.001)
        r = httpx.post(base + "/v1/completions", json={"prompt": "y", "max_tokens": 2}, headers=auth())
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "busy" in r.json()["error"]["message"]
        # /health and /v1/models answer at once while every slot is busy
        with httpx.Client(base_url=base, headers=auth()) as hc:
            for path in ("/health", "/v1/models"):
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    assert hc.get(path).status_code == 200
                    times.append(time.perf_counter() - t0)
                assert sorted(times)[2] < 0.05, (path, times)
        c = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.InternalServerError):
            c.completions.create(model="x", prompt="y", max_tokens=2)
        statuses = []
        c = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=5, http_client=httpx.Client(
            event_hooks={"response": [lambda resp: statuses.append(resp.status_code)]}))
        for s in hold:  # free the slots in a moment; the SDK retries after Retry-After
            threading.Timer(0.3, s.close).start()
        r = c.completions.create(model="x", prompt="y", max_tokens=2, temperature=0)
        assert statuses[0] == 503 and statuses[-1] == 200 and r.choices[0].text is not None
    finally:
        for s in hold:
            s.close()


def test_keepalive_comments_while_queued(slow):
    base, server, _ = slow
    hold, _ = _raw_request(base, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 300,
                                                     "temperature": 0, "stream": True}, read_until=b'"text"')
    try:
        with httpx.stream("POST", base + "/v1/completions", headers=auth(),
                          json={"prompt": "x", "max_tokens": 2, "stream": True, "temperature": 0}) as r:
            first = next(r.iter_lines())
            assert first == ": keep-alive"
    finally:
        hold.close()


def test_metrics(srv, client):
    base, _ = srv
    client.completions.create(model="f32", prompt="x", max_tokens=3, temperature=0)
    text = httpx.get(base + "/metrics").text
    vals = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            vals[k] = float(v)
    for k in ("openelm_requests_running", "openelm_requests_waiting", "openelm_mean_batch_size",
              "openelm_requests_cancelled_total"):
        assert k in vals, k
    assert vals["openelm_prompt_tokens_total"] > 0 and vals["openelm_generation_tokens_total"] >= 3
    assert vals["openelm_time_to_first_token_seconds_count"] >= 1
    assert vals["openelm_inter_token_latency_seconds_count"] >= 2
    assert vals['openelm_requests_finished_total{reason="length"}'] >= 1


def _overhead(base):
    """{stage: (count, sum)} of openelm_server_overhead_seconds from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(httpx.get(base + "/metrics").text):
        if fam.name == "openelm_server_overhead_seconds":
            for smp in fam.samples:
                c, s = out.get(smp.labels["stage"], (0.0, 0.0))
                if smp.name.endswith("_count"):
                    c = smp.value
                elif smp.name.endswith("_sum"):
                    s = smp.value
                out[smp.labels["stage"]] = (c, s)
    return out


def test_server_overhead_metric_times_the_servers_own_path(srv, client, monkeypatch):
    """openelm_server_overhead_seconds: one admit per request, one first_token and ttft per stream
    and one token per later token chunk, one response per non-streamed request; the times are the
    server's own (a delay put into its chunk encoding shows up in full, the engine's does not)."""
    base, _ = srv
    from openelm_rt.serve import app as app_mod

    def deltas(fn):
        a = _overhead(base)
        fn()
        b = _overhead(base)
        return {k: (b[k][0] - a.get(k, (0, 0))[0], b[k][1] - a.get(k, (0, 0))[1]) for k in b}

    def stream():
        chunks = [c for c in client.completions.create(model="f32", prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                                       stream=True) if c.choices and c.choices[0].text]
        assert chunks

    d = deltas(stream)
    assert d["admit"][0] == 1 and d["first_token"][0] == 1 and d["ttft"][0] == 1 and d["response"][0] == 0
    assert 1 <= d["token"][0] <= 5  # the other tokens' chunks (a byte-fallback character may join tokens)
    assert d["ttft"][1] == pytest.approx(d["admit"][1] + d["first_token"][1], abs=1e-9)
    assert all(0 < s < 0.5 * max(c, 1) for c, s in d.values() if c), d
    d = deltas(lambda: client.chat.completions.create(model="f32", messages=[{"role": "user", "content": "hi"}],
                                                        max_tokens=4, temperature=0))
    assert d["admit"][0] == 1 and d["response"][0] == 1 and d["first_token"][0] == d["token"][0] == 0
    assert 0 < d["response"][1] < 0.5

    real = app_mod._sse

    def slow_sse(obj):
        time.sleep(0.03)
        return real(obj)
    monkeypatch.setattr(app_mod, "_sse", slow_sse)
    d = deltas(stream)
    n = d["first_token"][0] + d["token"][0]
    assert n >= 2 and (d["first_token"][1] + d["token"][1]) / n >= 0.03, d


def test_without_an_event_descriptor_a_thread_hands_the_events_over(tiny_f32, ref):
    """Where the engine has no event descriptor (Windows), a thread waits for the events and hands
    them to the loop: the same tokens, streamed and not."""
    ort = core_or_skip()
    sess = ort.Session(str(tiny_f32.oelm), threads=1, max_batch=2)

    class NoFd:
        def __init__(self, eng):
            self._e = eng

        def event_fd(self):
            return -1

        def __getattr__(self, name):
            return getattr(self._e, name)
    sess._engine = NoFd(sess._engine)
    app = create_app(ServeOptions(max_batch=2), session=sess)
    want = ref.generate(PROMPTS[1], max_new_tokens=8, temperature=0).text
    try:
        with serving(app) as base:
            wait_ready(base)
            eng = app.state.server.engine
            assert eng._fd is None and eng._pump is not None and eng._pump.is_alive()
            c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
            r = c.completions.create(model="f32", prompt=PROMPTS[1], max_tokens=8, temperature=0)
            assert r.choices[0].text == want
            got = "".join(ch.choices[0].text for ch in c.completions.create(
                model="f32", prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True) if ch.choices)
            assert got == want
        assert eng._pump is None
    finally:
        sess.close()


def test_the_loop_watches_the_engines_event_descriptor(srv):
    eng = srv[1].engine
    assert eng._fd is not None and eng._fd >= 0 and eng._pump is None


# ---------------------------------------------------------------------------------------------- load
@pytest.mark.parametrize("concurrency", [1, 4, 8, 16])
def test_bounded_load_every_response_complete_and_correct(srv, ref, concurrency):
    base, _ = srv
    n_req, max_tokens = 64, 12
    res = ref.generate_batch(PROMPTS, max_new_tokens=max_tokens, temperature=0)
    want, want_n = [r.text for r in res], [len(r.token_ids) for r in res]

    async def go():
        c = openai.AsyncOpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
        sem = asyncio.Semaphore(concurrency)

        async def one(i):
            async with sem:
                if i % 2:
                    r = await c.completions.create(model="f32", prompt=PROMPTS[i % 8], max_tokens=max_tokens,
                                                   temperature=0)
                    return r.choices[0].text, r.usage.completion_tokens
                text, n = "", 0
                async for ch in await c.completions.create(model="f32", prompt=PROMPTS[i % 8], max_tokens=max_tokens,
                                                           temperature=0, stream=True,
                                                           stream_options={"include_usage": True}):
                    if ch.choices:
                        text += ch.choices[0].text
                    if ch.usage:
                        n = ch.usage.completion_tokens
                return text, n
        out = await asyncio.gather(*(one(i) for i in range(n_req)))
        await c.close()
        return out
    out = asyncio.run(go())
    for i, (text, n) in enumerate(out):
        assert text == want[i % 8], i
        assert n == want_n[i % 8], i


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_serve_subprocess(tiny_f32, tmp_path):
    import subprocess
    import sys
    from conftest import env_with_pythonpath
    bad = subprocess.run([sys.executable, "-m", "openelm_rt", "serve", str(tmp_path / "nope.oelm")],
                         capture_output=True, text=True, env=env_with_pythonpath())
    assert bad.returncode == 2 and "no such file" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "openelm_rt", "serve", str(tiny_f32.oelm), "--prefill-chunk", "-1"],
                         capture_output=True, text=True, env=env_with_pythonpath())
    assert bad.returncode == 2 and "--prefill-chunk must be >= 0" in bad.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "openelm_rt", "serve", str(tiny_f32.oelm), "--port", str(port),
                          "--threads", "1", "--max-batch", "2", "--model-name", "tiny", "--log-level", "warning",
                          "--prefill-chunk", "8"],
                         env={**env_with_pythonpath(), "OPENELM_RT_API_KEY": "envkey"}, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, process=p)
        c = openai.OpenAI(base_url=base + "/v1", api_key="envkey", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["tiny"]
        assert c.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=0).usage.completion_tokens >= 1
    finally:
        p.terminate()  # uvicorn shuts down gracefully, then re-raises SIGTERM
        err = p.communicate(timeout=30)[1]
    assert p.returncode in (0, -15) and "Traceback" not in err, err


def test_prefill_chunk_reaches_the_engine(tiny_f32):
    """ServeOptions.prefill_chunk (--prefill-chunk) is the loaded engine's; None keeps the core's."""
    for chunk, want in ((8, 8), (None, 64)):
        app = create_app(ServeOptions(model=str(tiny_f32.oelm), threads=1, prefill_chunk=chunk))
        with serving(app) as base:
            wait_ready(base)
            assert app.state.server.session._engine.prefill_chunk == want
