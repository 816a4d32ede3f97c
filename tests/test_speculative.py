"""Speculative generation (prompt lookup, assistant model): greedy output equal to plain
generation bit for bit (every weight type, repetition penalty, stop strings, EOS inside an
accepted run, max_new_tokens and the context reached mid-run), prompt-lookup proposals equal
to a transcription of Hugging Face's rule, seeded sampling with prompt lookup equal to plain
sampling, sampling with an assistant matching the target distribution (chi-square), the KV
caches after any accept/reject pattern equal to a fresh prefill, errors, and the CLI flags.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import build_model, favour_token_patch, prompt_ids, run_cli

DTYPES = ["f32", "f16", "bf16", "q8", "q4"]
EOS = 2


@pytest.fixture(scope="module")
def exports(tiny_f32_all_dtypes):
    return tiny_f32_all_dtypes


@pytest.fixture(scope="module")
def sessions(ort, exports):
    ss = {dt: ort.Session(str(p), threads=2) for dt, p in exports.items()}
    yield ss
    for s in ss.values():
        s.close()


@pytest.fixture(scope="module")
def draft(ort, work_dir, tokenizer_path):
    """Another random model with the same tokenizer: an assistant that is mostly wrong."""
    m = build_model(work_dir, tokenizer_path, "spec_draft", seed=11,
                    config_overrides={"num_transformer_layers": 2})
    s = ort.Session(str(m.oelm), threads=2)
    yield s
    s.close()


@pytest.fixture(scope="module")
def eos_model(ort, work_dir, tokenizer_path):
    """A model whose LM head favours EOS (its embedding row scaled up): greedy runs end in EOS
    after a few tokens, so an EOS lands inside accepted runs."""
    m = build_model(work_dir, tokenizer_path, "spec_eos", seed=5, patch=favour_token_patch(EOS, 3.5))
    s = ort.Session(str(m.oelm), threads=2)
    yield s
    s.close()


def _plain(s, prompt, **kw):
    return s.generate(prompt, **kw)


def _same(a, b):
    assert a.token_ids == b.token_ids
    assert a.finish_reason == b.finish_reason
    assert a.text == b.text


# ----------------------------------------------------------------------------- prompt lookup rule

def hf_prompt_lookup(ids, num_output_tokens, max_ngram, eos, max_length=10**9):
    """transformers' PromptLookupCandidateGenerator.get_candidates, transcribed (NumPy for torch)."""
    input_ids = np.asarray(ids)[None, :]
    input_length = input_ids.shape[1]
    chosen_ids = None
    match_found = False
    for ngram_size in range(min(max_ngram, input_length - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(input_ids, ngram_size, axis=1)
        ngram_tensor = input_ids[0, -ngram_size:]
        matches = (windows == ngram_tensor).all(axis=2)
        match_indices = matches.nonzero()[1]
        for idx in match_indices:
            start_idx = idx + ngram_size
            end_idx = start_idx + num_output_tokens
            end_idx = min(end_idx, input_length, max_length)
            if start_idx < end_idx:
                chosen_ids = input_ids[0, start_idx:end_idx]
                match_found = True
                eos_idx = np.nonzero(chosen_ids == eos)[0]
                if eos_idx.size > 0:
                    chosen_ids = chosen_ids[:eos_idx[0]]
                break
        if match_found:
            break
    if chosen_ids is None or len(chosen_ids) == 0:
        return []
    return chosen_ids.tolist()


@settings(max_examples=300, deadline=None)
@given(seq=st.lists(st.integers(0, 5), min_size=1, max_size=40), n=st.integers(1, 6),
       max_ngram=st.integers(1, 4))
def test_prompt_lookup_equals_hf_rule(seq, n, max_ngram):
    """At every length of a random sequence over 6 ids (EOS among them), the incremental index
    proposes exactly what HF's scan proposes: left-most match, longest n first, EOS cut."""
    from openelm_rt.speculative import PromptLookup
    pl = PromptLookup(max_ngram, EOS)
    for i, t in enumerate(seq):
        pl.extend([t])
        assert pl.propose(n) == hf_prompt_lookup(seq[:i + 1], n, max_ngram, EOS), seq[:i + 1]


def test_prompt_lookup_examples():
    from openelm_rt.speculative import PromptLookup
    pl = PromptLookup(2, EOS)
    pl.extend([5, 6, 7, 8, 5, 6, 9, 5, 6])
    assert pl.propose(3) == [7, 8, 5]   # the left-most "5 6", not the later one
    pl = PromptLookup(2, EOS)
    pl.extend([5, 6, EOS, 8, 1, 6])
    assert pl.propose(3) == []          # "6" matched; its continuation starts with EOS: no fallback
    pl = PromptLookup(2, EOS)
    pl.extend([4, 3, 4])
    assert pl.propose(5) == [3, 4]      # never past the end of the sequence


# ----------------------------------------------------------------------------- greedy: exact

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("penalty", [1.0, 1.2])
def test_greedy_prompt_lookup_is_exact(sessions, dtype, penalty):
    s = sessions[dtype]
    for seed in range(3):
        p = prompt_ids(12, seed=seed)
        p = p + p[1:8]  # a repeat, so that the lookup finds matches from the start
        ref = _plain(s, p, max_new_tokens=48, repetition_penalty=penalty)
        for mode in ("hf", "adaptive"):
            r = s.generate(p, max_new_tokens=48, repetition_penalty=penalty, prompt_lookup_num_tokens=10,
                           speculation=mode)
            _same(r, ref)
            assert r.speculation["mode"] == mode
            assert r.speculation["accepted"] <= r.speculation["proposed"]
        assert r.speculation["steps"] <= len(r.token_ids)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("penalty", [1.0, 1.2])
def test_greedy_assistant_is_exact(sessions, draft, dtype, penalty):
    s = sessions[dtype]
    p = prompt_ids(20, seed=3)
    ref = _plain(s, p, max_new_tokens=40, repetition_penalty=penalty)
    r = s.generate(p, max_new_tokens=40, repetition_penalty=penalty, assistant_model=draft, speculation="hf",
                   num_assistant_tokens=5, num_assistant_tokens_schedule="heuristic")
    _same(r, ref)
    assert r.speculation["proposed"] > 0
    # draft = target (another weight type of the same checkpoint, or itself): most proposals hold
    other = sessions["f32" if dtype != "f32" else "q8"]
    for a in (s, other):
        r = s.generate(p, max_new_tokens=40, repetition_penalty=penalty, assistant=a, speculation="hf",
                       num_assistant_tokens=6, assistant_confidence_threshold=0.0)
        _same(r, ref)
    assert r.speculation["accepted"] > 0
    r = s.generate(p, max_new_tokens=40, repetition_penalty=penalty, assistant_model=s)  # adaptive
    _same(r, ref)


def test_greedy_assistant_by_path_and_both_proposers(sessions, draft, exports):
    s = sessions["f32"]
    p = prompt_ids(16, seed=4)
    p = p + p[1:6]
    ref = s.generate(p, max_new_tokens=30)
    r = s.generate(p, max_new_tokens=30, assistant_model=str(draft.path), prompt_lookup_num_tokens=4,
                   speculation="hf", num_assistant_tokens=3)
    _same(r, ref)
    assert str(draft.path) in s._assistants  # opened once, kept for the next call
    r = s.generate(p, max_new_tokens=30, assistant_model=str(draft.path), speculation="hf")
    _same(r, ref)


def test_eos_inside_an_accepted_run(eos_model):
    s = eos_model
    hits = 0
    for seed in range(8):
        p = prompt_ids(6, seed=seed)
        ref = s.generate(p, max_new_tokens=40)
        for kw in (dict(assistant_model=s, num_assistant_tokens=8, assistant_confidence_threshold=0.0),
                   dict(prompt_lookup_num_tokens=8)):
            r = s.generate(p, max_new_tokens=40, speculation="hf", **kw)
            _same(r, ref)
        if ref.finish_reason == "eos" and len(ref.token_ids) >= 2:
            hits += 1
    assert hits >= 2, "the patched model should end most runs with EOS"


@pytest.mark.parametrize("max_new", [1, 2, 5, 7, 13])
def test_max_new_tokens_reached_mid_run(sessions, max_new):
    s = sessions["q8"]
    p = prompt_ids(10, seed=6)
    ref = s.generate(p, max_new_tokens=max_new)
    r = s.generate(p, max_new_tokens=max_new, assistant_model=s, num_assistant_tokens=6, speculation="hf",
                   assistant_confidence_threshold=0.0)
    _same(r, ref)
    assert len(r.token_ids) == max_new
    assert r.speculation["proposed"] <= max(0, max_new - 1)  # never a proposal that could not be used
    assert s.generate(p, max_new_tokens=0, prompt_lookup_num_tokens=3).token_ids == []


def test_context_limit(ort, exports):
    p = prompt_ids(30, seed=7)
    with ort.Session(str(exports["f32"]), threads=2, max_context=41) as s:
        ref = s.generate(p, max_new_tokens=100)
        assert ref.finish_reason == "context"
        for kw in (dict(assistant_model=s, num_assistant_tokens=8), dict(prompt_lookup_num_tokens=8)):
            for mode in ("hf", "adaptive"):  # adaptive: the cost curve is measured near the limit
                r = s.generate(p, max_new_tokens=100, speculation=mode, **kw)
                _same(r, ref)
                assert len(p) + len(r.token_ids) == 41


def test_stop_strings_and_stream(sessions):
    s = sessions["f32"]
    prompt = "Once upon a time there was a time"
    ref = s.generate(prompt, max_new_tokens=40)
    assert len(ref.text) > 6
    stop = ref.text[3:6]
    ref_stop = s.generate(prompt, max_new_tokens=40, stop=stop)
    assert ref_stop.finish_reason == "stop"
    for kw in (dict(assistant_model=s, num_assistant_tokens=8), dict(prompt_lookup_num_tokens=8)):
        r = s.generate(prompt, max_new_tokens=40, stop=stop, speculation="hf", **kw)
        _same(r, ref_stop)
        it = s.generate(prompt, max_new_tokens=40, stream=True, speculation="hf", **kw)
        pieces = list(it)
        assert "".join(pieces) == it.result.text == ref.text
        assert it.result.token_ids == ref.token_ids


def test_closing_a_stream_early_frees_its_sequences(sessions, draft):
    s = sessions["f32"]
    n_seqs, n_draft = s._rt.n_seqs, draft._rt.n_seqs
    it = s.generate("Once upon a time", max_new_tokens=50, stream=True, assistant_model=draft)
    next(it)
    it.close()
    assert s._rt.n_seqs == n_seqs and draft._rt.n_seqs == n_draft


# ----------------------------------------------------------------------------- sampling

def test_seeded_sampling_with_prompt_lookup_equals_plain(sessions):
    """Each position is sampled as the engine samples it, one draw per generated token: the same
    seed gives the same tokens."""
    s = sessions["bf16"]
    p = prompt_ids(14, seed=8)
    p = p + p[1:9]
    kw = dict(max_new_tokens=40, temperature=0.8, top_k=20, top_p=0.95, repetition_penalty=1.1)
    for seed in range(3):
        ref = s.generate(p, seed=seed, **kw)
        r = s.generate(p, seed=seed, prompt_lookup_num_tokens=5, speculation="hf", **kw)
        _same(r, ref)


def _sequence_distribution(s, prompt, n, kw):
    """Exact probability of every continuation of n tokens under the target's sampler."""
    from openelm_rt import _core
    out = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for seq, pr in out.items():
            ids = prompt + list(seq)
            logits = s.logits(ids)[-1]
            q = _core.sampling_probs(logits, ids, kw["temperature"], kw["top_k"], 1.0, 0.0, 1.0)
            for t in np.flatnonzero(q):
                nxt[seq + (int(t),)] = pr * float(q[t])
        out = nxt
    return out


def _chi2_quantile_999(df):
    """The 0.999 quantile of chi-square with df degrees of freedom (Wilson-Hilferty; within 1 %
    of the exact value for df >= 10: 124.8 for df = 80)."""
    z = 3.090232  # the standard normal's 0.999 quantile
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def test_sampling_with_an_assistant_matches_the_target_distribution(sessions):
    """The speculative-sampling rule keeps the target's distribution: over the 81 continuations
    of 4 tokens with top_k=3, N = 2000 seeded draws pass a chi-square test at the 0.1 % level.
    The assistant is the q4 export of the target's checkpoint: its distributions overlap the
    target's without being equal, so both keeping and redrawing happen often. (Redrawing from
    p instead of norm(max(0, p - q)), the classic mistake, scores ~980 against a bound of 125;
    accepting every draft token leaves the target's support.)"""
    s = sessions["f32"]
    p = prompt_ids(8, seed=9)
    kw = dict(temperature=1.5, top_k=3)
    exact = _sequence_distribution(s, p, 4, kw)
    N = 2000
    counts = {}
    proposed = accepted = 0
    for seed in range(N):
        r = s.generate(p, max_new_tokens=4, seed=seed, assistant_model=sessions["q4"], num_assistant_tokens=2,
                       speculation="hf", assistant_confidence_threshold=0.0, **kw)
        counts[tuple(r.token_ids)] = counts.get(tuple(r.token_ids), 0) + 1
        proposed += r.speculation["proposed"]
        accepted += r.speculation["accepted"]
    assert set(counts) <= set(exact)
    assert 0.2 * proposed < accepted < 0.9 * proposed  # both branches of the rule ran often
    keys = sorted(exact, key=exact.get)
    obs = np.array([counts.get(k, 0) for k in keys], float)
    exp = np.array([exact[k] * N for k in keys])
    # merge the rarest cells until each expects >= 5 draws
    o2, e2, oa, ea = [], [], 0.0, 0.0
    for o, e in zip(obs, exp):
        oa, ea = oa + o, ea + e
        if ea >= 5:
            o2.append(oa), e2.append(ea)
            oa = ea = 0.0
    if ea:
        o2[-1] += oa
        e2[-1] += ea
    chi2 = float(((np.array(o2) - np.array(e2)) ** 2 / np.array(e2)).sum())
    assert chi2 < _chi2_quantile_999(len(o2) - 1), (chi2, len(o2))


# ----------------------------------------------------------------------------- KV truncation

def test_kv_after_accept_reject_patterns_equals_fresh_prefill(sessions, draft):
    """The draft's cache follows the target's tokens through random accept/reject patterns
    (truncated to the common prefix, the rest fed); the target's sequence is truncated to the
    accepted tokens after each verify step. Afterwards, the next logits of both equal those of
    a fresh prefill of the same tokens, bit for bit."""
    from openelm_rt.speculative import DraftModel
    s = sessions["f32"]
    rng = np.random.default_rng(0)
    params = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    d = DraftModel(draft, params)
    rt = s._rt
    seq = rt.seq_new()
    try:
        tokens = prompt_ids(9, seed=10)
        rt.eval([(seq, tokens[:-1], "none")])
        for _ in range(25):
            props, _q = d.propose(tokens, int(rng.integers(1, 6)), 0.0, None)
            rt.eval([(seq, [tokens[-1]] + props, "all")])
            a = int(rng.integers(0, len(props) + 1))  # accepted proposals, then a correction
            tokens = tokens + props[:a] + [int(rng.integers(3, 1024))]
            rt.seq_truncate(seq, len(tokens) - 1)
            assert rt.seq_tokens(seq) == tokens[:-1]
            assert draft._rt.seq_tokens(d.seq) == d.kv
        last = rt.eval([(seq, [tokens[-1]], "last")])[0]
        np.testing.assert_array_equal(last, s.logits(tokens)[-1])
        feed = d.sync(tokens)
        assert draft._rt.seq_tokens(d.seq) == d.kv == tokens[:len(tokens) - len(feed)]
        dl = draft._rt.eval([(d.seq, feed, "last")])[0]
        np.testing.assert_array_equal(dl, draft.logits(tokens)[-1])
    finally:
        rt.seq_free(seq)
        d.close()


def test_adaptive_controller_turns_speculation_off_when_it_does_not_pay():
    from openelm_rt.speculative import Controller
    flat = [1.0 + 0.01 * n for n in range(17)]    # a k-token step costs what a 1-token step does
    steep = [1.0 + 1.0 * n for n in range(17)]    # each checked token costs a full step
    c = Controller(flat)
    assert c.choose(10) > 1
    for _ in range(40):
        c.observe(0, True)
    assert c.choose(10) == 0                     # nothing is ever accepted
    c = Controller(steep)
    for _ in range(40):
        c.observe(8, False)
    assert c.choose(10) == 0                     # even full acceptance cannot pay for the cost
    c = Controller([1.0 + 0.1 * n for n in range(17)])
    for _ in range(40):
        c.observe(8, False)
    assert c.choose(16) >= 8                     # high acceptance, cheap verify: long proposals
    assert c.choose(16, draft_step_seconds=2.0) == 0  # ... unless the draft costs more than it saves


# ----------------------------------------------------------------------------- errors, CLI

def test_errors(sessions, draft, tmp_path):
    s = sessions["f32"]
    p = prompt_ids(5)
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens must be >= 0"):
        s.generate(p, prompt_lookup_num_tokens=-1)
    with pytest.raises(ValueError, match="speculation must be one of"):
        s.generate(p, prompt_lookup_num_tokens=3, speculation="fast")
    with pytest.raises(ValueError, match="num_assistant_tokens_schedule"):
        s.generate(p, assistant_model=draft, num_assistant_tokens_schedule="dynamic")
    with pytest.raises(ValueError, match="assistant_confidence_threshold"):
        s.generate(p, assistant_model=draft, assistant_confidence_threshold=1.5)
    with pytest.raises(ValueError, match="not both"):
        s.generate(p, assistant_model=draft, assistant=draft)
    with pytest.raises(ValueError, match="Session or the path"):
        s.generate(p, assistant_model=3)
    with pytest.raises(FileNotFoundError, match="no such file"):
        s.generate(p, assistant_model=str(tmp_path / "missing.oelm"))
    assert s.generate(p, max_new_tokens=3, prompt_lookup_num_tokens=0).speculation is None


def test_assistant_with_another_vocabulary_is_refused(ort, sessions, work_dir, tokenizer_path):
    m = build_model(work_dir, tokenizer_path, "spec_v512", seed=12, with_tokenizer=False,
                    config_overrides={"vocab_size": 512})
    with ort.Session(str(m.oelm)) as other:
        with pytest.raises(ValueError, match="same tokenizer"):
            sessions["f32"].generate(prompt_ids(5, 512), assistant_model=other)


def test_cli_flags_from_the_model_card(sessions, exports, draft):
    s = sessions["f32"]
    prompt = "Once upon a time there was"
    ref = s.generate(prompt, max_new_tokens=12, repetition_penalty=1.2)
    p = run_cli("generate", "--model", exports["f32"], "--prompt", prompt, "--max-new-tokens", 12,
             "--generate_kwargs", "repetition_penalty=1.2", "prompt_lookup_num_tokens=10")
    assert p.returncode == 0, p.stderr
    assert p.stdout == prompt + ref.text + "\n"
    assert "accepted" in p.stderr and "speculation adaptive" in p.stderr
    p = run_cli("generate", "--model", exports["f32"], "--prompt", prompt, "--max-new-tokens", 12,
             "--generate_kwargs", "repetition_penalty=1.2", "--assistant_model", draft.path,
             "--speculation", "hf")
    assert p.returncode == 0, p.stderr
    assert p.stdout == prompt + ref.text + "\n"
    assert "speculation hf" in p.stderr


def test_cli_validates_every_flag_before_any_output(exports, tmp_path):
    p = run_cli("generate", "--model", exports["f32"], "--prompt", "hi", "--generate_kwargs", "top_p=1.5")
    assert p.returncode == 2 and p.stdout == "" and "top_p" in p.stderr
    p = run_cli("generate", "--model", exports["f32"], "--prompt", "hi", "--assistant_model", tmp_path / "no.oelm")
    assert p.returncode == 2 and p.stdout == "" and "assistant model" in p.stderr
    p = run_cli("generate", "--model", exports["f32"], "--prompt", "hi", "--generate_kwargs",
             "prompt_lookup_num_tokens=3", "num_assistant_tokens_schedule=fast")
    assert p.returncode == 2 and p.stdout == "" and "num_assistant_tokens_schedule" in p.stderr
