"""The CUDA backend from Python: Session(backend="cuda" | "auto"), openelm_rt.cuda_info(), the CLI.

Without a usable device (CI, this machine) the tests check that the backend reports itself
unavailable with the reason and the fix, that "auto" falls back to the CPU, and skip the rest.
On a GPU (benchmarks/cuda_check.sh) they compare the CUDA session with the CPU one on the
tiny models: logits, greedy tokens, batched generation and scoring. The kernels and the
released model shapes are checked by tests/cpp/cuda_check.cpp.
"""
import subprocess
import sys

import numpy as np
import pytest

from conftest import env_with_pythonpath, prompt_ids


@pytest.fixture(scope="module")
def info(ort):
    return ort.cuda_info()


@pytest.fixture(scope="module")
def gpu(info):
    if not info["available"]:
        pytest.skip(f"no CUDA device: {info['reason']}")
    return info


def test_cuda_info_says_what_is_there(info):
    assert set(info) == {"compiled", "available", "reason", "device"}
    assert isinstance(info["compiled"], bool) and isinstance(info["available"], bool)
    if info["available"]:
        assert info["compiled"] and info["device"] and not info["reason"]
    else:
        assert info["device"] == ""
        # the reason names the way out: another backend, or a build with CUDA
        assert "cpu" in info["reason"] or "OPENELM_RT_CUDA" in info["reason"], info["reason"]
    if not info["compiled"]:
        assert "OPENELM_RT_CUDA=ON" in info["reason"]


def test_backend_names(ort, info):
    names = ort._core.Backend.names()
    assert {"cpu", "ref"} <= set(names)
    assert ("cuda" in names) == info["compiled"]


def test_unavailable_cuda_is_a_clear_error(ort, info, tiny_f32):
    if info["available"]:
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError) as e:
        ort.Session(str(tiny_f32.oelm), backend="cuda")
    assert "cuda" in str(e.value) and info["reason"] in str(e.value)


def test_bad_backend_name(ort, tiny_f32):
    with pytest.raises(ValueError, match="'cpu', 'cuda', 'auto' or 'ref'"):
        ort.Session(str(tiny_f32.oelm), backend="gpu")


def test_auto_picks_cuda_when_available(ort, info, tiny_f32):
    ids = prompt_ids(12)
    with ort.Session(str(tiny_f32.oelm), backend="auto", threads=1, max_batch=2) as s:
        assert s.backend == ("cuda" if info["available"] else "cpu")
        got = s.generate(ids, max_new_tokens=8).token_ids
    with ort.Session(str(tiny_f32.oelm), backend="cpu", threads=1, max_batch=2) as c:
        assert got == c.generate(ids, max_new_tokens=8).token_ids


def test_cli_backend_auto(tiny_f32):
    r = subprocess.run([sys.executable, "-m", "openelm_rt", "generate", "--model", str(tiny_f32.oelm), "--prompt", "hello",
                        "--max-new-tokens", "4", "--backend", "auto", "--no-stream"],
                       capture_output=True, text=True, env=env_with_pythonpath(), timeout=120)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------- on a device only

def _logit_tol(want, weights_dtype):
    # f32 arithmetic in another order, layer after layer: 1e-3 of the row's largest logit.
    return (1e-3 if weights_dtype in ("f32", "f16", "bf16") else 2e-2) * np.abs(want).max(axis=-1, keepdims=True)


@pytest.mark.parametrize("name", ["f32", "bf16", "untied"])
def test_logits_match_cpu(ort, gpu, tiny_models, name):
    m = tiny_models[name]
    ids = prompt_ids(40)
    with ort.Session(str(m.oelm), backend="cuda") as g, ort.Session(str(m.oelm), backend="cpu", exact=True) as c:
        got, want = g.logits(ids), c.logits(ids)
        assert got.shape == want.shape
        assert np.all(np.abs(got - want) <= _logit_tol(want, g._model.weights_dtype))


def test_greedy_tokens_match_cpu_f32(ort, gpu, tiny_f32):
    with ort.Session(str(tiny_f32.oelm), backend="cuda") as g, ort.Session(str(tiny_f32.oelm)) as c:
        for n in (3, 17, 40):
            ids = prompt_ids(n)
            assert g.generate(ids, max_new_tokens=24).token_ids == c.generate(ids, max_new_tokens=24).token_ids


def test_batched_equals_alone(ort, gpu, tiny_f32):
    prompts = [prompt_ids(n, seed=n) for n in (5, 23, 9, 31)]
    with ort.Session(str(tiny_f32.oelm), backend="cuda", max_batch=4, prefix_cache=0) as g:
        alone = [g.generate(p, max_new_tokens=16).token_ids for p in prompts]
        batched = [r.token_ids for r in g.generate_batch(prompts, max_new_tokens=16)]
    assert batched == alone


def test_score_batch_matches_cpu(ort, gpu, tiny_f32):
    pairs = [(prompt_ids(10, seed=i), prompt_ids(6, seed=100 + i, bos=False)) for i in range(6)]
    with ort.Session(str(tiny_f32.oelm), backend="cuda") as g, ort.Session(str(tiny_f32.oelm)) as c:
        got, want = g.score_batch(pairs), c.score_batch(pairs)
    for a, b in zip(got, want):
        assert np.allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-3)


def test_serve_has_backend_option():
    r = subprocess.run([sys.executable, "-m", "openelm_rt", "serve", "--help"], capture_output=True, text=True,
                       env=env_with_pythonpath(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--backend" in r.stdout and "auto" in r.stdout
