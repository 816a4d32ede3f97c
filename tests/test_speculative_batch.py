"""Speculation in batched generation: each row proposes its own tokens (prompt lookup, the
n-gram cache) and one Runtime step checks every row's proposals. Every row's output equals
plain greedy generation bit for bit (every weight type, repetition penalty, rows with
different accept patterns, per-row max_new_tokens, EOS and max_new_tokens mid-run, stop
strings, the context limit, more prompts than max_batch), seeded sampling gives the plain
tokens, streams and early closes leave no sequence behind, and the per-row allocation of the
adaptive mode follows the cost curve and the acceptance rates.
"""
import pytest

from conftest import build_model, favour_token_patch, prompt_ids

from openelm_rt.speculative import ADAPTIVE_MAX_TOKENS

EOS = 2


@pytest.fixture(scope="module")
def sessions(ort, tiny_f32_all_dtypes):
    ss = {dt: ort.Session(str(p), threads=2, max_batch=4) for dt, p in tiny_f32_all_dtypes.items()}
    yield ss
    for s in ss.values():
        s.close()


def _prompts(n_rows=6):
    """Rows that copy (a repeat in the prompt: prompt lookup accepts) and rows that do not."""
    out = []
    for i in range(n_rows):
        p = prompt_ids(10 + i, seed=50 + i)
        out.append(p + p[1:9] if i % 2 == 0 else p)
    return out


def _check_rows(results, refs):
    assert len(results) == len(refs)
    for r, ref in zip(results, refs):
        assert r.token_ids == ref.token_ids
        assert r.finish_reason == ref.finish_reason
        assert r.text == ref.text


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8", "q4"])
@pytest.mark.parametrize("penalty", [1.0, 1.2])
def test_batched_greedy_speculation_is_exact(sessions, dtype, penalty):
    s = sessions[dtype]
    n_seqs = s._rt.n_seqs
    prompts = _prompts()
    max_new = [40, 1, 17, 40, 0, 33]  # per row: one token, none, different lengths
    refs = [s.generate(p, max_new_tokens=m, repetition_penalty=penalty) for p, m in zip(prompts, max_new)]
    for mode in ("hf", "adaptive"):
        res = s.generate_batch(prompts, max_new_tokens=max_new, repetition_penalty=penalty,
                               prompt_lookup_num_tokens=6, speculation=mode)
        _check_rows(res, refs)
        # 6 prompts, max_batch 4: later rows were admitted as earlier ones finished
        if mode == "hf" and penalty == 1.0:  # every match is checked (adaptive: what pays here; a
            # penalty keeps the output from repeating the prompt, so there may be no match)
            assert sum(r.speculation["proposed"] for r in res) > 0
        for r, m in zip(res, max_new):
            sp = r.speculation
            assert sp["mode"] == mode
            # hf: prompt lookup only, 6 a step; adaptive: also the n-gram cache over the Session's
            # earlier generations (these refs among them), up to ADAPTIVE_MAX_TOKENS a step
            per_step = 6 if mode == "hf" else max(6, ADAPTIVE_MAX_TOKENS)
            assert sp["accepted"] <= sp["proposed"] <= per_step * sp["verify_steps"]
            assert sp["steps"] <= len(r.token_ids)
            if m <= 1:  # no room for a proposal that could be used
                assert sp["proposed"] == 0
    assert s._rt.n_seqs == n_seqs  # every row's sequence was freed


def test_rows_have_different_accept_patterns(sessions):
    """In one batch a row whose text the n-gram history knows (the Session generated it four
    times) accepts almost every proposal while a row with a repetition penalty (no loops to
    copy) accepts few, and both outputs are exact (hf mode checks every proposal)."""
    from openelm_rt.speculative import NgramHistory
    s = sessions["f32"]
    s._ngram_history = NgramHistory()
    prompts = [prompt_ids(11, seed=70), prompt_ids(9, seed=77)]
    penalty = [1.0, 1.3]
    refs = [s.generate(p, max_new_tokens=30, repetition_penalty=r) for p, r in zip(prompts, penalty)]
    for _ in range(3):
        s.generate(prompts[0], max_new_tokens=30)
    res = s.generate_batch(prompts, max_new_tokens=30, repetition_penalty=penalty, ngram_cache=True,
                           speculation="hf")
    _check_rows(res, refs)
    a = [r.speculation["accepted"] / max(1, r.speculation["proposed"]) for r in res]
    assert res[0].speculation["accepted"] >= 25 and a[0] > a[1], [r.speculation for r in res]


@pytest.fixture(scope="module")
def eos_model(ort, work_dir, tokenizer_path):
    """Greedy runs end in EOS after a few tokens (test_speculative's model, batched)."""
    m = build_model(work_dir, tokenizer_path, "spec_eos_batch", seed=5, patch=favour_token_patch(EOS, 3.5))
    s = ort.Session(str(m.oelm), threads=2, max_batch=3)
    yield s
    s.close()


def test_eos_and_max_new_tokens_mid_run(eos_model):
    s = eos_model
    n_seqs = s._rt.n_seqs
    prompts = [prompt_ids(6, seed=i) for i in range(8)]
    prompts = [p + p[1:5] for p in prompts]
    refs = [s.generate(p, max_new_tokens=25) for p in prompts]
    assert sum(r.finish_reason == "eos" for r in refs) >= 2
    assert any(r.finish_reason == "length" for r in refs)
    # the copy of a sequence that ended in EOS, as corpus: drafts run through the EOS
    corpus = [r.prompt_token_ids + r.token_ids for r in refs] * 2
    for kw in (dict(prompt_lookup_num_tokens=8), dict(ngram_corpus=corpus, ngram_num_tokens=8)):
        for mode in ("hf", "adaptive"):
            _check_rows(s.generate_batch(prompts, max_new_tokens=25, speculation=mode, **kw), refs)
    assert s._rt.n_seqs == n_seqs


def test_stop_strings_stream_and_context_limit(ort, tiny_f32_all_dtypes):
    with ort.Session(str(tiny_f32_all_dtypes["f32"]), threads=2, max_context=48, max_batch=4) as s:
        n_seqs = s._rt.n_seqs
        texts = ["Once upon a time there was a time", "The capital of France is the capital", "def f(x): return f(x)"]
        plain = [s.generate(t, max_new_tokens=60) for t in texts]
        stops = [p.text[4:7] for p in plain]
        refs = [s.generate(t, max_new_tokens=60, stop=st) for t, st in zip(texts, stops)]
        res = s.generate_batch(texts, max_new_tokens=60, stop=[[st] for st in stops], prompt_lookup_num_tokens=5)
        _check_rows(res, refs)
        assert all(r.finish_reason == "stop" for r in res)
        # no stop: the rows run into the 48-token context
        assert all(p.finish_reason == "context" for p in plain)
        it = s.generate_batch(texts, max_new_tokens=60, prompt_lookup_num_tokens=5, stream=True)
        got = {i: "" for i in range(len(texts))}
        for i, piece in it:
            got[i] += piece
        _check_rows(it.results, plain)
        assert [got[i] for i in range(len(texts))] == [p.text for p in plain]
        it = s.generate_batch(texts, max_new_tokens=60, prompt_lookup_num_tokens=5, stream=True)
        next(it)
        it.close()
        assert s._rt.n_seqs == n_seqs


def test_seeded_sampling_rows_equal_plain(sessions):
    s = sessions["q8"]
    prompts = _prompts(4)
    kw = dict(max_new_tokens=30, temperature=0.8, top_k=20, repetition_penalty=1.1)
    seeds = [3, 4, 5, 6]
    refs = s.generate_batch(prompts, seed=seeds, **kw)
    for _ in range(3):  # the n-gram history then proposes exactly what each seed draws
        for r in refs:
            s._ngram_history.record(r.prompt_token_ids + r.token_ids)
    res = s.generate_batch(prompts, seed=seeds, prompt_lookup_num_tokens=6, speculation="hf", ngram_cache=True,
                           **kw)
    _check_rows(res, refs)
    assert sum(r.speculation["accepted"] for r in res) >= 60, [r.speculation for r in res]


def test_allocation():
    from openelm_rt.speculative import allocate
    flat = [1.0] * 40            # a step costs the same whatever its size: check everything useful
    assert allocate([0.9, 0.9], [3, 5], flat) == [3, 5]
    linear = [float(n) for n in range(1, 41)]  # cost proportional to tokens: speculation never pays
    assert allocate([0.9, 0.9], [3, 5], linear) == [0, 0]
    # the marginal token goes to the row most likely to accept it
    curve = [1.0] * 3 + [1.0 + 0.4 * n for n in range(1, 38)]
    k = allocate([0.95, 0.2], [4, 4], curve)
    assert k[0] > k[1] and k[1] == 0
    assert allocate([0.0, 0.0], [4, 4], flat) == [0, 0]


def test_errors(sessions):
    s = sessions["f32"]
    with pytest.raises(ValueError, match="generate_batch does not take an assistant"):
        s.generate_batch([prompt_ids(4)], assistant_model=s)
    with pytest.raises(ValueError, match="speculation must be one of"):
        s.generate_batch([prompt_ids(4)], prompt_lookup_num_tokens=3, speculation="fast")
    res = s.generate_batch([prompt_ids(4)], max_new_tokens=3)
    assert res[0].speculation is None
