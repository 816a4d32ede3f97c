"""The n-gram cache of speculative generation (llama.cpp's lookup decoding): its drafts equal a
from-scratch transcription of llama.cpp's rule on random sequences, the Session's history
of generations (bounded, updated incrementally) counts what a fresh count would, and greedy
output with the cache (alone, with a corpus, in the adaptive default beside prompt lookup and
an assistant) is plain greedy output bit for bit; seeded sampling gives the plain tokens.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import prompt_ids, run_cli

EOS = 2


@pytest.fixture(scope="module")
def sessions(ort, tiny_f32_all_dtypes):
    ss = {dt: ort.Session(str(tiny_f32_all_dtypes[dt]), threads=2) for dt in ("f32", "q8", "q4")}
    yield ss
    for s in ss.values():
        s.close()


def _same(a, b):
    assert a.token_ids == b.token_ids
    assert a.finish_reason == b.finish_reason
    assert a.text == b.text


# ----------------------------------------------------------------------------- the drafting rule

LAX = ((2, 2, 1, 1), (66, 50, 50, 50))
STRICT = ((4, 3, 2, 2), (75, 66, 66, 66))


def _followers(seqs, gram):
    """Counts of the tokens that follow `gram` anywhere in `seqs`, by a scan."""
    n, out = len(gram), {}
    for s in seqs:
        for i in range(n, len(s)):
            if tuple(s[i - n:i]) == gram:
                out[s[i]] = out.get(s[i], 0) + 1
    return out


def ref_draft(tokens, k, dynamic_seqs, static_seqs, eos):
    """llama.cpp's common_ngram_cache_draft, transcribed over scans instead of hash maps (ties
    to the lowest token id): context = this sequence, n-grams 1..4 with lax thresholds, then
    the dynamic sequences with strict ones, then the static 2-gram; static counts x100 weight
    the candidates."""
    if len(tokens) < 2:
        return []
    draft = []
    while len(draft) < k:
        seq = list(tokens) + draft
        st_part = _followers(static_seqs, tuple(seq[-2:])) if static_seqs else {}

        def try_primary(seqs, thr):
            for n in range(min(4, len(seq)), 0, -1):
                part = _followers(seqs, tuple(seq[-n:]))
                if not part:
                    continue
                total = sum(part.values())
                w = {t: c * (100 * st_part[t] if t in st_part else 1) for t, c in part.items()}
                best = min(w, key=lambda t: (-w[t], t))
                if total < thr[0][n - 1] or 100 * part[best] < thr[1][n - 1] * total:
                    continue
                return best
            return None

        tok = try_primary([list(tokens)], LAX)  # counts of the sequence itself, keys over it + draft
        if tok is None and dynamic_seqs:
            tok = try_primary(dynamic_seqs, STRICT)
        if tok is None and st_part:
            total = sum(st_part.values())
            best = min(st_part, key=lambda t: (-st_part[t], t))
            if total >= 2 and 100 * st_part[best] >= 50 * total:
                tok = best
        if tok is None:
            break
        draft.append(tok)
        if tok == eos:
            break
    return draft


def _lookup(tokens, dynamic_seqs, static_seqs):
    from openelm_rt.speculative import NgramCache, NgramLookup
    dyn = NgramCache(1, 4)
    for s in dynamic_seqs:
        dyn.add(s)
    sta = NgramCache()
    for s in static_seqs:
        sta.add(s)
    nl = NgramLookup(EOS, dyn, sta)
    for t in tokens:  # one at a time, as generation appends them
        nl.extend([t])
    return nl


@settings(max_examples=200, deadline=None)
@given(seq=st.lists(st.integers(0, 4), min_size=1, max_size=30),
       dyn=st.lists(st.lists(st.integers(0, 4), max_size=25), max_size=3),
       sta=st.lists(st.lists(st.integers(0, 4), max_size=25), max_size=2), k=st.integers(1, 6))
def test_ngram_draft_equals_llama_cpp_rule(seq, dyn, sta, k):
    """The incremental caches draft exactly what the rule computed from scratch drafts."""
    nl = _lookup(seq, dyn, sta)
    assert nl.propose(k) == ref_draft(seq, k, dyn, sta, EOS)


def test_ngram_draft_examples():
    # context: "5 6" seen twice, followed by 7 each time -> 7, then "6 7" -> 8 ...
    nl = _lookup([5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [], [])
    assert nl.propose(4) == [7, 8, 5, 6]
    # an EOS ends the draft (it is proposed: generation would end there)
    nl = _lookup([5, 6, EOS, 9, 5, 6, EOS, 9, 5, 6], [], [])
    assert nl.propose(4) == [EOS]
    # a 4-gram seen once in earlier generations is not enough (strict: 2), twice is
    assert _lookup([9, 1, 3, 4, 5], [[1, 3, 4, 5, 7]], []).propose(3) == []
    assert _lookup([9, 1, 3, 4, 5], [[1, 3, 4, 5, 7, 8]] * 2, []).propose(2) == [7, 8]
    # the static corpus alone: "4 5" followed by 6 twice
    assert _lookup([9, 4, 5], [], [[4, 5, 6, 0, 4, 5, 6]]).propose(1) == [6]


def test_ngram_cache_add_remove_and_history_bound():
    from openelm_rt.speculative import NgramCache, NgramHistory
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 6, size=int(rng.integers(2, 40))).tolist() for _ in range(30)]
    h = NgramHistory(limit=100)
    for i, s in enumerate(seqs):
        h.record(s)
        if i % 7 == 3:
            h.cache()  # built part way, then kept up to date incrementally
        assert h.total <= 100
    fresh = NgramCache(1, 4)
    for s in h.seqs:
        fresh.add(s)
    assert h.cache().counts == fresh.counts
    c = NgramCache(1, 4).add(seqs[0]).add(seqs[1])
    c.remove(seqs[1])
    c.remove(seqs[0])
    assert c.counts == {}


# ----------------------------------------------------------------------------- generation: exact

@pytest.mark.parametrize("dtype", ["f32", "q8", "q4"])
@pytest.mark.parametrize("penalty", [1.0, 1.2])
def test_greedy_with_the_ngram_cache_is_exact(ort, tiny_f32_all_dtypes, dtype, penalty):
    """A fresh Session: the dynamic cache fills with each generation; after two the third
    repeats of the same prompt draft almost everything, and every output is plain greedy."""
    with ort.Session(str(tiny_f32_all_dtypes[dtype]), threads=2) as s:
        prompts = [prompt_ids(14, seed=i) for i in range(2)]
        refs = [s.generate(p, max_new_tokens=40, repetition_penalty=penalty) for p in prompts]
        for mode in ("hf", "adaptive"):
            for p, ref in zip(prompts, refs):
                r = s.generate(p, max_new_tokens=40, repetition_penalty=penalty, ngram_cache=True,
                               speculation=mode, ngram_num_tokens=8)
                _same(r, ref)
                assert set(r.speculation["sources"]) == {"ngram_cache"}
        # by now each prompt's sequence was generated 3-4 times: the dynamic cache knows it
        r = s.generate(prompts[0], max_new_tokens=40, repetition_penalty=penalty, ngram_cache=True,
                       speculation="hf", ngram_num_tokens=8)
        _same(r, refs[0])
        assert r.speculation["accepted"] >= 30, r.speculation


def test_ngram_corpus_text_ids_and_prebuilt(sessions):
    s = sessions["f32"]
    p = prompt_ids(12, seed=21)
    ref = s.generate(p, max_new_tokens=30)
    corpus_ids = (p + ref.token_ids) * 2  # a corpus that contains the answer
    for corpus in (corpus_ids, [corpus_ids, [5, 6, 7]], s.build_ngram_cache(corpus_ids)):
        r = s.generate(p, max_new_tokens=30, ngram_corpus=corpus, speculation="hf", ngram_num_tokens=6)
        _same(r, ref)
        assert r.speculation["accepted"] >= 20, r.speculation
    text = "Once upon a time there was a little dog. Once upon a time there was a little dog."
    ref = s.generate("Once upon a time", max_new_tokens=20)
    r = s.generate("Once upon a time", max_new_tokens=20, ngram_corpus=text)
    _same(r, ref)
    assert r.speculation is not None and "ngram_cache" in r.speculation["sources"]


def test_adaptive_default_tries_the_ngram_cache_before_the_assistant(ort, tiny_f32_all_dtypes):
    with ort.Session(str(tiny_f32_all_dtypes["f32"]), threads=2) as s, \
            ort.Session(str(tiny_f32_all_dtypes["q8"]), threads=2) as a:
        p = prompt_ids(10, seed=30)
        ref = s.generate(p, max_new_tokens=30)
        s.generate(p, max_new_tokens=30)
        r = s.generate(p, max_new_tokens=30, assistant_model=a)  # adaptive: n-gram cache on
        _same(r, ref)
        assert set(r.speculation["sources"]) == {"ngram_cache", "assistant"}
        assert r.speculation["sources"]["ngram_cache"]["proposed"] > 0
        r = s.generate(p, max_new_tokens=30, assistant_model=a, ngram_cache=False)
        _same(r, ref)
        assert set(r.speculation["sources"]) == {"assistant"}
        r = s.generate(p, max_new_tokens=30, prompt_lookup_num_tokens=5, speculation="hf")  # HF: no cache
        _same(r, ref)
        assert set(r.speculation["sources"]) == {"prompt_lookup"}


def test_seeded_sampling_with_the_ngram_cache_equals_plain(sessions):
    s = sessions["q8"]
    p = prompt_ids(12, seed=40)
    kw = dict(max_new_tokens=30, temperature=0.7, top_k=10, repetition_penalty=1.1)
    for seed in range(3):
        ref = s.generate(p, seed=seed, **kw)
        r = s.generate(p, seed=seed, ngram_corpus=(p + ref.token_ids) * 2, speculation="hf", **kw)
        _same(r, ref)


def test_ngram_errors(sessions):
    s = sessions["f32"]
    p = prompt_ids(5)
    with pytest.raises(ValueError, match="ngram_cache must be True, False or None"):
        s.generate(p, ngram_cache="yes")
    with pytest.raises(ValueError, match="ngram_corpus must be text, token ids"):
        s.generate(p, ngram_corpus=3.5)
    with pytest.raises(ValueError, match=r"ngram_corpus\[1\]\[0\] = 99999 is outside the vocabulary"):
        s.generate(p, ngram_corpus=[[1, 2], [99999]])
    with pytest.raises(ValueError, match="ngram_cache=False"):
        s.generate(p, ngram_corpus=[1, 2, 3], ngram_cache=False)
    with pytest.raises(ValueError, match="ngram_num_tokens must be >= 1"):
        s.generate(p, ngram_cache=True, ngram_num_tokens=0)
    assert s.generate(p, max_new_tokens=2, ngram_cache=False).speculation is None


def test_cli_ngram_flags(sessions, tiny_f32_all_dtypes, tmp_path):
    s = sessions["f32"]
    prompt = "Once upon a time there was"
    ref = s.generate(prompt, max_new_tokens=12)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(prompt + ref.text + "\n" + prompt + ref.text)
    p = run_cli("generate", "--model", tiny_f32_all_dtypes["f32"], "--prompt", prompt, "--max-new-tokens", 12,
             "--ngram_corpus", corpus, "--speculation", "hf")
    assert p.returncode == 0, p.stderr
    assert p.stdout == prompt + ref.text + "\n"
    assert "speculation hf" in p.stderr
    p = run_cli("generate", "--model", tiny_f32_all_dtypes["f32"], "--prompt", prompt, "--max-new-tokens", 12,
             "--generate_kwargs", "ngram_cache=true", "ngram_num_tokens=4")
    assert p.returncode == 0, p.stderr
    assert p.stdout == prompt + ref.text + "\n"
    p = run_cli("generate", "--model", tiny_f32_all_dtypes["f32"], "--prompt", "hi", "--ngram_corpus",
             tmp_path / "missing.txt")
    assert p.returncode == 2 and p.stdout == "" and "ngram_corpus" in p.stderr
