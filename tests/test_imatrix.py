"""Importance-weighted quantization (imatrix.py, quant.py's weighted search, the exporter's
calibration options): the calibration forward pass against the runtime, the statistics against a
direct recomputation, the search's guarantee, and the export round trips and refusals."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import core_or_skip, prompt_ids

from openelm_rt import export, imatrix, quant
from openelm_rt.hf_config import ExportError, parse_config, tensor_layout


def test_calibration_forward_matches_the_runtime(tiny_f32, tiny_noqk):
    """The NumPy pass that collects the statistics computes the model the runtime computes (both
    q/k-norm settings, several windows, a short last one)."""
    ort = core_or_skip()
    for m in (tiny_f32, tiny_noqk):
        ids = prompt_ids(150, seed=3, bos=False)
        stats, logits = imatrix.compute_imatrix(m.ckpt_dir, ids, ctx=64, batch=2, return_logits=True)
        assert int(stats[imatrix.TOKENS_KEY]) == 150
        with ort.Session(str(m.oelm), threads=1) as s:
            assert len(logits) == 3  # windows of 64, 64 and 22 tokens
            for i, w0 in enumerate(range(0, 150, 64)):
                win = ids[w0:w0 + 64]
                want = np.asarray(s.logits(win))
                assert logits[i].shape == want.shape
                assert np.abs(logits[i] - want).max() <= 1e-4 * np.abs(want).max(), m.name


def test_statistics_are_the_mean_square_of_each_matrix_input(tiny_f32):
    """token_embd's entry (the LM head's input) against the final hidden states recomputed by the
    oracle: E[h_k^2] over the calibration tokens; and every quantizable matrix has its entry."""
    import oracle
    ids = prompt_ids(40, seed=5, bos=False)
    stats = imatrix.compute_imatrix(tiny_f32.ckpt_dir, ids, ctx=40)
    h = oracle.hidden_states(tiny_f32.weights, tiny_f32.cfg, ids)
    np.testing.assert_allclose(stats["token_embd"], (h * h).mean(axis=0), rtol=1e-4)
    spec = parse_config(tiny_f32.cfg)
    for t in tensor_layout(spec):
        if not t.is_norm:
            assert stats[t.oelm_name].shape == (t.shape[1],) and (stats[t.oelm_name] > 0).all()


@pytest.mark.parametrize("dtype", [quant.Q4, quant.Q8])
def test_weighted_search_never_worse_than_the_unweighted_choice(dtype):
    """Per block, the importance-weighted error of the weighted choice is at most that of the
    unweighted one (its candidate), and clearly lower overall on heavy-tailed importance."""
    rng = np.random.default_rng(1)
    w = (rng.standard_t(4, size=(64, 200)) * 0.02).astype(np.float32)
    imp = rng.gamma(0.5, size=200)
    f = quant._QUANTIZE[dtype][0]
    d0, q0 = f(w)
    d1, q1 = f(w, imp)
    u = quant._importance(w, imp).astype(np.float64)

    def err(d, q):
        r = quant._blocks(w).astype(np.float64) - (np.repeat(d.astype(np.float64), 32, 1) * q).reshape(-1, 32)
        return (r * r * u).sum(axis=1)

    e0, e1 = err(d0, q0), err(d1, q1)
    assert (e1 <= e0 * (1 + 1e-6) + 1e-30).all()
    assert e1.sum() < 0.95 * e0.sum()
    # the stored integers are still the nearest ones for the stored scale
    lo, hi = (-8, 7) if dtype == quant.Q4 else (-127, 127)
    want = np.clip(np.rint(w / np.repeat(d1.astype(np.float32), 32, 1)[:, :200]), lo, hi)
    assert np.array_equal(q1[:, :200], want.astype(np.int8))


def test_weighted_search_refuses_bad_importance():
    w = np.ones((16, 64), np.float32)
    with pytest.raises(ValueError, match="64 columns"):
        quant.quantize_q4(w, np.ones(63))
    with pytest.raises(ValueError, match="non-negative"):
        quant.quantize_q4(w, -np.ones(64))


@pytest.fixture(scope="module")
def calibrated(tiny_f32, tmp_path_factory, tokenizer_path):
    d = tmp_path_factory.mktemp("imatrix")
    ids = prompt_ids(200, seed=7, bos=False)
    out = export.export_checkpoint(tiny_f32.ckpt_dir, d / "q4im.oelm", dtype="q4", tokenizer=tokenizer_path,
                                   calibration=ids, calibration_ctx=64, imatrix_out=d / "stats.npz")
    return d, ids, out


def test_export_with_calibration_stores_the_weighted_quantization(tiny_f32, calibrated):
    d, ids, out = calibrated
    stats = imatrix.load_imatrix(d / "stats.npz")
    assert int(stats[imatrix.TOKENS_KEY]) == 200
    with export.read_oelm(out) as f:
        assert f.metadata["source"]["importance"] == {"tokens": 200}
        changed = 0
        for t in tensor_layout(parse_config(tiny_f32.cfg)):
            if t.is_norm:
                continue
            w = tiny_f32.weights[t.hf_name]
            dt = f.metadata["embedding_dtype"] if t.oelm_name == "token_embd" else quant.Q4
            got = f.tensor(t.oelm_name).tobytes()
            assert got == quant.quantize_packed(w, dt, stats[t.oelm_name]), t.oelm_name
            changed += got != quant.quantize_packed(w, dt)
        assert changed > 0  # the statistics changed some scales


def test_export_from_saved_statistics_is_the_same_file(tiny_f32, calibrated, tokenizer_path, tmp_path):
    d, ids, out = calibrated
    again = export.export_checkpoint(tiny_f32.ckpt_dir, tmp_path / "again.oelm", dtype="q4",
                                     tokenizer=tokenizer_path, imatrix=d / "stats.npz")
    assert again.read_bytes() == out.read_bytes()


def test_calibrated_export_runs_and_stays_close(tiny_f32, calibrated):
    """The runtime reads the calibrated file; its distance to f32 is within the bound test_quant
    sets for plain q4 on this random model (KL 0.2; measured here: plain q4 0.136)."""
    ort = core_or_skip()
    _, _, out = calibrated
    ids = prompt_ids(30, seed=9)
    with ort.Session(str(tiny_f32.oelm), threads=1) as a, ort.Session(str(out), threads=1) as b:
        la, lb = np.asarray(a.logits(ids), np.float64), np.asarray(b.logits(ids), np.float64)
    assert np.isfinite(lb).all()
    pa = np.exp(la - la.max(-1, keepdims=True))
    pa /= pa.sum(-1, keepdims=True)
    lsa = np.log(pa)
    lsb = lb - lb.max(-1, keepdims=True)
    lsb -= np.log(np.exp(lsb).sum(-1, keepdims=True))
    kl = float((pa * (lsa - lsb)).sum(-1).mean())
    print(f"KL(f32 || q4 calibrated) = {kl:.4f}")
    assert kl <= 0.2


def test_export_cli_calibration(tiny_f32, tokenizer_path, tmp_path, calibrated, capsys):
    d, ids, out = calibrated
    (tmp_path / "ids.txt").write_text(" ".join(map(str, ids)) + " 5 6 7")
    rc = export.main([str(tiny_f32.ckpt_dir), "-o", str(tmp_path / "cli.oelm"), "--dtype", "q4",
                      "--tokenizer", str(tokenizer_path), "--calibration-ids", str(tmp_path / "ids.txt"),
                      "--calibration-tokens", "200", "--calibration-ctx", "64", "--no-progress"])
    assert rc == 0
    assert (tmp_path / "cli.oelm").read_bytes() == out.read_bytes()
    # text is tokenized with the stored tokenizer (BOS first in each window)
    (tmp_path / "cal.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    rc = export.main([str(tiny_f32.ckpt_dir), "-o", str(tmp_path / "text.oelm"), "--dtype", "q8",
                      "--tokenizer", str(tokenizer_path), "--calibration-text", str(tmp_path / "cal.txt"),
                      "--no-progress"])
    assert rc == 0
    with export.read_oelm(tmp_path / "text.oelm") as f:
        assert f.metadata["source"]["importance"]["tokens"] > 100


def test_export_refuses_misused_calibration(tiny_f32, tiny_untied, calibrated, tokenizer_path, tmp_path, capsys):
    d, ids, _ = calibrated
    ck = tiny_f32.ckpt_dir
    with pytest.raises(ExportError, match="block-quantized"):
        export.export_checkpoint(ck, tmp_path / "a.oelm", dtype="f16", tokenizer=tokenizer_path, calibration=ids)
    with pytest.raises(ExportError, match="not both"):
        export.export_checkpoint(ck, tmp_path / "a.oelm", dtype="q4", tokenizer=tokenizer_path, calibration=ids,
                                 imatrix=d / "stats.npz")
    with pytest.raises(ExportError, match="--calibration-ids"):
        export.export_checkpoint(ck, tmp_path / "a.oelm", dtype="q4", with_tokenizer=False, calibration="some text")
    with pytest.raises(ExportError, match="outside the vocabulary"):
        export.export_checkpoint(ck, tmp_path / "a.oelm", dtype="q4", tokenizer=tokenizer_path,
                                 calibration=[1, 2, 10 ** 6])
    # statistics of another model (the untied one has an `output` matrix the file lacks)
    other = imatrix.compute_imatrix(tiny_untied.ckpt_dir, ids[:50], ctx=50)
    del other["output"]
    with pytest.raises(ExportError, match="no entry for output"):
        export.export_checkpoint(tiny_untied.ckpt_dir, tmp_path / "a.oelm", dtype="q4", tokenizer=tokenizer_path,
                                 imatrix=other)
    bad = dict(imatrix.load_imatrix(d / "stats.npz"))
    bad["blk.0.ffn_down"] = bad["blk.0.ffn_down"][:-1]
    with pytest.raises(ExportError, match="blk.0.ffn_down.*columns"):
        export.export_checkpoint(ck, tmp_path / "a.oelm", dtype="q4", tokenizer=tokenizer_path, imatrix=bad)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ExportError, match="cannot read the importance file"):
        export.export_checkpoint(ck, tmp_path / "a.oelm", dtype="q4", tokenizer=tokenizer_path,
                                 imatrix=tmp_path / "junk.npz")
    assert not (tmp_path / "a.oelm").exists()


def test_flash_layout_bundles_take_the_importance_statistics(tiny_f32, calibrated, tokenizer_path, tmp_path):
    """--flash-layout with importance statistics: each bundle holds the weighted quantization of
    its neurons' gate/up rows (weighted by the layer input's statistics) and of their down columns
    (weighted by the down input's statistics *of those neurons*, i.e. permuted with them) — the
    bytes the exporter writes, recomputed here from the stored permutation."""
    from openelm_rt import flash
    d, _, _ = calibrated
    stats = imatrix.load_imatrix(d / "stats.npz")
    out = export.export_checkpoint(tiny_f32.ckpt_dir, tmp_path / "flash_im.oelm", dtype="q4",
                                   tokenizer=tokenizer_path, imatrix=d / "stats.npz", flash_layout=True,
                                   bundle_neurons=32, flash_calibration_tokens=64)
    spec = parse_config(tiny_f32.cfg)

    def padded(b: bytes) -> bytes:
        return b + bytes(-len(b) % flash.BUNDLE_ALIGN)

    permuted_differs = 0
    with export.read_oelm(out) as f:
        assert f.metadata["source"]["importance"] == {"tokens": 200}
        for i in range(spec.n_layer):
            gu = tiny_f32.weights[f"transformer.layers.{i}.ffn.proj_1.weight"]
            dn = tiny_f32.weights[f"transformer.layers.{i}.ffn.proj_2.weight"]
            F, order = dn.shape[1], np.asarray(f.tensor(f"blk.{i}.ffn_perm"))
            imp_gu, imp_dn = stats[f"blk.{i}.ffn_gate_up"], stats[f"blk.{i}.ffn_down"]
            want = b""
            for first in range(0, F, 32):
                idx = order[first:first + 32]
                want += padded(quant.quantize_packed(np.concatenate([gu[idx], gu[F + idx]]), quant.Q4, imp_gu))
                cols = np.ascontiguousarray(dn[:, idx])
                want += padded(quant.quantize_packed(cols, quant.Q4, imp_dn[idx]))
                permuted_differs += (quant.quantize_packed(cols, quant.Q4, imp_dn[idx])
                                     != quant.quantize_packed(cols, quant.Q4, imp_dn[:len(idx)]))
            assert f.tensor(f"blk.{i}.ffn_bundles").tobytes() == want, i
    assert permuted_differs > 0  # the test can tell permuted statistics from unpermuted ones
    ort = core_or_skip()
    with ort.Session(str(out), threads=1) as s:
        assert np.isfinite(np.asarray(s.logits(prompt_ids(12, seed=3)))).all()
