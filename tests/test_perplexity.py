"""openelm_rt.perplexity / `openelm-rt perplexity` against a NumPy recomputation: windows, NLL,
perplexity, KL(base ‖ model) mean / p99 / max, top-1 agreement, ΔPPL; text and token-id input;
the errors. The logits come from the runtime (their own agreement with the oracle is
test_forward's job), except for one perplexity recomputed from the oracle's logits.
"""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

import oracle
from conftest import env_with_pythonpath, prompt_ids


def _corpus_text(n_chars=1500):
    from openelm_rt.tokenizer_train import CORPUS_PATH
    return CORPUS_PATH.read_text(encoding="utf-8")[:n_chars]


def _expected(model_logits, base_logits, windows):
    """Straight from the definitions, window by window, position by position."""
    nll, nllb, kl, same = [], [], [], []
    for w, lm, lb in zip(windows, model_logits, base_logits):
        lm, lb = np.asarray(lm, np.float64), np.asarray(lb, np.float64)
        for t in range(len(w) - 1):
            pm = np.exp(lm[t] - lm[t].max()); pm /= pm.sum()
            pb = np.exp(lb[t] - lb[t].max()); pb /= pb.sum()
            nll.append(-math.log(pm[w[t + 1]]))
            nllb.append(-math.log(pb[w[t + 1]]))
            kl.append(float(np.sum(pb * (np.log(pb) - np.log(pm)))))
            same.append(int(np.argmax(pm) == np.argmax(pb)))
    kl = np.array(kl)
    ppl, pplb = math.exp(np.mean(nll)), math.exp(np.mean(nllb))
    return {"ppl": ppl, "base_ppl": pplb, "delta_ppl": ppl - pplb, "kl_mean": kl.mean(),
            "kl_p99": np.percentile(kl, 99), "kl_max": kl.max(), "top1": np.mean(same), "n_tokens": len(kl)}


def test_text_windows_and_kl_match_numpy(ort, tiny_f32, tiny_f32_export):
    text, ctx = _corpus_text(), 48
    with ort.Session(str(tiny_f32.oelm)) as base, ort.Session(str(tiny_f32_export["bf16"])) as model:
        ids = base.tokenize(text, add_bos=False)
        # Windows: BOS + ctx - 1 text tokens each, the last one shorter.
        wins = [[base.bos_token_id] + ids[i:i + ctx - 1] for i in range(0, len(ids), ctx - 1)]
        assert len(wins) >= 3 and len(wins[-1]) < ctx
        r = ort.perplexity(model, text=text, ctx=ctx, kl_base=base)
        want = _expected([model.logits(w) for w in wins], [base.logits(w) for w in wins], wins)
    assert r.n_windows == len(wins) and r.n_tokens == want["n_tokens"] == len(ids)
    for k in ("ppl", "base_ppl", "kl_mean", "kl_p99", "kl_max", "top1"):
        assert getattr(r, k) == pytest.approx(want[k], rel=1e-6, abs=1e-9), k
    assert r.delta_ppl == pytest.approx(want["delta_ppl"], rel=1e-5, abs=1e-9)
    assert 0 < r.kl_mean < r.kl_max and r.top1 > 0.5  # bf16 weights: close to f32, not equal


def test_perplexity_from_oracle_logits(ort, tiny_f32):
    ids = prompt_ids(70, tiny_f32.cfg["vocab_size"], bos=False)
    r = ort.perplexity(str(tiny_f32.oelm), ids=ids, ctx=32)
    wins = [ids[i:i + 32] for i in range(0, 70, 32)]  # no BOS for ids: 32, 32, 6
    nll = []
    for w in wins:
        lp = oracle.forward(tiny_f32.weights, tiny_f32.cfg, w)
        lp = lp - lp.max(-1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
        nll += [-lp[t, w[t + 1]] for t in range(len(w) - 1)]
    assert r.n_tokens == 70 - 3 and r.n_windows == 3
    assert r.ppl == pytest.approx(math.exp(np.mean(nll)), rel=1e-4)
    assert r.kl_mean is None and r.top1 is None
    # The same model as its own base: KL 0, agreement 1, ΔPPL 0.
    same = ort.perplexity(str(tiny_f32.oelm), ids=ids, ctx=32, kl_base=str(tiny_f32.oelm))
    assert same.kl_max == pytest.approx(0, abs=1e-9) and same.top1 == 1 and same.delta_ppl == 0


def test_cli_ids_and_json(ort, tiny_noqk, tmp_path):
    ids = prompt_ids(50, tiny_noqk.cfg["vocab_size"], bos=False)
    f = tmp_path / "ids.txt"
    f.write_text(" ".join(map(str, ids[:20])) + "\n" + ",".join(map(str, ids[20:])))
    out = subprocess.run([sys.executable, "-m", "openelm_rt", "perplexity", str(tiny_noqk.oelm), "--ids", str(f),
                          "--ctx", "16", "--kl-base", str(tiny_noqk.oelm), "--json"],
                         capture_output=True, text=True, env=env_with_pythonpath(), timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    want = ort.perplexity(str(tiny_noqk.oelm), ids=ids, ctx=16)
    assert got["ppl"] == pytest.approx(want.ppl, rel=1e-12) and got["n_windows"] == 4
    assert got["kl_max"] == pytest.approx(0, abs=1e-9)


def test_cli_bf16_activations_measures_the_rounding(ort, tiny_bf16, tmp_path):
    """--bf16-activations applies to MODEL only: against the same file as --kl-base (exact by
    default), KL is 0 without it and is what Session(exact=False) gives with it."""
    ids = prompt_ids(40, tiny_bf16.cfg["vocab_size"], bos=False)
    f = tmp_path / "ids.txt"
    f.write_text(" ".join(map(str, ids)))
    cmd = [sys.executable, "-m", "openelm_rt", "perplexity", str(tiny_bf16.oelm), "--ids", str(f), "--ctx", "20",
           "--kl-base", str(tiny_bf16.oelm), "--json"]
    runs = [subprocess.run(cmd + extra, capture_output=True, text=True, env=env_with_pythonpath(), timeout=120)
            for extra in ([], ["--bf16-activations"])]
    assert all(o.returncode == 0 for o in runs), [o.stderr for o in runs]
    plain, rounded = (json.loads(o.stdout) for o in runs)
    assert plain["kl_max"] == pytest.approx(0, abs=1e-9)
    with ort.Session(str(tiny_bf16.oelm), exact=False) as s:
        want = ort.perplexity(s, ids=ids, ctx=20, kl_base=str(tiny_bf16.oelm))
        rounds = s._backend.rounds_activations("bf16")
    assert rounded["ppl"] == pytest.approx(want.ppl, rel=1e-12)
    assert rounded["kl_mean"] == pytest.approx(want.kl_mean, rel=1e-9, abs=1e-12)
    assert (rounded["kl_mean"] > 1e-9) == rounds


def test_errors(ort, tiny_noqk, tiny_f32, tmp_path):
    with pytest.raises(ValueError, match="exactly one of text= and ids="):
        ort.perplexity(str(tiny_f32.oelm))
    with pytest.raises(ValueError, match="has no tokenizer"):
        ort.perplexity(str(tiny_noqk.oelm), text="some text")
    with pytest.raises(ValueError, match="ctx must be an integer >= 2"):
        ort.perplexity(str(tiny_f32.oelm), ids=[1, 2, 3], ctx=1)
    with pytest.raises(ValueError, match="too few to predict"):
        ort.perplexity(str(tiny_f32.oelm), ids=[5])
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 three")
    out = subprocess.run([sys.executable, "-m", "openelm_rt", "perplexity", str(tiny_f32.oelm), "--ids", str(bad)],
                         capture_output=True, text=True, env=env_with_pythonpath(), timeout=60)
    assert out.returncode == 2 and "found 'three'" in out.stderr
