"""Every kernel variant this CPU can run, through the whole model: logits against the NumPy
oracle, bitwise thread-count and prefill/decode invariance, and the OPENELM_RT_KERNELS switch.

Kernel-by-kernel comparisons with the scalar reference on every OpenELM matrix shape live in
the C++ kernel checker (tests/cpp); this file checks that a variant, once dispatched, runs
the model correctly.
"""
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import oracle
from conftest import PROMPT_LENGTHS, env_with_pythonpath, prompt_ids

REL_TOL = 1e-4  # as test_forward: max |runtime - oracle| <= REL_TOL * max |oracle|


def _variants():
    from openelm_rt import _core
    return _core.Backend.kernel_variants()


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _ctx(core, model, variant, threads=1, max_context=256, exact=True):
    # exact: bf16 weights times f32 activations, what the oracle computes (the bf16 fast path
    # has its own tests in test_forward.py and tests/cpp/kernel_check.cpp).
    backend = core.Backend("cpu", threads, kernels=variant, exact=exact)
    assert backend.kernels == variant
    return core.Context(model, max_context, backend)


@pytest.fixture(scope="module")
def core():
    from openelm_rt import _core
    return _core


@pytest.fixture(scope="module")
def oracle_cache():
    return {}


def test_variants_follow_cpu_features(core):
    """The list agrees with the kernel's own view of the CPU (/proc/cpuinfo), not only with
    the library's detection."""
    got = core.Backend.kernel_variants()
    assert got[-1] == "ref"
    assert core.Backend("cpu", 1).kernels == got[0], "auto must pick the fastest supported variant"
    flags = _cpu_flags()
    if platform.machine() not in ("x86_64", "AMD64") or not flags:
        pytest.skip("x86 Linux only")
    avx2 = {"avx2", "fma", "f16c"} <= flags
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    vnni = avx512 and "avx512_vnni" in flags
    bf16 = vnni and "avx512_bf16" in flags
    expected = [n for n, ok in (("avx512bf16", bf16), ("avx512vnni", vnni), ("avx512", avx512), ("avx2", avx2))
                if ok]
    assert got == expected + ["ref"]


@pytest.mark.parametrize("variant", _variants())
@pytest.mark.parametrize("kind", ["f32", "untied"])
def test_variant_logits_match_oracle(core, tiny_models, oracle_cache, variant, kind):
    m = tiny_models[kind]
    model = core.Model(str(m.oelm), False)
    for n in PROMPT_LENGTHS:
        ids = prompt_ids(n, m.cfg["vocab_size"])
        key = (kind, n)
        if key not in oracle_cache:
            oracle_cache[key] = oracle.forward(m.weights, m.cfg, ids)
        ref = oracle_cache[key]
        got = np.asarray(_ctx(core, model, variant).eval(ids, True), np.float64)
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err <= REL_TOL, f"{variant}/{kind}/T={n}: rel err {err:.3e} > {REL_TOL}"


@pytest.mark.parametrize("variant", _variants())
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_variant_16bit_matches_rounded_oracle(core, tiny_f32, tiny_f32_export, oracle_cache, variant, dtype):
    weights = oracle.round_weights(tiny_f32.weights, dtype)
    model = core.Model(str(tiny_f32_export[dtype]), False)
    n = max(PROMPT_LENGTHS)
    ids = prompt_ids(n, tiny_f32.cfg["vocab_size"])
    key = (dtype, n)
    if key not in oracle_cache:
        oracle_cache[key] = oracle.forward(weights, tiny_f32.cfg, ids)
    ref = oracle_cache[key]
    got = np.asarray(_ctx(core, model, variant).eval(ids, True), np.float64)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= REL_TOL, f"{variant}/{dtype}: rel err {err:.3e} > {REL_TOL}"


@pytest.mark.parametrize("variant", _variants())
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "bf16-fast"])
def test_variant_is_bitwise_deterministic(core, tiny_f32, tiny_f32_export, variant, dtype):
    """Splitting rows over threads and batching tokens must not change a single bit (bf16-fast:
    the bf16 weights with activations rounded to bf16, where the variant has that path)."""
    exact = dtype != "bf16-fast"
    dtype = dtype.split("-")[0]
    path = tiny_f32.oelm if dtype == "f32" else tiny_f32_export[dtype]
    model = core.Model(str(path), False)
    ids = prompt_ids(23, tiny_f32.cfg["vocab_size"])
    batched = _ctx(core, model, variant, threads=1, exact=exact).eval(ids, True)
    two = _ctx(core, model, variant, threads=2, exact=exact).eval(ids, True)
    np.testing.assert_array_equal(batched, two, err_msg=f"{variant}: 1 vs 2 threads")
    ctx = _ctx(core, model, variant, exact=exact)
    one_by_one = np.stack([np.reshape(ctx.eval([t], False), -1) for t in ids])
    np.testing.assert_array_equal(batched, one_by_one, err_msg=f"{variant}: prefill vs token by token")


def _kernels_in_subprocess(value):
    env = env_with_pythonpath()
    env["OPENELM_RT_KERNELS"] = value
    code = "from openelm_rt import _core; print(_core.Backend('cpu', 1).kernels)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("variant", _variants())
def test_environment_variable_forces_variant(variant):
    r = _kernels_in_subprocess(variant)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == variant


def test_environment_variable_rejects_unknown_variant():
    r = _kernels_in_subprocess("sse9")
    assert r.returncode != 0
    assert "OPENELM_RT_KERNELS" in r.stderr and "unknown kernel variant 'sse9'" in r.stderr
    assert "ref" in r.stderr, "the message must list the choices"


def test_backend_rejects_kernels_for_ref_backend(core):
    with pytest.raises(ValueError, match="backend 'ref' always runs the reference kernels"):
        core.Backend("ref", 1, kernels=_variants()[0] if _variants()[0] != "ref" else "avx2")


def test_ffn_width_off_panel_uses_unfused_swiglu(core, work_dir, tokenizer_path):
    """gate/up + SwiGLU is fused per 16-row panel; an FFN width that is not a multiple of 16
    (possible with ffn_dim_divisor 8) must take the unfused path and still be right."""
    from conftest import build_model
    from openelm_rt.hf_config import parse_config
    m = build_model(work_dir, tokenizer_path, "ffn_div8", seed=5, config_overrides={"ffn_dim_divisor": 8})
    assert any(f % 16 for f in parse_config(m.cfg).ffn_dim), "the config must have an FFN width % 16 != 0"
    ids = prompt_ids(9, m.cfg["vocab_size"])
    ref = oracle.forward(m.weights, m.cfg, ids)
    model = core.Model(str(m.oelm), False)
    for variant in _variants():
        got = np.asarray(_ctx(core, model, variant, threads=2).eval(ids, True), np.float64)
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err <= REL_TOL, f"{variant}: rel err {err:.3e} > {REL_TOL}"


def test_session_reports_the_forced_variant(tiny_f32):
    """Session.kernels (and its repr) names the variant the environment variable chose."""
    variant = _variants()[-2] if len(_variants()) > 1 else "ref"
    env = env_with_pythonpath()
    env["OPENELM_RT_KERNELS"] = variant
    code = ("import sys, openelm_rt; s = openelm_rt.Session(sys.argv[1], threads=1); "
            "print(s.kernels); print(repr(s))")
    r = subprocess.run([sys.executable, "-c", code, str(tiny_f32.oelm)], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    name, rep = r.stdout.splitlines()
    assert name == variant and f"kernels={variant!r}" in rep
