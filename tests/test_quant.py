"""Block-quantized weights (q8_b32r16i, q4_b32r16i): the NumPy quantizer and packer against
docs/FORMAT.md and llama.cpp's Q8_0 / Q4_0 rules, and every registered backend's kernels
(row decoding, activation quantization, the integer matmul) against NumPy.

Tolerances are stated where they are used, with what they protect.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from openelm_rt import quant
from openelm_rt.hf_config import PRESETS, parse_config, tensor_layout

QTYPES = (quant.Q8, quant.Q4, quant.Q6, quant.Q5)  # q4k has more parts: tests/test_q4k.py
QRANGE = {quant.Q8: (-127, 127), quant.Q4: (-8, 7), quant.Q6: (-32, 31), quant.Q5: (-16, 15)}
# Shapes that are not multiples of the panel (16 rows) or block (32 columns) size.
ODD_SHAPES = [(1, 1), (1, 31), (5, 33), (16, 32), (17, 64), (31, 95), (40, 100), (33, 257)]


def f16(x) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16)


def llama_q8_0(wb: np.ndarray):
    """llama.cpp quantize_row_q8_0_ref on blocks wb [n, 32]: (d f16, q) with q = roundf(x / d)
    (halves away from zero) computed with the unrounded d."""
    amax = np.abs(wb).max(axis=1)
    d = amax / np.float32(127)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    v = wb * inv[:, None]
    q = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))
    return f16(d), q


def llama_q4_0(wb: np.ndarray):
    """llama.cpp quantize_row_q4_0_ref on blocks wb [n, 32]: d = max / -8 with max the signed
    value of largest magnitude (first on a tie), q = min(15, (int8)(x / d + 8.5)) - 8."""
    mx = wb[np.arange(len(wb)), np.abs(wb).argmax(axis=1)]
    d = mx / np.float32(-8)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    q = np.minimum(15, np.trunc(wb * inv[:, None] + np.float32(8.5))) - 8
    return f16(d), q


def block_sq_err(wb: np.ndarray, d16: np.ndarray, q: np.ndarray) -> np.ndarray:
    r = wb.astype(np.float64) - d16.astype(np.float64)[:, None] * q
    return (r * r).sum(axis=1)


def blocks_of(w: np.ndarray) -> np.ndarray:
    K = w.shape[1]
    return np.pad(w, ((0, 0), (0, quant.padded_k(K) - K))).reshape(-1, quant.QBLOCK)


def test_tensor_nbytes_formula():
    assert quant.tensor_nbytes(quant.Q8, (32000, 2048)) == 2000 * 17 * 2048
    assert quant.tensor_nbytes(quant.Q4, (32000, 2048)) == 2000 * 9 * 2048
    assert quant.tensor_nbytes(quant.Q8, (17, 33)) == 2 * 17 * 64       # Np 32, Kp 64
    assert quant.tensor_nbytes(quant.Q4, (1, 1)) == 1 * 9 * 32
    assert quant.tensor_nbytes(quant.Q6, (32000, 2048)) == 2000 * 13 * 2048
    assert quant.tensor_nbytes(quant.Q5, (17, 33)) == 2 * 11 * 64
    assert quant.tensor_nbytes("f16", (3, 5)) == 30
    with pytest.raises(ValueError, match="2-D"):
        quant.tensor_nbytes(quant.Q8, (64,))


# ----------------------------------------------------------------------------- layout

def _layout_by_formula(d: np.ndarray, q: np.ndarray, dtype: str, N: int, K: int) -> bytes:
    """FORMAT.md's byte-placement table, applied weight by weight (independent of pack_*)."""
    Np, Kp = quant.padded_n(N), quant.padded_k(K)
    col = {quant.Q8: 17, quant.Q6: 13, quant.Q5: 11, quant.Q4: 9}[dtype]
    bb = 32 * col  # bytes of one block of a panel: 32 of scales, then 512 (q8), 384, 320 or 256 (q4)
    off = -QRANGE[dtype][0] if dtype != quant.Q8 else 128
    hb = {quant.Q6: 2, quant.Q5: 1}.get(dtype, 0)
    out = bytearray(Np // 16 * col * Kp)
    for n in range(Np):  # padding rows keep q = 0 (stored u = offset) and scale 0
        base, r = n // 16 * col * Kp, n % 16
        for b in range(Kp // 32):
            if n < N:
                out[base + bb * b + 2 * r: base + bb * b + 2 * r + 2] = f16(d[n, b]).tobytes()
            for c in range(32):
                u = (int(q[n, 32 * b + c]) if n < N else 0) + off
                if dtype == quant.Q8:
                    out[base + bb * b + 32 + 64 * (c // 4) + 4 * r + c % 4] = u
                    continue
                at = base + bb * b + 32 + 64 * ((c % 16) // 4) + 4 * r + c % 4
                out[at] |= (u & 15) << (4 if c >= 16 else 0)
                if hb:
                    v = 2 * ((c % 16) // 4) + c // 16
                    at = base + bb * b + 288 + 64 * (hb * v // 8) + 4 * r + c % 4
                    out[at] |= (u >> 4) << (hb * v % 8)
    return bytes(out)


@pytest.mark.parametrize("dtype", QTYPES)
@pytest.mark.parametrize("N, K", [(1, 1), (17, 33), (40, 100), (16, 64)])
def test_pack_matches_format_md_byte_table(dtype, N, K):
    rng = np.random.default_rng(N * 1000 + K)
    w = rng.standard_normal((N, K)).astype(np.float32)
    quantize, pack = quant._QUANTIZE[dtype]
    d, q = quantize(w)
    assert d.dtype == np.float16 and q.dtype == np.int8
    assert d.shape == (N, quant.padded_k(K) // 32) and q.shape == (N, quant.padded_k(K))
    assert not q[:, K:].any()  # padding columns quantize to 0
    raw = pack(d, q, N, K)
    assert len(raw) == quant.tensor_nbytes(dtype, (N, K))
    assert raw == _layout_by_formula(d, q, dtype, N, K)
    d2, q2 = quant.unpack(raw, dtype, N, K)
    assert np.array_equal(d2.view(np.uint16), d.view(np.uint16)) and np.array_equal(q2, q)
    assert raw == quant.quantize_packed(w, dtype)


# ----------------------------------------------------------------------------- quantizer rules

def test_q8_rule_and_never_worse_than_llama_q8_0():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 320)) * rng.uniform(0.001, 3, (64, 1))).astype(np.float32)
    w[3, 64:96] = 0  # an all-zero block
    d, q = quant.quantize_q8(w)
    wb = blocks_of(w)
    d_b, q_b = d.reshape(-1), q.reshape(-1, 32).astype(np.float64)
    assert np.array_equal(d_b.view(np.uint16), f16(np.abs(wb).max(axis=1) / np.float32(127)).view(np.uint16))
    dd = d_b.astype(np.float32)
    safe = np.where(dd == 0, 1, dd)
    assert np.array_equal(q_b, np.where(dd[:, None] == 0, 0, np.clip(np.rint(wb / safe[:, None]), -127, 127)))
    assert d[3, 2] == 0 and not q[3, 64:96].any()
    # f16(amax / 127) is within 2^-11 of amax / 127, so nothing clips: |w - d q| <= d / 2.
    err = np.abs(wb - dd[:, None] * q_b)
    assert np.all(err <= dd[:, None] / 2 * (1 + 1e-6))
    ld, lq = llama_q8_0(wb)
    assert np.array_equal(ld.view(np.uint16), d_b.view(np.uint16))  # same scale as Q8_0
    assert np.all(block_sq_err(wb, d_b, q_b) <= block_sq_err(wb, ld, lq))


@pytest.mark.parametrize("dist", ["normal", "laplace", "student_t3"])
def test_q4_never_worse_than_llama_q4_0_per_block(dist):
    rng = np.random.default_rng(2)
    shape = (256, 1024)
    w = {"normal": lambda: rng.standard_normal(shape),
         "laplace": lambda: rng.laplace(size=shape),
         "student_t3": lambda: rng.standard_t(3, size=shape)}[dist]().astype(np.float32) * 0.02
    d, q = quant.quantize_q4(w)
    wb = blocks_of(w)
    d_b, q_b = d.reshape(-1), q.reshape(-1, 32).astype(np.float64)
    ours = block_sq_err(wb, d_b, q_b)
    ld, lq = llama_q4_0(wb)
    theirs = block_sq_err(wb, ld, lq)
    # Per block: never larger, up to the float32 rounding of w / d on a near-tie (1e-6).
    assert np.all(ours <= theirs * (1 + 1e-6)), float((ours / theirs).max())
    # In total the search must really help: measured 9.5% / 7.5% / 5.7% lower MSE.
    assert ours.sum() <= 0.96 * theirs.sum(), float(ours.sum() / theirs.sum())
    # The rule: d is one of the candidates, q the clamped nearest integers of w / d.
    mx = wb[np.arange(len(wb)), np.abs(wb).argmax(axis=1)]
    cands = np.stack([f16(mx / np.float32(-m)) for m in quant.Q4_CANDIDATES], axis=1)
    assert np.all((cands.view(np.uint16) == d_b.view(np.uint16)[:, None]).any(axis=1))
    dd = d_b.astype(np.float32)
    assert np.array_equal(q_b, np.clip(np.rint(wb / dd[:, None]), -8, 7))


@pytest.mark.parametrize("dtype", QTYPES)
def test_round_trip_error_bounds(dtype):
    """Relative RMS error of quantize -> dequantize on N(0, 0.02) weights: q8 measured 0.0057,
    q6 0.0201, q5 0.0402, q4 0.095 (Q4_0: 0.099); bounds with ~10% margin."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((300, 1000)) * 0.02).astype(np.float32)
    back = quant.dequantize(quant.quantize_packed(w, dtype), dtype, 300, 1000)
    rel = float(np.sqrt(((back - w) ** 2).mean() / (w ** 2).mean()))
    assert rel <= {quant.Q8: 0.0063, quant.Q6: 0.022, quant.Q5: 0.044, quant.Q4: 0.105}[dtype], rel


@pytest.mark.parametrize("dtype", QTYPES)
def test_zero_blocks_and_extremes(dtype):
    w = np.zeros((3, 40), np.float32)
    w[1, 33] = -1e-30  # below every binary16 scale: rounds to scale 0, q 0
    w[2, :] = np.linspace(-400, 400, 40)
    d, q = quant._QUANTIZE[dtype][0](w)
    assert not d[0].any() and not q[0].any()
    assert d[1, 1] == 0 and not q[1].any()
    back = quant.dequantize(quant.quantize_packed(w, dtype), dtype, 3, 40)
    assert np.all(back[:2] == 0)
    assert np.abs(back[2] - w[2]).max() <= {quant.Q8: 400 / 127, quant.Q6: 400 / 31, quant.Q5: 400 / 15,
                                            quant.Q4: 400 / 7}[dtype]


@pytest.mark.parametrize("dtype", quant.QUANT_DTYPES)
def test_quantizer_refuses_what_it_cannot_store(dtype):
    with pytest.raises(ValueError, match="2-D"):
        quant.quantize_packed(np.ones(64, np.float32), dtype)
    bad = np.ones((4, 64), np.float32)
    bad[2, 5] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        quant.quantize_packed(bad, dtype)
    with pytest.raises(ValueError, match="binary16"):
        quant.quantize_packed(np.full((1, 32), 1e10, np.float32), dtype)
    with pytest.raises(ValueError, match="bytes"):
        if dtype == quant.Q4K:
            quant.unpack_q4k(b"\0" * 10, 16, 32)
        else:
            quant.unpack(b"\0" * 10, dtype, 16, 32)


# ----------------------------------------------------------------------------- kernels

def random_packed(rng, dtype: str, N: int, K: int):
    """(raw bytes as uint8, d [N, nb] f16, q [N, Kp] int8) with random integers over the whole
    range (padding columns zero) and random normal binary16 scales of mixed magnitude."""
    lo, hi = QRANGE[dtype]
    Kp = quant.padded_k(K)
    q = rng.integers(lo, hi + 1, size=(N, Kp), dtype=np.int8)
    q[:, K:] = 0
    d = f16(rng.uniform(0.5, 2, (N, Kp // 32)) * 2.0 ** rng.integers(-12, 0, (N, Kp // 32)))
    pack = quant._QUANTIZE[dtype][1]
    return np.frombuffer(pack(d, q, N, K), np.uint8), d, q


def quantize_acts(x: np.ndarray):
    """kernels.h's activation rule in float32, per row of x [T, K]: d = amax / 127,
    q = nearbyint(x * (127 / amax)), s = sum q; zero padding to Kp."""
    T, K = x.shape
    xb = np.pad(x.astype(np.float32), ((0, 0), (0, quant.padded_k(K) - K))).reshape(T, -1, 32)
    amax = np.abs(xb).max(axis=2)
    d = amax / np.float32(127)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(xb * inv[:, :, None]).astype(np.int8)
    return q.reshape(T, -1), d, q.astype(np.int32).sum(axis=2)


def reference_qmatmul(x: np.ndarray, d: np.ndarray, q: np.ndarray):
    """float64 sum over blocks of isum * x.d * w.d (the kernel's math without float32
    rounding), and the sum of the terms' magnitudes (the scale of the rounding error)."""
    xq, xd, _ = quantize_acts(x)
    T, N, nb = x.shape[0], q.shape[0], d.shape[1]
    isum = np.einsum("nbc,tbc->tnb", q.reshape(N, nb, 32).astype(np.int32),
                     xq.reshape(T, nb, 32).astype(np.int32))
    terms = isum * xd.astype(np.float64)[:, None, :] * d.astype(np.float64)[None, :, :]
    return terms.sum(axis=2), np.abs(terms).sum(axis=2)


@pytest.fixture(scope="module", params=["ref", "cpu"])
def backend(request, ort):
    from openelm_rt import _core
    return _core.Backend(request.param, 1 if request.param == "ref" else 3)


@pytest.mark.parametrize("dtype", QTYPES)
@pytest.mark.parametrize("N, K", ODD_SHAPES)
def test_row_to_f32_bit_exact_with_numpy_dequantize(backend, dtype, N, K):
    rng = np.random.default_rng(N * 7 + K)
    raw, _, _ = random_packed(rng, dtype, N, K)
    want = quant.dequantize(raw, dtype, N, K)
    got = np.stack([backend.kernel_row_to_f32(raw, dtype, N, K, r) for r in range(N)])
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    w = rng.standard_normal((N, K)).astype(np.float32)  # and on a real quantization
    raw = np.frombuffer(quant.quantize_packed(w, dtype), np.uint8)
    got = np.stack([backend.kernel_row_to_f32(raw, dtype, N, K, r) for r in range(N)])
    assert np.array_equal(got.view(np.uint32), quant.dequantize(raw, dtype, N, K).view(np.uint32))


@pytest.mark.parametrize("K", [1, 5, 31, 32, 33, 100, 2048])
def test_activation_quantization_bit_exact(backend, K):
    rng = np.random.default_rng(K)
    x = (rng.standard_normal((4, K)) * rng.uniform(1e-3, 1e3, (4, 1))).astype(np.float32)
    x[1, :32] = 0                       # an all-zero block
    x[2, :] = np.round(x[2, :])         # integers: exercise exact ties of x * 127 / amax
    x[2, 0] = 254                       # amax = 254, so odd integers land on .5
    qw, dw, sw = quantize_acts(x)
    for t in range(4):
        q, d, s = backend.kernel_quantize_row(x[t])
        assert np.array_equal(q, qw[t]) and np.array_equal(s, sw[t])
        assert np.array_equal(d.view(np.uint32), dw[t].view(np.uint32))


# The kernel's float32 accumulation over nb blocks (one fma each) against float64: the
# error is at most ~nb * 2^-24 of the sum of |terms|; measured <= 3.4e-7 of it here.
QMATMUL_REL = 1e-5


def check_qmatmul(backend, dtype, N, K, T, rng):
    raw, d, q = random_packed(rng, dtype, N, K)
    x = (rng.standard_normal((T, K)) * rng.uniform(0.1, 10, (T, 1))).astype(np.float32)
    y = backend.kernel_matmul(raw, dtype, N, K, x)
    assert y.shape == (T, N) and y.dtype == np.float32
    want, scale = reference_qmatmul(x, d, q)
    err = np.abs(y - want)
    assert np.all(err <= QMATMUL_REL * scale + 1e-30), \
        f"{dtype} [{N}, {K}] T={T}: worst {float((err / np.maximum(scale, 1e-30)).max()):.3g}"
    return raw, x, y


@pytest.mark.parametrize("dtype", QTYPES)
@pytest.mark.parametrize("N, K", ODD_SHAPES + [(300, 2048)])
def test_qmatmul_matches_float64_of_same_math(backend, dtype, N, K):
    rng = np.random.default_rng(N * 31 + K)
    for T in (1, 3):
        raw, x, y = check_qmatmul(backend, dtype, N, K, T, rng)
    # Against the float32 product with the dequantized weights: the only difference is the
    # activations' rounding, at most amax_b / 254 per activation of block b, so
    # |y - x W^T| <= sum_b (amax_b / 254) * sum_{k in b} |w_k| (+ float rounding).
    w = quant.dequantize(raw, dtype, N, K).astype(np.float64)
    xb = np.pad(x, ((0, 0), (0, quant.padded_k(K) - K))).reshape(len(x), -1, 32)
    step = np.abs(xb).max(axis=2) / 254
    wabs = np.abs(np.pad(w, ((0, 0), (0, quant.padded_k(K) - K)))).reshape(N, -1, 32).sum(axis=2)
    bound = step @ wabs.T
    exact = x.astype(np.float64) @ w.T
    assert np.all(np.abs(y - exact) <= bound * 1.001 + 1e-6 * np.abs(exact).max())


def _openelm_shapes(presets) -> list:
    shapes = set()
    for p in presets:
        spec = parse_config(PRESETS[p])
        shapes |= {t.shape for t in tensor_layout(spec) if not t.is_norm}
    return sorted(shapes)


ALL_PRESETS = ("270M", "450M", "1_1B", "3B")


def test_openelm_shape_sets_are_multiples_of_the_tiles():
    """Why the sweep below may split N and K: every real OpenELM matrix has N % 16 == 0 and
    K % 256 == 0, rows are independent and blocks are summed one by one."""
    shapes = _openelm_shapes(ALL_PRESETS)
    assert len(shapes) == 206
    assert all(N % 16 == 0 and K % 256 == 0 for N, K in shapes)


@pytest.mark.parametrize("dtype", QTYPES)
def test_qmatmul_every_openelm_k_and_n(backend, dtype):
    """Every K of the four sizes (with 48 rows) and every N (with K = 32), one token. Every
    full (N, K) of the four sizes (206 matrices, 3.8e9 weights; about a minute per case here)
    runs with OPENELM_RT_SLOW=1."""
    rng = np.random.default_rng(5)
    shapes = _openelm_shapes(ALL_PRESETS)
    for K in sorted({K for _, K in shapes}):
        check_qmatmul(backend, dtype, 48, K, 1, rng)
    for N in sorted({N for N, _ in shapes}):
        check_qmatmul(backend, dtype, N, 32, 1, rng)
    if os.environ.get("OPENELM_RT_SLOW") == "1":
        for N, K in shapes:
            check_qmatmul(backend, dtype, N, K, 2, rng)


def test_kernel_bindings_validate(backend):
    raw = np.zeros(quant.tensor_nbytes(quant.Q8, (16, 32)), np.uint8)
    with pytest.raises(ValueError, match="bytes"):
        backend.kernel_matmul(raw[:-1], quant.Q8, 16, 32, np.zeros((1, 32), np.float32))
    with pytest.raises(ValueError, match="K = 32"):
        backend.kernel_matmul(raw, quant.Q8, 16, 32, np.zeros((1, 31), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        backend.kernel_matmul(raw, "q3", 16, 32, np.zeros((1, 32), np.float32))
    assert backend.kernel_matmul(raw, quant.Q8, 16, 32, np.ones((2, 32), np.float32)).tolist() == [[0.0] * 16] * 2


def test_every_kernel_variant_bitwise_equal_to_ref(ort):
    """kernels.h fixes the arithmetic (exact integer block sums, one fma per block in block
    order, the activation rule), so every kernel variant this CPU runs gives the reference's
    activation integers, scales and matmul results to the bit, for any thread count."""
    from openelm_rt import _core
    ref = _core.Backend("ref", 1)
    cpus = [_core.Backend("cpu", n, kernels=v) for v in _core.Backend.kernel_variants() for n in (1, 3)]
    rng = np.random.default_rng(6)
    for dtype in QTYPES:
        for N, K, T in [(33, 257, 1), (300, 2048, 5), (48, 768, 17), (16, 96, 7)]:
            raw, _, _ = random_packed(rng, dtype, N, K)
            x = rng.standard_normal((T, K)).astype(np.float32)
            x[0, :32] = 0
            want = ref.kernel_matmul(raw, dtype, N, K, x)
            acts = ref.kernel_quantize_row(x[-1])
            for b in cpus:
                what = (b.kernels, b.threads, dtype, N, K, T)
                assert np.array_equal(b.kernel_matmul(raw, dtype, N, K, x), want), what
                for got, exp in zip(b.kernel_quantize_row(x[-1]), acts):
                    assert np.array_equal(got.view(np.uint8), exp.view(np.uint8)), what


# ----------------------------------------------------------------------------- export and model

import oracle  # noqa: E402  (tests/ is on sys.path via conftest)
from conftest import prompt_ids  # noqa: E402

# (file name, --dtype, --embedding-dtype) exports of the tiny f32 checkpoint.
Q_EXPORTS = {"q8": ("q8", None), "q4": ("q4", None), "q4e4": ("q4", "q4"), "q8ef16": ("q8", "f16"),
             "q6": ("q6", None), "q5": ("q5", None), "q4e6": ("q4", "q6"), "q5e6": ("q5", "q6"),
             "q4k": ("q4k", None)}


@pytest.fixture(scope="module")
def q_exports(tiny_f32, work_dir, tokenizer_path):
    from openelm_rt import export
    return {name: export.export_checkpoint(tiny_f32.ckpt_dir, work_dir / f"f32_as_{name}.oelm",
                                           dtype=dt, embedding_dtype=edt, tokenizer=tokenizer_path)
            for name, (dt, edt) in Q_EXPORTS.items()}


def _spec(tiny):
    return parse_config(tiny.cfg)


@pytest.mark.parametrize("name", list(Q_EXPORTS))
def test_export_stores_the_numpy_quantization(tiny_f32, q_exports, name):
    from openelm_rt.export import read_oelm
    dt, edt = Q_EXPORTS[name]
    wdt = {"q8": quant.Q8, "q6": quant.Q6, "q5": quant.Q5, "q4": quant.Q4, "q4k": quant.Q4K}[dt]
    default_head = {"q4": quant.Q8, "q4k": quant.Q6}.get(dt, wdt)  # q4's default head: q8, q4k's q6
    edt = {None: default_head, "q4": quant.Q4, "q6": quant.Q6, "f16": "f16"}[edt]
    with read_oelm(q_exports[name]) as f:
        assert f.metadata["weights_dtype"] == wdt and f.metadata["embedding_dtype"] == edt
        table = {t["name"]: t for t in f.metadata["tensors"]}
        for t in tensor_layout(_spec(tiny_f32)):
            w = tiny_f32.weights[t.hf_name]
            entry = table[t.oelm_name]
            if t.is_norm:
                assert entry["dtype"] == "f32" and np.array_equal(f.tensor(t.oelm_name), w)
                continue
            want_dt = edt if t.oelm_name == "token_embd" else wdt
            assert entry["dtype"] == want_dt and entry["shape"] == list(t.shape)
            assert entry["size"] == quant.tensor_nbytes(want_dt, t.shape)
            got = f.tensor(t.oelm_name)
            if want_dt == "f16":
                assert np.array_equal(got, w.astype(np.float16))
            else:
                assert got.tobytes() == quant.quantize_packed(w, want_dt), t.oelm_name


def test_export_in_small_chunks_gives_the_same_file(tiny_f32, q_exports, tmp_path, tokenizer_path,
                                                    monkeypatch):
    """Chunks are whole panels of 16 rows, so their bytes concatenate to the whole matrix's."""
    from openelm_rt import export
    monkeypatch.setattr(export, "_CHUNK_BYTES", 3000)  # 16 rows per chunk (attn_output: 32)
    out = export.export_checkpoint(tiny_f32.ckpt_dir, tmp_path / "chunked.oelm", dtype="q4",
                                   tokenizer=tokenizer_path)
    assert out.read_bytes() == q_exports["q4"].read_bytes()


def test_export_untied_quantizes_the_head_like_the_embedding(tiny_untied, tmp_path, tokenizer_path):
    from openelm_rt import export
    out = export.export_checkpoint(tiny_untied.ckpt_dir, tmp_path / "untied_q4.oelm", dtype="q4",
                                   tokenizer=tokenizer_path)
    with export.read_oelm(out) as f:
        dts = {t["name"]: t["dtype"] for t in f.metadata["tensors"]}
        assert dts["token_embd"] == dts["output"] == quant.Q8 and dts["blk.0.attn_qkv"] == quant.Q4
        assert f.tensor("output").tobytes() == quant.quantize_packed(
            tiny_untied.weights["lm_head.weight"], quant.Q8)


def test_export_refuses_unstorable_weights(tmp_path, tiny_f32, tokenizer_path):
    from openelm_rt import export
    from openelm_rt.hf_config import ExportError
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_f32.ckpt_dir, ckpt)
    name = "transformer.layers.1.ffn.proj_2.weight"

    def huge(a):
        a = a.copy()
        a[3, 7] = 3e7  # beyond 65504 * 127: no binary16 scale holds it
        return a
    oracle.patch_safetensors_tensor(ckpt, name, huge)
    for dt in ("q8", "q4"):
        with pytest.raises(ExportError, match=rf"{name}.*binary16"):
            export.export_checkpoint(ckpt, tmp_path / "x.oelm", dtype=dt, tokenizer=tokenizer_path)
    assert export.export_checkpoint(ckpt, tmp_path / "y.oelm", dtype="f32", tokenizer=tokenizer_path)

    def nan(a):
        a = a.copy()
        a[5, 1] = np.nan
        return a
    oracle.patch_safetensors_tensor(ckpt, name, nan)
    with pytest.raises(ExportError, match=rf"{name} contains 1 NaN"):
        export.export_checkpoint(ckpt, tmp_path / "x.oelm", dtype="q4", tokenizer=tokenizer_path)
    assert not (tmp_path / "x.oelm").exists()
    with pytest.raises(ExportError, match="embedding dtype 'q2'"):
        export.export_checkpoint(ckpt, tmp_path / "y.oelm", dtype="q4", embedding_dtype="q2",
                                 tokenizer=tokenizer_path)


def test_export_cli_q4(tiny_f32, tmp_path, tokenizer_path, q_exports, capsys):
    from openelm_rt.export import main
    out = tmp_path / "cli_q4.oelm"
    assert main([str(tiny_f32.ckpt_dir), "-o", str(out), "--dtype", "q4", "--embedding-dtype", "q4",
                 "--tokenizer", str(tokenizer_path), "--no-progress"]) == 0
    assert "weights q4_b32r16i, embedding q4_b32r16i" in capsys.readouterr().err
    assert out.read_bytes() == q_exports["q4e4"].read_bytes()
    assert main([str(tiny_f32.ckpt_dir), "-o", str(out), "--embedding-dtype", "q3"]) == 2
    assert "invalid choice: 'q3'" in capsys.readouterr().err
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "q8" in text and "q4" in text and "--embedding-dtype" in text


def _lsm(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_mean(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over positions of KL(softmax(ref) || softmax(logits))."""
    lp, lq = _lsm(ref_logits), _lsm(logits)
    return float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())


def top1(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    return float((np.argmax(ref_logits, -1) == np.argmax(logits, -1)).mean())


PROMPTS = [prompt_ids(48, 1024, seed=s) for s in range(4)]


def _session_logits(ort, path, backend="cpu") -> np.ndarray:
    with ort.Session(str(path), backend=backend) as s:
        return np.concatenate([s.logits(p) for p in PROMPTS]).astype(np.float64)


def _dequantized_weights(tiny, path) -> dict:
    """The checkpoint's weights as the .oelm file stores them, decoded to float32."""
    from openelm_rt.export import read_oelm
    w = dict(tiny.weights)
    with read_oelm(path) as f:
        dts = {t["name"]: t["dtype"] for t in f.metadata["tensors"]}
        for t in tensor_layout(_spec(tiny)):
            if dts[t.oelm_name] in quant.QUANT_DTYPES:
                w[t.hf_name] = quant.dequantize(f.tensor(t.oelm_name), dts[t.oelm_name], *t.shape)
            elif dts[t.oelm_name] == "f16":
                w[t.hf_name] = oracle.round_to_f16(w[t.hf_name])
    return w


def _llama_weights(tiny, body, head) -> dict:
    """The checkpoint with every matrix rounded by llama.cpp's rule (head: the embedding)."""
    w = dict(tiny.weights)
    for t in tensor_layout(_spec(tiny)):
        if not t.is_norm:
            rule = head if t.oelm_name == "token_embd" else body
            N, K = t.shape
            d, q = rule(blocks_of(w[t.hf_name]))
            w[t.hf_name] = (d.astype(np.float32)[:, None] * q).reshape(N, -1)[:, :K].astype(np.float32)
    return w


@pytest.fixture(scope="module")
def oracle_runs(tiny_f32, q_exports):
    """Oracle (float64) logits over PROMPTS for the f32 weights, the weights each q export
    stores, and the weights llama.cpp's Q8_0 / Q4_0 rules would store."""
    def run(w):
        return np.concatenate([oracle.forward(w, tiny_f32.cfg, p) for p in PROMPTS])
    out = {"f32": run(tiny_f32.weights)}
    for name in ("q8", "q4", "q4e4", "q6", "q5", "q4e6", "q4k"):
        out[name] = run(_dequantized_weights(tiny_f32, q_exports[name]))
    out["llama_q8_0"] = run(_llama_weights(tiny_f32, llama_q8_0, llama_q8_0))
    out["llama_q4_0_head_q8_0"] = run(_llama_weights(tiny_f32, llama_q4_0, llama_q8_0))
    out["llama_q4_0"] = run(_llama_weights(tiny_f32, llama_q4_0, llama_q4_0))
    return out


# ours, llama.cpp's, allowed ratio of mean KL vs f32 (weights only, float64 forward).
# The hard guarantee is per block (tests above: never a larger squared error; on this
# model's matrices q4's total is 0.906 of Q4_0's). Through a tiny random network that
# becomes noisy: over three prompt sets the KL ratio measured q8 0.96-1.04, q4 0.90-1.01,
# q4e4 0.89-1.02, so the bound is "no worse beyond that noise".
VS_LLAMA = [("q8", "llama_q8_0", 1.1), ("q4", "llama_q4_0_head_q8_0", 1.1),
            ("q4e4", "llama_q4_0", 1.1)]


def test_more_bits_closer_to_f32(oracle_runs):
    """Mean KL vs f32 through the float64 oracle falls with the bits: q4 > q5 > q6 > q8, and a q6
    head under q4 lies between q4's q8 head and its q4 head."""
    ref = oracle_runs["f32"]
    kl = {n: kl_mean(ref, oracle_runs[n]) for n in ("q4", "q5", "q6", "q8", "q4e4", "q4e6")}
    assert kl["q4"] > kl["q5"] > kl["q6"] > kl["q8"], kl
    assert kl["q4"] <= kl["q4e6"] * 1.02 and kl["q4e6"] <= kl["q4e4"] * 1.02, kl


@pytest.mark.parametrize("dtype, m0", [(quant.Q6, 32.0), (quant.Q5, 16.0)])
def test_q6_q5_never_worse_than_the_max_rule_per_block(dtype, m0):
    """d = f16(max / -m0) (for q5: llama.cpp Q5_0's rule) is the first candidate of the search,
    so no block's squared error is larger than with it."""
    lo, hi = QRANGE[dtype]
    rng = np.random.default_rng(11)
    w = rng.standard_t(3, size=(64, 256)).astype(np.float32)
    d, q = quant._QUANTIZE[dtype][0](w)
    wb = blocks_of(w)
    mx = wb[np.arange(len(wb)), np.abs(wb).argmax(axis=1)]
    d0 = f16(mx / np.float32(-m0)).astype(np.float32)
    q0 = np.clip(np.rint(wb / d0[:, None]), lo, hi)
    e0 = ((wb - q0 * d0[:, None]).astype(np.float64) ** 2).sum(axis=1)
    e = ((wb - q.reshape(-1, 32) * d.reshape(-1, 1).astype(np.float32)).astype(np.float64) ** 2).sum(axis=1)
    assert (e <= e0 * (1 + 1e-6)).all() and e.sum() < 0.97 * e0.sum()


@pytest.mark.parametrize("ours, theirs, ratio", VS_LLAMA)
def test_quantized_weights_at_least_as_good_as_llama_cpp(oracle_runs, ours, theirs, ratio):
    ref = oracle_runs["f32"]
    ko, kt = kl_mean(ref, oracle_runs[ours]), kl_mean(ref, oracle_runs[theirs])
    assert ko <= ratio * kt, f"{ours}: KL {ko:.4g} vs {theirs} {kt:.4g}"


# The C++ forward pass on a q file against the float64 oracle on the same (decoded) weights:
# what remains is the runtime's 8-bit activation rounding. Measured on the tiny model:
# max |diff| 0.042 (q8) / 0.046 (q4) x max |logit|, mean KL 7.2e-4 to 7.5e-4.
RUNTIME_VS_ORACLE = dict(rel=0.07, kl=1.5e-3)


def _check_runtime_vs_oracle(got, want):
    assert np.abs(got - want).max() <= RUNTIME_VS_ORACLE["rel"] * np.abs(want).max()
    assert kl_mean(want, got) <= RUNTIME_VS_ORACLE["kl"]


@pytest.mark.parametrize("name", ["q8", "q4", "q4e4", "q6", "q5", "q4e6", "q4k"])
@pytest.mark.parametrize("backend", ["cpu", "ref"])
def test_runtime_matches_oracle_on_the_stored_weights(ort, q_exports, oracle_runs, name, backend):
    _check_runtime_vs_oracle(_session_logits(ort, q_exports[name], backend), oracle_runs[name])


@pytest.mark.parametrize("dtype", ["q8", "q4", "q6", "q5"])
def test_runtime_pads_k_inside_the_model(ort, work_dir, tokenizer_path, dtype):
    """A tiny variant whose layers have 5 and 7 heads of 16 (attn_output K = 80, 112) and FFN
    widths 208 and 368 (ffn_down K): every row ends in a partly padded block. Same bounds;
    measured rel 0.038 (q8) / 0.042 (q4), KL 5.3e-4 / 5.8e-4."""
    from conftest import build_model
    from openelm_rt import export
    m = build_model(work_dir, tokenizer_path, f"odd_k_{dtype}", seed=11,
                    config_overrides={"num_gqa_groups": 1, "ffn_dim_divisor": 16})
    spec = parse_config(m.cfg)
    assert any(spec.n_head_q[i] * 16 % 32 for i in range(4)) and any(f % 32 for f in spec.ffn_dim)
    path = export.export_checkpoint(m.ckpt_dir, work_dir / f"odd_k.{dtype}.oelm", dtype=dtype,
                                    tokenizer=tokenizer_path)
    want = np.concatenate([oracle.forward(_dequantized_weights(m, path), m.cfg, p)
                           for p in PROMPTS[:2]])
    with ort.Session(str(path)) as s:
        got = np.concatenate([s.logits(p) for p in PROMPTS[:2]]).astype(np.float64)
    _check_runtime_vs_oracle(got, want)


# Runtime q export vs runtime f32 export, same checkpoint (random weights: flat next-token
# distributions with small margins, so top-1 flips easily; bf16 agrees on 97% here).
# Measured: q8 max |dlogit| 0.063 x max |logit|, KL 1.7e-3, top-1 0.93 (bf16: 0.017,
# 9e-5, 0.97); q4 KL 0.136, top-1 0.41 (llama.cpp's Q4_0 rule on the same weights, float64
# forward without activation rounding: KL 0.134).
QUALITY = {"q8": dict(rel=0.1, kl=3e-3, top1=0.85), "q4": dict(rel=None, kl=0.2, top1=0.25)}


@pytest.mark.parametrize("name", list(QUALITY))
def test_quantized_logits_vs_f32_export(ort, tiny_f32, q_exports, name):
    ref = _session_logits(ort, tiny_f32.oelm)
    got = _session_logits(ort, q_exports[name])
    bound = QUALITY[name]
    assert np.all(np.isfinite(got))
    if bound["rel"] is not None:
        assert np.abs(got - ref).max() <= bound["rel"] * np.abs(ref).max()
    assert kl_mean(ref, got) <= bound["kl"]
    assert top1(ref, got) >= bound["top1"]


@pytest.mark.parametrize("name", ["q8", "q4", "q8ef16", "q6", "q5", "q4k"])
def test_quantized_paths_deterministic(ort, q_exports, name):
    """Batched prefill and one-token decode, and 1 vs 3 threads, give the same bits: each
    token's activations are quantized on their own and each output is one fixed sum."""
    path = q_exports[name]
    with ort.Session(str(path), threads=1) as s1, ort.Session(str(path), threads=3) as s3:
        ids = prompt_ids(12, s1.vocab_size, seed=7)
        batched = ort._core.Context(s1._model, 16).eval(ids, True)
        ctx = ort._core.Context(s3._model, 16, s3._backend)
        single = np.concatenate([ctx.eval([t], False) for t in ids])
        assert np.array_equal(batched, single)
        assert np.array_equal(s1.logits(ids), s3.logits(ids))
        assert s1.generate(ids, max_new_tokens=10).token_ids == s3.generate(ids, max_new_tokens=10).token_ids


def test_session_reports_dtypes(ort, q_exports):
    m = ort._core.Model(str(q_exports["q4"]))
    assert (m.weights_dtype, m.embedding_dtype) == (quant.Q4, quant.Q8)
    raw = m.tensor("blk.0.attn_qkv")
    assert raw.dtype == np.uint8 and raw.shape == (quant.tensor_nbytes(quant.Q4, (96, 128)),)


# ----------------------------------------------------------------------------- reader

def _q_image(q_exports, name="q4"):
    from test_loader import OelmImage
    return OelmImage.load(q_exports[name])


def _expect(ort, img, tmp_path, *patterns):
    from test_loader import _expect_format_error
    return _expect_format_error(ort, img.write(tmp_path / "bad.oelm"), *patterns)


def test_reader_accepts_the_unchanged_q_image(ort, q_exports, tmp_path):
    img = _q_image(q_exports)
    with ort.Session(str(img.write(tmp_path / "same.oelm")), verify=True) as s:
        assert s.vocab_size == 1024


@pytest.mark.parametrize("delta", [-1, 1, -9 * 128])
def test_reader_rejects_q_size_not_matching_shape(ort, q_exports, tmp_path, delta):
    img = _q_image(q_exports)
    img.tensor("blk.1.ffn_down")["size"] += delta  # [128, 224]: 8 panels x 9 x 224 bytes
    msg = _expect(ort, img, tmp_path, r"blk\.1\.ffn_down", "size")
    assert "16128" in msg  # the size the shape needs


def test_reader_rejects_q_tensor_that_is_not_2d(ort, q_exports, tmp_path):
    img = _q_image(q_exports)
    t = img.tensor("blk.0.attn_qkv")
    t["shape"] = [t["size"]]
    _expect(ort, img, tmp_path, r"blk\.0\.attn_qkv", "2-D")


def test_reader_rejects_q_shape_wrong_for_the_model(ort, q_exports, tmp_path):
    """[96, 128] and [48, 256] have the same q4 size: the file is consistent, the model
    config is not."""
    img = _q_image(q_exports)
    t = img.tensor("blk.0.attn_qkv")
    assert t["shape"] == [96, 128]
    t["shape"] = [48, 256]
    _expect(ort, img, tmp_path, r"blk\.0\.attn_qkv", "shape")


@pytest.mark.parametrize("legacy", quant.LEGACY_QUANT_DTYPES)
def test_reader_refuses_the_earlier_quantized_layout_and_says_re_export(ort, q_exports, tmp_path, legacy):
    """Files from before the scales moved next to their blocks have the same sizes: only the
    dtype id tells them apart, and the reader must refuse them rather than misread them."""
    img = _q_image(q_exports)
    for t in img.meta["tensors"]:
        if t["dtype"] in quant.QUANT_DTYPES:
            t["dtype"] = legacy
    msg = _expect(ort, img, tmp_path, legacy, "earlier openelm_rt", "re-export", "openelm-rt-export")
    assert legacy + "i" in msg
    img = _q_image(q_exports)  # only the metadata's weights_dtype says the old name
    img.meta["weights_dtype"] = legacy
    _expect(ort, img, tmp_path, "weights_dtype", legacy, "re-export")


def test_reader_rejects_dtypes_that_disagree_with_the_metadata(ort, q_exports, tmp_path):
    img = _q_image(q_exports)
    img.meta["embedding_dtype"] = quant.Q4  # token_embd is stored q8
    _expect(ort, img, tmp_path, "token_embd", "q8_b32r16i", "q4_b32r16i")
    img = _q_image(q_exports)
    img.meta["weights_dtype"] = quant.Q8
    _expect(ort, img, tmp_path, r"blk\.0\.attn_qkv", "dtype")
    img = _q_image(q_exports)
    img.meta["weights_dtype"] = "u8"
    _expect(ort, img, tmp_path, "weights_dtype", "u8")
    img = _q_image(q_exports)
    img.meta["embedding_dtype"] = 8
    _expect(ort, img, tmp_path, "embedding_dtype")
