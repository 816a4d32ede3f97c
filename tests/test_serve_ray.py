"""Scale-out on Ray (openelm_rt.serve.ray), on a local single-node Ray: two Ray Serve replicas
answer the openai SDK with the in-process greedy output, and Ray Data generation and scoring
equal Session's. Skips without the extra [ray]."""
from __future__ import annotations

import socket

import pytest

from conftest import core_or_skip

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "In 1492,"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_ray():
    core_or_skip()
    # Logical CPUs: 2 replicas x 1 thread, the proxy and controller, 2 Ray Data actors.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    from ray import serve
    serve.shutdown()
    ray.shutdown()


def test_ray_serve_two_replicas_answer_the_sdk(local_ray, tiny_f32):
    from ray import serve
    from openelm_rt import Session
    from openelm_rt.serve.ray import app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # the builder `serve run openelm_rt.serve.ray:app model=... threads=1 num_replicas=2 ...` calls
    serve.run(app({"model": str(tiny_f32.oelm), "threads": "1", "num_replicas": "2", "max_batch": "4",
                   "api_key": "k"}), name="openelm", route_prefix="/", blocking=False)
    st = serve.status().applications["openelm"]
    assert st.status == "RUNNING", st
    assert st.deployments["openelm"].replica_states.get("RUNNING") == 2
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
    with Session(str(tiny_f32.oelm), threads=1) as ref:
        for p in PROMPTS * 2:  # more requests than replicas
            r = c.completions.create(model="f32", prompt=p, max_tokens=12, temperature=0)
            assert r.choices[0].text == ref.generate(p, max_new_tokens=12, temperature=0).text
        msgs = [{"role": "user", "content": "Hello"}]
        chunks = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="f32", messages=msgs, max_tokens=10, temperature=0, stream=True) if ch.choices]
        assert "".join(chunks) == ref.chat(msgs, max_new_tokens=10, temperature=0).text
    serve.delete("openelm")


def test_ray_data_generation_and_scoring_equal_session(local_ray, tiny_f32):
    from openelm_rt import Session
    from openelm_rt.serve.ray import generate_dataset, score_dataset

    ds = ray.data.from_items([{"prompt": p} for p in PROMPTS * 3])
    rows = generate_dataset(ds, str(tiny_f32.oelm), concurrency=2, threads=1, batch_size=4,
                            max_new_tokens=10, temperature=0).take_all()
    assert len(rows) == len(PROMPTS) * 3
    with Session(str(tiny_f32.oelm), threads=1) as ref:
        for row in rows:
            want = ref.generate(row["prompt"], max_new_tokens=10, temperature=0)
            assert row["generated_text"] == want.text and row["generated_tokens"] == len(want.token_ids)
        pairs = [{"context": p, "continuation": " Paris"} for p in PROMPTS]
        scored = score_dataset(ray.data.from_items(pairs), str(tiny_f32.oelm), concurrency=1).take_all()
        for row in scored:
            want = ref.score(ref.tokenize(row["context"]), ref.tokenize(" Paris", add_bos=False))
            assert row["logprob"] == pytest.approx(want.total, abs=1e-9) and row["is_greedy"] == want.is_greedy
