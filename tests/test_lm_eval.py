"""lm-evaluation-harness adapter (openelm_rt.lm_eval), end to end through lm-eval, offline.

Task configs with local JSONL data written here (multiple choice 0-shot and few-shot with
left truncation, rolling perplexity, generate_until) run through `lm_eval.simple_evaluate`
on the tiny random checkpoint. Every request's log-likelihood is recomputed by the NumPy
oracle on the token split lm-eval's `hf` model makes (tokenized here with the sentencepiece
library, not the runtime's tokenizer), and every metric from those values. Needs the
optional extra (`pip install 'openelm_rt[eval]'`); skipped without it.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="lm-eval is the optional extra openelm_rt[eval]")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import oracle  # noqa: E402
from conftest import core_or_skip, env_with_pythonpath  # noqa: E402

BOS, EOS = 1, 2
WORDS = ("the cat dog red blue runs sat on mat a tree house big small river stone why how "
         "what green quickly slowly over under light dark water fire").split()
TOL = 1e-4  # per token, absolute (the bound)


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS, size=n))


# ----------------------------------------------------------------------------- the expected values

class Expect:
    """lm-eval's `hf` rules (0.4.13) and the NumPy oracle, written from the rules, not from the adapter."""

    def __init__(self, model, sp, max_length):
        self.w, self.cfg, self.sp, self.L = model.weights, model.cfg, sp, max_length
        self._memo = {}

    def encode(self, text, bos=True):
        """Hugging Face's Llama tokenizer: split at special tokens, each text segment with its dummy prefix."""
        ids = [BOS] if bos and not text.startswith("<s>") else []
        for part in re.split(r"(<s>|</s>|<unk>)", text):
            if part:
                ids += {"<s>": [BOS], "</s>": [EOS], "<unk>": [0]}.get(part) or self.sp.encode(part)
        return ids

    def pair(self, ctx, cont):
        if ctx == "":
            c = self.encode(cont, bos=False)
            return ([BOS], c) if c[0] != BOS else (c[:1], c[1:])
        n = len(ctx) - len(ctx.rstrip())
        if n:
            ctx, cont = ctx[:-n], ctx[-n:] + cont
        whole, c = self.encode(ctx + cont), self.encode(ctx)
        return c, whole[len(c):]

    def ll_tokens(self, ctx_ids, cont_ids):
        inp = (ctx_ids + cont_ids)[-(self.L + 1):][:-1]
        key = tuple(inp)
        if key not in self._memo:
            self._memo[key] = oracle.forward(self.w, self.cfg, inp)
        logits = self._memo[key][-len(cont_ids):]
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        lp = logp[np.arange(len(cont_ids)), cont_ids]
        return float(lp.sum()), bool((logits.argmax(-1) == np.array(cont_ids)).all()), len(cont_ids)

    def loglikelihood(self, ctx, cont):
        return self.ll_tokens(*self.pair(ctx, cont))

    def rolling(self, text, hf_bos=True):
        from lm_eval import utils
        toks = self.encode(text) if hf_bos else self.encode(text, bos=False)
        total = n = 0
        for c, t in map(utils.make_disjoint_window,
                        utils.get_rolling_token_windows(toks, BOS, self.L, 1)):
            ll, _, k = self.ll_tokens(list(c), list(t))
            total, n = total + ll, n + k
        return total, n

    def greedy(self, ctx, until, max_gen, max_ctx):
        ids = self.encode(ctx)[-max_ctx:]
        out = oracle.greedy(self.w, self.cfg, ids, max_gen, eos_id=EOS)
        text = self.sp.decode([t for t in out if t != EOS])
        for s in until:
            text = text.split(s)[0]
        return text


# ----------------------------------------------------------------------------- fixtures

def _metric(name, aggregation="mean", higher_is_better=True):
    return {"metric": name, "aggregation": aggregation, "higher_is_better": higher_is_better}


@pytest.fixture(scope="module")
def ole():
    core_or_skip()
    import openelm_rt.lm_eval as m
    return m


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory, tiny_f32, sp):
    """Local tasks: oelm_mc (multiple choice, few-shot from train), oelm_ppl (rolling), oelm_gen."""
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    rng = np.random.default_rng(7)

    def mc_docs(n):
        return [{"question": _sentence(rng, int(rng.integers(3, 9))),
                 "choices": [_sentence(rng, int(rng.integers(1, 5))) for _ in range(3)],
                 "label": int(rng.integers(0, 3))} for _ in range(n)]

    def write(name, docs):
        with open(d / name, "w") as f:
            for doc in docs:
                f.write(json.dumps(doc) + "\n")

    write("mc_train.jsonl", mc_docs(6))
    write("mc_test.jsonl", mc_docs(8))
    docs = [{"text": _sentence(rng, int(rng.integers(5, 40)))} for _ in range(4)]
    docs.append({"text": "plain text with a literal </s> inside, and <s> too"})
    write("ppl_test.jsonl", docs)
    # Targets: the oracle's own greedy output for half of the prompts, so exact_match is 0.5.
    ex = Expect(tiny_f32, sp, 256)
    gen = []
    for i in range(6):
        q = _sentence(rng, int(rng.integers(2, 12)))
        out = ex.greedy(f"Q: {q}\nA:", ["e", "\n"], 6, 256 - 6)
        gen.append({"q": q, "target": out if i % 2 == 0 else out + "x"})
    write("gen_test.jsonl", gen)

    def data(**splits):
        return {"data_files": {k: str(d / v) for k, v in splits.items()}}

    common = {"dataset_path": "json", "test_split": "test", "metadata": {"version": 1.0}}
    configs = {
        "oelm_mc": {**common, "dataset_kwargs": data(train="mc_train.jsonl", test="mc_test.jsonl"),
                    "output_type": "multiple_choice", "training_split": "train", "fewshot_split": "train",
                    "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "label",
                    "doc_to_choice": "choices",
                    "metric_list": [_metric("acc"), _metric("acc_norm")]},
        "oelm_ppl": {**common, "dataset_kwargs": data(test="ppl_test.jsonl"), "output_type": "loglikelihood_rolling",
                     "doc_to_text": "", "doc_to_target": "{{text}}",
                     "metric_list": [_metric("word_perplexity", "weighted_perplexity", False),
                                     _metric("byte_perplexity", "weighted_perplexity", False),
                                     _metric("bits_per_byte", "bits_per_byte", False)]},
        "oelm_gen": {**common, "dataset_kwargs": data(test="gen_test.jsonl"), "output_type": "generate_until",
                     "doc_to_text": "Q: {{q}}\nA:", "doc_to_target": "{{target}}",
                     "generation_kwargs": {"until": ["e", "\n"], "max_gen_toks": 6, "do_sample": False},
                     "metric_list": [_metric("exact_match")]},
    }
    for name, cfg in configs.items():
        # JSON is YAML: no YAML writer needed.
        (d / f"{name}.yaml").write_text(json.dumps({"task": name, **cfg}, indent=1))
    return d


@pytest.fixture(scope="module")
def task_manager(tasks_dir):
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=str(tasks_dir), include_defaults=False)


def _evaluate(lm, tasks, task_manager, **kw):
    import lm_eval
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, log_samples=True,
                                   bootstrap_iters=0, **kw)


def _args(a):
    return tuple(a.values()) if isinstance(a, dict) else tuple(a)


def _requests(samples):
    """[(args, (ll, is_greedy) or str)] of every request of every sample, in order."""
    out = []
    for s in samples:
        for args, resp in zip(s["arguments"], s["resps"]):
            out.append((_args(args), resp[0]))
    return out


def _check_mc(res, task, ex):
    samples = res["samples"][task]
    assert samples
    acc, acc_norm = [], []
    for s in samples:
        lls = []
        for args, resp in zip(s["arguments"], s["resps"]):
            ctx, cont = _args(args)
            want, greedy, n = ex.loglikelihood(ctx, cont)
            got_ll, got_greedy = resp[0]
            assert abs(got_ll - want) <= TOL * n, (ctx, cont, got_ll, want)
            assert got_greedy == greedy
            lls.append(want)
        lls = np.array(lls)
        lens = np.array([float(len(c)) for c in s["doc"]["choices"]])
        acc.append(float(np.argmax(lls) == s["target"]))
        acc_norm.append(float(np.argmax(lls / lens) == s["target"]))
    r = res["results"][task]
    assert r["acc,none"] == pytest.approx(np.mean(acc), abs=1e-12)
    assert r["acc_norm,none"] == pytest.approx(np.mean(acc_norm), abs=1e-12)
    return samples


# ----------------------------------------------------------------------------- tests

def test_multiple_choice_zero_shot_matches_oracle(ole, tiny_f32, sp, task_manager):
    lm = ole.OpenELMLM(pretrained=str(tiny_f32.oelm), threads=2)
    res = _evaluate(lm, ["oelm_mc"], task_manager)
    _check_mc(res, "oelm_mc", Expect(tiny_f32, sp, lm.max_length))
    assert lm.stats["tokens_forwarded"] < lm.stats["tokens_requested"]  # the question shared by its choices


def test_multiple_choice_few_shot_truncated_matches_oracle_with_and_without_reuse(ole, tiny_f32, sp, task_manager):
    L = 40  # shorter than every 3-shot context: each is cut from the left
    runs = {}
    for reuse in (True, False):
        lm = ole.OpenELMLM(pretrained=str(tiny_f32.oelm), threads=2, max_length=L, prefix_reuse=reuse)
        res = _evaluate(lm, ["oelm_mc"], task_manager, num_fewshot=3)
        runs[reuse] = (res, lm.stats)
    ex = Expect(tiny_f32, sp, L)
    samples = _check_mc(runs[True][0], "oelm_mc", ex)
    assert any(sum(map(len, ex.pair(*_args(a)))) > L + 1 for s in samples for a in s["arguments"]), \
        "no request was long enough to be truncated"
    # Prefix reuse changes the work, not a bit of any result.
    assert _requests(samples) == _requests(runs[False][0]["samples"]["oelm_mc"])
    assert runs[True][0]["results"]["oelm_mc"] == runs[False][0]["results"]["oelm_mc"]
    on, off = runs[True][1], runs[False][1]
    assert on["tokens_requested"] == off["tokens_requested"]
    assert on["tokens_forwarded"] < off["tokens_forwarded"] == off["tokens_requested"]


def test_rolling_perplexity_matches_oracle(ole, tiny_f32, sp, task_manager):
    L = 16  # several windows per document
    lm = ole.OpenELMLM(pretrained=str(tiny_f32.oelm), threads=2, max_length=L)
    res = _evaluate(lm, ["oelm_ppl"], task_manager)
    ex = Expect(tiny_f32, sp, L)
    lls, words, nbytes = [], 0, 0
    for s in res["samples"]["oelm_ppl"]:
        text = s["doc"]["text"]
        want, n = ex.rolling(text)
        got = s["resps"][0][0]
        got = got[0] if isinstance(got, (list, tuple)) else got
        assert abs(got - want) <= TOL * n, (text, got, want)
        lls.append(got)  # checked against the oracle above; the metrics are recomputed from them
        words += len(re.split(r"\s+", text))
        nbytes += len(text.encode("utf-8"))
    r = res["results"]["oelm_ppl"]
    assert r["word_perplexity,none"] == pytest.approx(math.exp(-sum(lls) / words), rel=1e-9)
    assert r["byte_perplexity,none"] == pytest.approx(math.exp(-sum(lls) / nbytes), rel=1e-9)
    assert r["bits_per_byte,none"] == pytest.approx(-sum(lls) / nbytes / math.log(2), rel=1e-9)


def test_rolling_bos_variants(ole, tiny_f32, sp):
    from lm_eval.api.instance import Instance
    text = "the cat sat on the mat " * 5
    ex = Expect(tiny_f32, sp, 24)
    got = {}
    for mode in ("hf", "clean"):
        lm = ole.OpenELMLM(pretrained=str(tiny_f32.oelm), threads=2, max_length=24, rolling_bos=mode)
        got[mode] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)[0]
    for mode, hf_bos in (("hf", True), ("clean", False)):
        want, n = ex.rolling(text, hf_bos=hf_bos)
        assert abs(got[mode] - want) <= TOL * n
    # hf's variant also scores log p(BOS | BOS): one more (negative) term in its first window.
    assert got["hf"] != got["clean"]


def test_generate_until_matches_oracle_greedy(ole, tiny_f32, sp, task_manager):
    lm = ole.OpenELMLM(pretrained=str(tiny_f32.oelm), threads=2)
    res = _evaluate(lm, ["oelm_gen"], task_manager)
    ex = Expect(tiny_f32, sp, lm.max_length)
    hits = []
    for s in res["samples"]["oelm_gen"]:
        ctx = _args(s["arguments"][0])[0]
        want = ex.greedy(ctx, ["e", "\n"], 6, lm.max_length - 6)
        assert s["resps"][0][0] == want
        hits.append(float(want == s["doc"]["target"]))
    assert res["results"]["oelm_gen"]["exact_match,none"] == pytest.approx(np.mean(hits)) == 0.5


def test_use_cache_second_run_computes_nothing(ole, tiny_f32, task_manager, tmp_path):
    cache = str(tmp_path / "lm_cache")
    lm1 = ole.OpenELMLM(pretrained=str(tiny_f32.oelm), threads=2)
    r1 = _evaluate(lm1, ["oelm_mc", "oelm_ppl", "oelm_gen"], task_manager, use_cache=cache)
    assert lm1.stats["tokens_forwarded"] > 0 and lm1.stats["generate_requests"] > 0
    lm2 = ole.OpenELMLM(pretrained=str(tiny_f32.oelm), threads=2)
    r2 = _evaluate(lm2, ["oelm_mc", "oelm_ppl", "oelm_gen"], task_manager, use_cache=cache)
    assert lm2.stats == {k: 0 for k in lm2.stats}
    assert lm2.session.stats["tokens_forwarded"] == 0
    for t in ("oelm_mc", "oelm_ppl", "oelm_gen"):
        assert r2["results"][t] == r1["results"][t]


def test_special_token_text_empty_context_and_long_continuation(ole, tiny_f32, sp):
    from lm_eval.api.instance import Instance
    L = 32
    lm = ole.OpenELMLM(pretrained=str(tiny_f32.oelm), threads=2, max_length=L)
    ex = Expect(tiny_f32, sp, L)
    # A literal </s> is the EOS token, as in Hugging Face's tokenizer; the text after it gets its dummy prefix.
    assert lm.tok_encode("a cat</s> sat") == [BOS] + sp.encode("a cat") + [EOS] + sp.encode(" sat")
    assert lm.tok_encode("<s>the cat") == [BOS] + sp.encode("the cat")
    assert lm.tok_encode("") == [BOS]
    assert lm.tok_decode([EOS], skip_special_tokens=False) == "</s>"
    reqs = [("the dog </s> a", " cat"), ("", "the cat sat"), ("a", "</s>"), ("river ", " stone ")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, r, 0) for r in reqs], disable_tqdm=True)
    for r, (ll, greedy) in zip(reqs, got):
        want, wg, n = ex.loglikelihood(*r)
        assert abs(ll - want) <= TOL * n and greedy == wg, r
    # A continuation longer than max_length: hf cannot score it either; the error says so.
    long_cont = " " + " ".join(["water"] * (L + 4))
    with pytest.raises(ValueError, match="more than max_length 32"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("q", long_cont), 0)], disable_tqdm=True)


def test_constructor_errors(ole, tiny_f32, tmp_path):
    with pytest.raises(ValueError, match="unknown model argument.*max_len\\b"):
        ole.OpenELMLM(pretrained=str(tiny_f32.oelm), max_len=10)
    with pytest.raises(ValueError, match="pass pretrained"):
        ole.OpenELMLM()
    with pytest.raises(ValueError, match="rolling_bos"):
        ole.OpenELMLM(pretrained=str(tiny_f32.oelm), rolling_bos="yes")
    with pytest.raises(ValueError, match=">= 2, got 1"):
        ole.OpenELMLM(pretrained=str(tiny_f32.oelm), max_length=1)
    # The CLI's arguments and the model card's are accepted.
    lm = ole.OpenELMLM(pretrained=str(tiny_f32.oelm), batch_size=1, max_batch_size=None, device="cuda:0",
                       trust_remote_code=True, add_bos_token="True", tokenizer="meta-llama/Llama-2-7b-hf")
    assert lm.add_bos_token is True
    # bf16 weights: exact f32 activations unless exact=False asks for bf16-rounded ones.
    assert lm.session._backend.exact is True
    assert ole.OpenELMLM(pretrained=str(tiny_f32.oelm), exact="false").session._backend.exact is False
    from lm_eval.api.instance import Instance
    with pytest.raises(ValueError, match="num_beams"):
        lm.generate_until([Instance("generate_until", {}, ("a", {"until": ["\n"], "num_beams": 4}), 0)],
                          disable_tqdm=True)


def test_registered_and_python_api(ole, tiny_f32):
    from lm_eval.api.registry import get_model, model_registry
    assert get_model("openelm_rt") is ole.OpenELMLM
    assert {"hf", "vllm", "local-completions"} <= set(model_registry.keys())  # the built-in models stay visible
    lm = get_model("openelm_rt").create_from_arg_string(f"pretrained={tiny_f32.oelm},threads=1,max_length=64",
                                                        {"batch_size": 1, "device": "cuda:0"})
    assert lm.max_length == 64 and lm.session.threads == 1


def test_checkpoint_directory(ole, tiny_f32, tokenizer_path, tmp_path, monkeypatch):
    """pretrained=DIR: exported once into the cache (tests/test_autoexport.py has the rest)."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_f32.ckpt_dir, ckpt)
    shutil.copy(tokenizer_path, ckpt / "tokenizer.model")
    monkeypatch.setenv("OPENELM_RT_CACHE", str(tmp_path / "cache"))
    lm = ole.OpenELMLM(pretrained=str(ckpt), threads=1, dtype="bf16")
    made = list((tmp_path / "cache").glob("*.oelm"))
    assert [lm.session.path] == [str(p) for p in made] and "-bf16-" in lm.session.path
    with pytest.raises(ValueError, match="carries its own tokenizer"):
        ole.OpenELMLM(pretrained=str(tiny_f32.oelm), tokenizer=str(tokenizer_path))


def test_cli_launcher(ole, tiny_f32, tasks_dir, tmp_path):
    """`openelm-rt-eval` is lm-eval's CLI with --model openelm_rt as the default."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "openelm_rt", "eval", "--model_args", f"pretrained={tiny_f32.oelm},threads=2",
           "--tasks", "oelm_mc", "--include_path", str(tasks_dir), "--output_path", str(out)]
    p = subprocess.run(cmd, env=env_with_pythonpath(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "oelm_mc" in p.stdout and "acc_norm" in p.stdout
    assert "openelm_rt" in p.stdout
    results = list(out.rglob("results_*.json"))
    assert results and json.loads(results[0].read_text())["results"]["oelm_mc"]["acc,none"] >= 0


def test_card_runs_and_table(ole, tiny_f32, task_manager):
    """run_card (openelm-rt eval --card) with the card's runs replaced by local tasks."""
    import io
    lm = ole.OpenELMLM(pretrained=str(tiny_f32.oelm), threads=2, max_length=64)
    buf = io.StringIO()
    table = ole.run_card(lm, runs=((0, ("oelm_mc",)), (2, ("oelm_mc",))), task_manager=task_manager, out=buf,
                         bootstrap_iters=0)
    assert sorted(table) == [("oelm_mc", 0), ("oelm_mc", 2)]
    lines = buf.getvalue().splitlines()
    assert lines[0] == "| task | shots | acc | acc_norm | pct_stereotype |"
    for (task, shots), r in table.items():
        assert f"| {task} | {shots} | {100 * r['acc,none']:.2f} | {100 * r['acc_norm,none']:.2f} | - |" in lines


# The model card's "Evaluate OpenELM" script (apple/OpenELM-* README), in its order.
CARD = [(0, ["arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "race", "winogrande", "sciq",
             "truthfulqa_mc2"]),
        (5, ["mmlu", "winogrande"]),
        (25, ["arc_challenge", "crows_pairs_english"]),
        (10, ["hellaswag"])]


def test_card_preset_is_the_cards_four_invocations(ole):
    """--card runs exactly the card's task/shot lists, and lm-eval knows every task name."""
    from lm_eval.tasks import TaskManager
    assert [(s, list(t)) for s, t in ole.CARD_RUNS] == CARD
    known = set(TaskManager().all_tasks)
    missing = sorted({t for _, ts in CARD for t in ts} - known)
    assert not missing, f"lm-eval {__import__('lm_eval').__version__} lacks the card's tasks {missing}"


def test_card_default_runs_and_table_rows(ole, monkeypatch):
    """run_card's default runs call lm-eval once per card invocation, in order; the table has a
    row per named task (a group's aggregate, not its subtasks) and crows_pairs' pct_stereotype."""
    import io

    import lm_eval
    calls = []

    def fake_evaluate(model, tasks, num_fewshot, **kw):
        calls.append((num_fewshot, list(tasks)))
        results, groups = {}, {}
        for k, t in enumerate(tasks):
            if t == "mmlu":  # a group: its subtasks in results, the aggregate in groups
                results["mmlu_anatomy"] = {"acc,none": 0.125}
                groups["mmlu"] = {"acc,none": 0.25 + num_fewshot / 1000}
            elif t.startswith("crows_pairs"):
                results[t] = {"likelihood_diff,none": 3.5, "pct_stereotype,none": 0.5 + k / 100}
            else:
                results[t] = {"acc,none": 0.5 + k / 100 + num_fewshot / 1000,
                              "acc_norm,none": 0.25 + k / 100 + num_fewshot / 1000}
        return {"results": results, "groups": groups}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_evaluate)
    buf = io.StringIO()
    table = ole.run_card(object(), out=buf)
    assert calls == CARD
    rows = buf.getvalue().splitlines()[2:]
    assert [tuple(r.split(" | ")[:2]) for r in rows] == [("| " + t, str(s)) for s, ts in CARD for t in ts]
    assert "| crows_pairs_english | 25 | - | - | 51.00 |" in rows
    assert "| mmlu | 5 | 25.50 | - | - |" in rows
    assert "| arc_challenge | 25 | 52.50 | 27.50 | - |" in rows
    assert ("mmlu_anatomy", 5) in table and table[("mmlu", 5)]["acc,none"] == 0.255
