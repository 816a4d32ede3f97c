"""q4k_b32r16i (docs/FORMAT.md, "Super-block matrices"): the NumPy packer against the format's
byte table, the super-block rule, the quantizer's error, the C++ kernels (every backend) against
NumPy, and a q4k export end to end (stored bytes, the runtime against the float64 oracle on the
stored weights, CLI, calibration).

Tolerances are stated where they are used, with what they protect.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from openelm_rt import quant
from openelm_rt.hf_config import parse_config, tensor_layout

import oracle  # noqa: E402  (tests/ is on sys.path via conftest)
from test_quant import (PROMPTS, _check_runtime_vs_oracle, _dequantized_weights, _session_logits,  # noqa: F401
                        backend, kl_mean, q_exports, quantize_acts)

Q4K = quant.Q4K
ODD_SHAPES = [(1, 1), (1, 31), (5, 33), (16, 32), (17, 64), (31, 95), (40, 100), (33, 257), (16, 576), (20, 1536)]


def test_super_block_rule_and_sizes():
    # S: the largest of 8..1 dividing nb = Kp / 32.
    assert [quant.q4k_subs(nb) for nb in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 16, 18, 48, 96)] == \
        [1, 2, 3, 4, 5, 6, 7, 8, 3, 5, 1, 6, 8, 6, 8, 8]
    # (Np / 16) * (nb / S) * (64 + 280 S): 4.5 bits per weight at S = 8 (every OpenELM width).
    assert quant.tensor_nbytes(Q4K, (2048, 2048)) == 128 * 8 * 2304 == 2048 * 2048 * 4.5 / 8
    assert quant.tensor_nbytes(Q4K, (576, 1536)) == 576 * 1536 * 4.5 / 8
    assert quant.tensor_nbytes(Q4K, (576, 576)) == 36 * 3 * (64 + 280 * 6)   # the stand-in's d_model
    assert quant.tensor_nbytes(Q4K, (17, 33)) == 2 * 1 * (64 + 280 * 2)       # Np 32, Kp 64
    assert quant.tensor_nbytes(Q4K, (1, 1)) == 64 + 280


def _layout_by_formula(d, dmin, sc, m, u, N, K) -> bytes:
    """FORMAT.md's byte table, one value at a time."""
    Kp = quant.padded_k(K)
    nb = Kp // 32
    S = quant.q4k_subs(nb)
    SB = 64 + 280 * S
    out = bytearray(quant.tensor_nbytes(Q4K, (N, K)))
    pb = nb // S * SB
    for n in range(N):
        p, r = divmod(n, 16)
        for s in range(nb // S):
            base = p * pb + s * SB
            out[base + 2 * r:base + 2 * r + 2] = np.float16(d[n, s]).tobytes()
            out[base + 32 + 2 * r:base + 34 + 2 * r] = np.float16(dmin[n, s]).tobytes()
            for j in range(S):
                b = s * S + j
                out[base + 64 + 24 * j + r] = int(sc[n, b]) | (int(m[n, b]) >> 4) << 6
                out[base + 64 + 24 * j + 16 + r % 8] |= (int(m[n, b]) & 15) << (4 * (r // 8))
                for c in range(32):
                    at = base + 64 + 24 * S + 256 * j + 64 * ((c % 16) // 4) + 4 * r + c % 4
                    out[at] |= int(u[n, 32 * b + c]) << (0 if c < 16 else 4)
    return bytes(out)


@pytest.mark.parametrize("N, K", [(1, 1), (17, 33), (40, 100), (16, 576), (3, 256)])
def test_pack_matches_format_md_byte_table(N, K):
    rng = np.random.default_rng(N * 1000 + K)
    w = rng.standard_normal((N, K)).astype(np.float32)
    parts = quant.quantize_q4k(w)
    d, dmin, sc, m, u = parts
    S = quant.q4k_subs(quant.padded_k(K) // 32)
    assert d.dtype == dmin.dtype == np.float16 and d.shape == (N, quant.padded_k(K) // 32 // S)
    assert sc.max() <= 63 and m.max() <= 63 and u.max() <= 15 and not u[:, K:].any()
    raw = quant.pack_q4k(*parts, N, K)
    assert raw == _layout_by_formula(*parts, N, K)
    for a, b in zip(quant.unpack_q4k(raw, N, K), parts):
        assert np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))
    assert raw == quant.quantize_packed(w, Q4K)


def _rel_rms(w, back, weights=None):
    e = (back.astype(np.float64) - w) ** 2
    ww = np.ones_like(e) if weights is None else np.broadcast_to(weights, e.shape)
    return float(np.sqrt((ww * e).sum() / (ww * w.astype(np.float64) ** 2).sum()))


@pytest.mark.parametrize("dist", ["normal", "laplace", "skewed"])
def test_round_trip_error_below_q4(dist):
    """Relative RMS error of quantize -> dequantize, K = 1536 (S = 8) and 576 (S = 6). Measured
    normal 0.071 (q4: 0.082), laplace 0.083 (q4 0.102), skewed (|normal|, one-sided) 0.042
    (q4: 0.080, which spends half its levels on a side the block does not use)."""
    rng = np.random.default_rng(7)
    for K in (1536, 576):
        shape = (64, K)
        w = {"normal": lambda: rng.standard_normal(shape), "laplace": lambda: rng.laplace(size=shape),
             "skewed": lambda: np.abs(rng.standard_normal(shape))}[dist]().astype(np.float32) * 0.02
        ours = _rel_rms(w, quant.dequantize(quant.quantize_packed(w, Q4K), Q4K, *shape))
        q4 = _rel_rms(w, quant.dequantize(quant.quantize_packed(w, quant.Q4), quant.Q4, *shape))
        assert ours <= {"normal": 0.078, "laplace": 0.092, "skewed": 0.047}[dist], ours
        assert ours < 0.95 * q4, (ours, q4)


def test_importance_weighting_lowers_the_weighted_error():
    """With imp, the error that matters (weighted by the inputs' mean squares) drops: measured
    0.0707 -> 0.0580 of the weighted norm on these heavy-tailed importances (the plain error
    rises, 0.0707 -> 0.0761)."""
    rng = np.random.default_rng(8)
    w = (rng.standard_normal((64, 1536)) * 0.02).astype(np.float32)
    imp = rng.lognormal(0, 1.5, 1536)
    plain = quant.dequantize(quant.quantize_packed(w, Q4K), Q4K, 64, 1536)
    weighted = quant.dequantize(quant.quantize_packed(w, Q4K, imp), Q4K, 64, 1536)
    assert _rel_rms(w, weighted, imp) < 0.9 * _rel_rms(w, plain, imp)


def test_zero_and_constant_blocks():
    w = np.zeros((3, 64), np.float32)
    w[1, 32:] = -0.5    # constant negative block: all of it in the minimum
    w[2, :] = np.linspace(-400, 400, 64)
    back = quant.dequantize(quant.quantize_packed(w, Q4K), Q4K, 3, 64)
    assert np.all(back[0] == 0) and np.all(back[1, :32] == 0)
    assert np.abs(back[1, 32:] + 0.5).max() <= 0.5 / 63
    assert np.abs(back[2] - w[2]).max() <= 800 / 15
    # (NaN, 2-D and binary16 refusals: test_quant.test_quantizer_refuses_what_it_cannot_store)
    with pytest.raises(ValueError, match="unpack_q4k"):
        quant.unpack(b"\0" * 344, Q4K, 1, 1)


# ----------------------------------------------------------------------------- kernels

def random_q4k(rng, N, K):
    """(raw, parts) with every integer over its whole range and binary16 scales of mixed magnitude."""
    Kp = quant.padded_k(K)
    nb = Kp // 32
    ns = nb // quant.q4k_subs(nb)
    u = rng.integers(0, 16, (N, Kp), dtype=np.uint8)
    u[:, K:] = 0
    sc = rng.integers(0, 64, (N, nb), dtype=np.uint8)
    m = rng.integers(0, 64, (N, nb), dtype=np.uint8)
    d, dmin = (np.float16(rng.uniform(0.5, 2, (N, ns)) * 2.0 ** rng.integers(-14, -4, (N, ns))) for _ in range(2))
    parts = (d, dmin, sc, m, u)
    return np.frombuffer(quant.pack_q4k(*parts, N, K), np.uint8), parts


@pytest.mark.parametrize("N, K", ODD_SHAPES)
def test_row_to_f32_bit_exact_with_numpy_dequantize(backend, N, K):
    rng = np.random.default_rng(N * 7 + K)
    raw, _ = random_q4k(rng, N, K)
    want = quant.dequantize(raw, Q4K, N, K)
    got = np.stack([backend.kernel_row_to_f32(raw, Q4K, N, K, r) for r in range(N)])
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("N, K", ODD_SHAPES + [(300, 2048)])
def test_qmatmul_matches_float64_of_same_math(backend, N, K):
    """Per block: isum(u, x.q) * x.d * d * sc - x.s * x.d * dmin * m, summed in float64; the
    kernel's float32 accumulation (two fmas per block) stays within 1e-5 of the sum of |terms|."""
    rng = np.random.default_rng(N * 31 + K)
    raw, (d, dmin, sc, m, u) = random_q4k(rng, N, K)
    nb = quant.padded_k(K) // 32
    S = quant.q4k_subs(nb)
    dsc = np.repeat(d.astype(np.float64), S, axis=1) * sc
    dm = np.repeat(dmin.astype(np.float64), S, axis=1) * m
    for T in (1, 3):
        x = (rng.standard_normal((T, K)) * rng.uniform(0.1, 10, (T, 1))).astype(np.float32)
        y = backend.kernel_matmul(raw, Q4K, N, K, x)
        xq, xd, xs = quantize_acts(x)
        isum = np.einsum("nbc,tbc->tnb", u.reshape(N, nb, 32).astype(np.int64), xq.reshape(T, nb, 32).astype(np.int64))
        t1 = isum * xd.astype(np.float64)[:, None, :] * dsc[None]
        t2 = (xs * xd.astype(np.float64))[:, None, :] * dm[None]
        want = (t1 - t2).sum(axis=2)
        scale = (np.abs(t1) + np.abs(t2)).sum(axis=2)
        assert np.all(np.abs(y - want) <= 1e-5 * scale + 1e-30)


def test_every_kernel_variant_bitwise_equal_to_ref(ort):
    from openelm_rt import _core
    ref = _core.Backend("ref", 1)
    cpus = [_core.Backend("cpu", n, kernels=v) for v in _core.Backend.kernel_variants() for n in (1, 3)]
    rng = np.random.default_rng(6)
    for N, K, T in [(33, 257, 1), (300, 2048, 5), (48, 576, 17), (16, 96, 7)]:
        raw, _ = random_q4k(rng, N, K)
        x = rng.standard_normal((T, K)).astype(np.float32)
        x[0, :32] = 0
        want = ref.kernel_matmul(raw, Q4K, N, K, x)
        for b in cpus:
            assert np.array_equal(b.kernel_matmul(raw, Q4K, N, K, x), want), (b.kernels, b.threads, N, K, T)


# ----------------------------------------------------------------------------- export and model

@pytest.fixture(scope="module")
def q4k_export(q_exports):
    """(test_quant exports it with the other types and checks its bytes, the runtime against the
    oracle on its stored weights, and batching / thread determinism.)"""
    return q_exports["q4k"]


def test_runtime_pads_k_and_odd_super_blocks(ort, work_dir, tokenizer_path):
    """attn_output K = 80 / 112 and ffn_down K = 208 / 368: partly padded blocks and super-blocks
    of several sizes (q4k_subs of nb = 3, 4, 7, 12, ...), through the whole model."""
    from conftest import build_model
    from openelm_rt import export
    m = build_model(work_dir, tokenizer_path, "odd_k_q4k", seed=11,
                    config_overrides={"num_gqa_groups": 1, "ffn_dim_divisor": 16})
    path = export.export_checkpoint(m.ckpt_dir, work_dir / "odd_k.q4k.oelm", dtype="q4k", tokenizer=tokenizer_path)
    spec = parse_config(m.cfg)
    subs = {quant.q4k_subs(quant.padded_k(t.shape[1]) // 32) for t in tensor_layout(spec) if not t.is_norm}
    assert len(subs) >= 3, subs
    want = np.concatenate([oracle.forward(_dequantized_weights(m, path), m.cfg, p) for p in PROMPTS[:2]])
    with ort.Session(str(path)) as s:
        got = np.concatenate([s.logits(p) for p in PROMPTS[:2]]).astype(np.float64)
    _check_runtime_vs_oracle(got, want)


def test_closer_to_f32_than_q4(ort, tiny_f32, q4k_export, work_dir, tokenizer_path):
    """Same head (q6) for both, so only the body's type differs: on the tiny random model the
    q4k file's KL to the f32 export measured 0.105 against q4's 0.138."""
    from openelm_rt import export
    q4 = export.export_checkpoint(tiny_f32.ckpt_dir, work_dir / "f32_as_q4e6_k.oelm", dtype="q4",
                                  embedding_dtype="q6", tokenizer=tokenizer_path)
    ref = _session_logits(ort, tiny_f32.oelm)
    kl_k = kl_mean(ref, _session_logits(ort, q4k_export))
    kl_4 = kl_mean(ref, _session_logits(ort, q4))
    assert kl_k < 0.85 * kl_4, (kl_k, kl_4)


def test_export_cli_and_calibration(tiny_f32, tmp_path, tokenizer_path, q4k_export, capsys):
    from openelm_rt.export import main, read_oelm
    out = tmp_path / "cli_q4k.oelm"
    assert main([str(tiny_f32.ckpt_dir), "-o", str(out), "--dtype", "q4k", "--tokenizer", str(tokenizer_path),
                 "--no-progress"]) == 0
    assert "weights q4k_b32r16i, embedding q6_b32r16i" in capsys.readouterr().err
    assert out.read_bytes() == q4k_export.read_bytes()
    assert main(["--help"]) == 0
    assert "q4k" in capsys.readouterr().out
    # importance-weighted: same layout, other bytes, calibration recorded
    cal = tmp_path / "cal_q4k.oelm"
    ids = tmp_path / "ids.txt"
    ids.write_text(",".join(str(i) for i in range(5, 400, 3)))
    assert main([str(tiny_f32.ckpt_dir), "-o", str(cal), "--dtype", "q4k", "--tokenizer", str(tokenizer_path),
                 "--calibration-ids", str(ids), "--calibration-ctx", "64", "--no-progress"]) == 0
    capsys.readouterr()
    with read_oelm(cal) as f, read_oelm(q4k_export) as g:
        assert f.metadata["source"]["importance"]
        assert f.tensor("blk.0.ffn_down").shape == g.tensor("blk.0.ffn_down").shape
        assert f.tensor("blk.0.ffn_down").tobytes() != g.tensor("blk.0.ffn_down").tobytes()


# ----------------------------------------------------------------------------- per-matrix dtypes

MIX = [("blk.*.ffn_down", "q6"), ("blk.1.ffn_down", "q8"), ("blk.0.attn_qkv", "q4")]


@pytest.fixture(scope="module")
def mixed_export(tiny_f32, work_dir, tokenizer_path):
    from openelm_rt import export
    return export.export_checkpoint(tiny_f32.ckpt_dir, work_dir / "f32_as_q4k_mixed.oelm", dtype="q4k",
                                    tokenizer=tokenizer_path, tensor_dtypes=MIX)


def test_mixed_export_stores_each_matrix_in_its_dtype(tiny_f32, mixed_export):
    from openelm_rt.export import read_oelm
    with read_oelm(mixed_export) as f:
        own = f.metadata["tensor_dtypes"]
        layers = parse_config(tiny_f32.cfg).n_layer
        want = {f"blk.{i}.ffn_down": quant.Q8 if i == 1 else quant.Q6 for i in range(layers)}
        want["blk.0.attn_qkv"] = quant.Q4
        assert own == want  # later patterns win; nothing else listed
        table = {t["name"]: t for t in f.metadata["tensors"]}
        for t in tensor_layout(parse_config(tiny_f32.cfg)):
            if t.is_norm or t.oelm_name == "token_embd":
                continue
            dt = want.get(t.oelm_name, Q4K)
            assert table[t.oelm_name]["dtype"] == dt
            assert f.tensor(t.oelm_name).tobytes() == quant.quantize_packed(tiny_f32.weights[t.hf_name], dt)


def test_mixed_runtime_matches_oracle_on_the_stored_weights(ort, tiny_f32, mixed_export):
    want = np.concatenate([oracle.forward(_dequantized_weights(tiny_f32, mixed_export), tiny_f32.cfg, p)
                           for p in PROMPTS])
    for b in ("cpu", "ref"):
        _check_runtime_vs_oracle(_session_logits(ort, mixed_export, b), want)


def test_mixed_export_refusals(tiny_f32, tmp_path, tokenizer_path, capsys):
    from openelm_rt import export
    from openelm_rt.hf_config import ExportError
    for mix, msg in [([("blk.*.ffn_up", "q6")], "matches no layer matrix"),
                     ([("token_embd", "q6")], "embedding-dtype"),
                     ([("blk.*.ffn_down", "q3")], "'q3' is not one of")]:
        with pytest.raises(ExportError, match=msg):
            export.export_checkpoint(tiny_f32.ckpt_dir, tmp_path / "x.oelm", dtype="q4k", tokenizer=tokenizer_path,
                                     tensor_dtypes=mix)
    with pytest.raises(ExportError, match="flash layout"):
        export.export_checkpoint(tiny_f32.ckpt_dir, tmp_path / "x.oelm", dtype="q4", tokenizer=tokenizer_path,
                                 tensor_dtypes=[("blk.0.ffn_down", "q6")], flash_layout=True)
    assert not (tmp_path / "x.oelm").exists()
    assert export.main([str(tiny_f32.ckpt_dir), "-o", str(tmp_path / "x.oelm"), "--dtype", "q4k",
                        "--tensor-dtype", "q6"]) == 2
    assert "PATTERN=DTYPE" in capsys.readouterr().err


def test_mixed_cli(tiny_f32, tmp_path, tokenizer_path, mixed_export, capsys):
    from openelm_rt.export import main
    out = tmp_path / "mixed_cli.oelm"
    args = [a for p, d in MIX for a in ("--tensor-dtype", f"{p}={d}")]
    assert main([str(tiny_f32.ckpt_dir), "-o", str(out), "--dtype", "q4k", "--tokenizer", str(tokenizer_path),
                 "--no-progress", *args]) == 0
    assert "matrices of their own dtype" in capsys.readouterr().err
    assert out.read_bytes() == mixed_export.read_bytes()


def test_reader_checks_tensor_dtypes(ort, mixed_export, tmp_path):
    from test_loader import OelmImage, _expect_format_error
    # A reader that predates the key ignores it and refuses the first matrix of another dtype.
    img = OelmImage.load(mixed_export)
    del img.meta["tensor_dtypes"]
    _expect_format_error(ort, img.write(tmp_path / "a.oelm"), r"blk\.0\.attn_qkv", "dtype q4_b32r16i",
                         "expected q4k_b32r16i")
    img = OelmImage.load(mixed_export)
    img.meta["tensor_dtypes"]["token_embd"] = quant.Q6
    _expect_format_error(ort, img.write(tmp_path / "b.oelm"), "tensor_dtypes names 'token_embd'")
    img = OelmImage.load(mixed_export)
    img.meta["tensor_dtypes"]["blk.0.ffn_down"] = "q3_x"
    _expect_format_error(ort, img.write(tmp_path / "c.oelm"), "tensor_dtypes", "blk.0.ffn_down", "upgrade")
    img = OelmImage.load(mixed_export)
    img.meta["tensor_dtypes"]["blk.0.attn_output"] = quant.Q8  # the file stores it as q4k
    _expect_format_error(ort, img.write(tmp_path / "d.oelm"), r"blk\.0\.attn_output", "expected q8_b32r16i")


def test_old_reader_refuses_q4k_by_name(ort, q4k_export, tmp_path):
    """What a reader without q4k does (this one, with the dtype renamed to an id it does not know):
    it names the tensor and the unknown dtype and says to upgrade."""
    from test_loader import OelmImage, _expect_format_error
    img = OelmImage.load(q4k_export)
    img.tensor("blk.0.attn_qkv")["dtype"] = "q4k_b32r16j"
    # The message lists what this reader knows (from its dtype table, i32 included), names this
    # reader's version and the file's writer (printable, cut short: it is untrusted).
    img.meta["writer"] = "openelm-rt-export 9.9.9\n" + "x" * 200
    msg = _expect_format_error(ort, img.write(tmp_path / "old.oelm"), r"blk\.0\.attn_qkv", "unknown dtype",
                               "upgrade", r"q4k_b32r16i, i32\)", f"this is openelm_rt {re.escape(ort.__version__)}",
                               r"written by openelm-rt-export 9\.9\.9\?x+\.\.\.;")
    assert "x" * 81 not in msg and "\n" not in msg, msg
    # In metadata (weights_dtype), the list is of the weight dtypes only.
    img = OelmImage.load(q4k_export)
    img.meta["weights_dtype"] = "q3_x"
    msg = _expect_format_error(ort, img.write(tmp_path / "old2.oelm"), "weights_dtype", "q3_x", "upgrade",
                               r"\(f32, f16, bf16, q8_b32r16i, q4_b32r16i, q6_b32r16i, q5_b32r16i, q4k_b32r16i\)")


def test_cuda_refuses_q4k_and_mixed_files_by_name(ort, q4k_export, mixed_export):
    """The CUDA backend has no q4k kernels and runs one weights dtype per file: it says so (runs
    only where a CUDA device is present)."""
    info = ort.cuda_info()
    if not info["available"]:
        pytest.skip(f"no CUDA device: {info['reason']}")
    with pytest.raises(ValueError, match="no kernels for q4k_b32r16i"):
        ort.Session(str(q4k_export), backend="cuda")
    with pytest.raises(ValueError, match="tensor_dtypes"):
        ort.Session(str(mixed_export), backend="cuda")
