"""Many sequences in one forward pass: batch invariance (bitwise), the paged KV cache's
operations (fork, truncate, copy on write, no leaks), scoring against the NumPy oracle,
the engine (generate_batch, seeds, streams, cancellation, the KV budget) and prefix reuse.
"""
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

import oracle
from conftest import prompt_ids

DTYPES = ["f32", "f16", "bf16", "q8", "q4"]


@pytest.fixture(scope="module")
def exports(tiny_f32_all_dtypes):
    """The tiny f32 checkpoint in every weight type: {dtype: .oelm path}."""
    return tiny_f32_all_dtypes


@pytest.fixture(scope="module")
def core():
    from openelm_rt import _core
    return _core


def _variants():
    from openelm_rt import _core
    return _core.Backend.kernel_variants()


def _runtime(core, path, variant="auto", threads=2, **kw):
    model = core.Model(str(path), False)
    backend = core.Backend("ref", 1) if variant == "ref" else core.Backend("cpu", threads, kernels=variant)
    kw.setdefault("max_context", 256)
    return core.Runtime(model, backend, **kw)


def _alone(rt, ids):
    """Logits of every position of ids, evaluated as one sequence by itself."""
    seq = rt.seq_new()
    try:
        return rt.eval([(seq, ids, "all")])
    finally:
        rt.seq_free(seq)


# ----------------------------------------------------------------------------- batch invariance

@pytest.mark.parametrize("variant", _variants())
@pytest.mark.parametrize("dtype", DTYPES)
def test_logits_do_not_depend_on_the_batch(core, exports, variant, dtype):
    """Sequences joining and leaving, prefill chunks and decode tokens in one step, different
    lengths: every row's logits equal those of the sequence evaluated alone, bit for bit."""
    rt = _runtime(core, exports[dtype], variant, max_step_tokens=24)
    V = 1024
    toks = {name: prompt_ids(n, V, seed=s) for name, n, s in (("a", 14, 1), ("b", 9, 2), ("c", 45, 3), ("d", 3, 4))}
    ref = {name: _alone(rt, ids) for name, ids in toks.items()}
    seq = {}
    done = {name: 0 for name in toks}
    # (name, tokens to add) per step: a prefills, a decodes while b prefills, c prefills a
    # chunk longer than a step (split inside eval), a leaves, d joins.
    schedule = [
        [("a", 10)],
        [("a", 1), ("b", 7)],
        [("a", 1), ("b", 1), ("c", 30)],
        [("b", 1), ("c", 13), ("d", 1)],
        [("c", 2), ("d", 2), ("a", 2)],
    ]
    for step in schedule:
        entries, order = [], []
        for name, n in step:
            if name not in seq:
                seq[name] = rt.seq_new()
            ids = toks[name][done[name]:done[name] + n]
            entries.append((seq[name], ids, "all"))
            order.append((name, done[name], n))
        out = rt.eval(entries)
        row = 0
        for name, start, n in order:
            np.testing.assert_array_equal(out[row:row + n], ref[name][start:start + n],
                                          err_msg=f"{variant}/{dtype}: {name} positions {start}..{start + n}")
            row += n
            done[name] += n
        if step is schedule[3]:
            rt.seq_free(seq.pop("a"))  # a leaves; it comes back as a new sequence below
            done["a"] = 0
    assert done == {"a": 2, "b": 9, "c": 45, "d": 3}


@pytest.mark.parametrize("kv", [{"kv_dtype": "f16"}, {"block_size": 32}, {"block_size": 48, "kv_dtype": "f16"}])
def test_batch_invariance_other_kv_layouts(core, exports, kv):
    rt = _runtime(core, exports["q8"], **kv)
    a, b = prompt_ids(40, 1024, seed=5), prompt_ids(70, 1024, seed=6)
    ra, rb = _alone(rt, a), _alone(rt, b)
    sa, sb = rt.seq_new(), rt.seq_new()
    out = rt.eval([(sa, a[:33], "all"), (sb, b[:5], "all")])
    np.testing.assert_array_equal(out[:33], ra[:33])
    np.testing.assert_array_equal(out[33:], rb[:5])
    out = rt.eval([(sb, b[5:], "all"), (sa, a[33:], "last")])
    np.testing.assert_array_equal(out[:65], rb[5:])
    np.testing.assert_array_equal(out[65], ra[-1])


def test_f16_kv_cache_rounds_only_slightly(core, exports, tiny_f32):
    """f16 keys and values: logits close to the exact cache's (measured: ~1e-4 of the largest
    logit on random weights), never identical in general."""
    ids = prompt_ids(100, 1024, seed=7)
    exact = _alone(_runtime(core, exports["f32"]), ids)
    half = _alone(_runtime(core, exports["f32"], kv_dtype="f16"), ids)
    err = np.max(np.abs(half - exact)) / np.max(np.abs(exact))
    assert 0 < err < 5e-3, err


# ----------------------------------------------------------------------------- KV operations

def test_fork_truncate_and_copy_on_write(core, exports):
    rt = _runtime(core, exports["f32"], block_size=16)
    ids = prompt_ids(60, 1024, seed=8)
    other = prompt_ids(30, 1024, seed=9)
    a = rt.seq_new()
    rt.eval([(a, ids[:40], "none")])
    # a fork at 25 shares blocks 0 and 1 (the second one partly): writing copies it
    b = rt.seq_fork(a, 25)
    assert rt.seq_blocks(b) == rt.seq_blocks(a)[:2]
    shared = rt.seq_blocks(a)[1]
    assert rt.block_refcount(shared) == 2
    got_b = rt.eval([(b, other, "all")])
    np.testing.assert_array_equal(got_b, _alone(rt, ids[:25] + other)[25:])
    assert rt.seq_blocks(b)[1] != shared and rt.block_refcount(shared) == 1, "the partial block was not copied"
    assert rt.seq_blocks(b)[0] == rt.seq_blocks(a)[0] and rt.block_refcount(rt.seq_blocks(a)[0]) == 2
    # the parent is unchanged by its fork's writes
    got_a = rt.eval([(a, ids[40:], "all")])
    np.testing.assert_array_equal(got_a, _alone(rt, ids)[40:])
    # truncate, then go on with other tokens: as a fresh sequence of the kept prefix
    rt.seq_truncate(a, 17)
    assert rt.seq_len(a) == 17 and len(rt.seq_blocks(a)) == 2
    np.testing.assert_array_equal(rt.eval([(a, other, "all")]), _alone(rt, ids[:17] + other)[17:])
    assert rt.seq_tokens(a) == ids[:17] + other
    # fork of everything, truncate to 0
    c = rt.seq_fork(a)
    rt.seq_truncate(c, 0)
    assert rt.seq_blocks(c) == [] and rt.seq_len(c) == 0
    for s in (a, b, c):
        rt.seq_free(s)
    assert rt.kv_blocks_free == rt.kv_blocks


def test_sequence_errors(core, exports):
    rt = _runtime(core, exports["f32"])
    a = rt.seq_new()
    rt.eval([(a, [1, 2, 3], "none")])
    with pytest.raises(ValueError, match="not a live sequence"):
        rt.seq_fork(99)
    with pytest.raises(ValueError, match="truncate a sequence of 3 tokens to 5"):
        rt.seq_truncate(a, 5)
    with pytest.raises(ValueError, match="appears twice"):
        rt.eval([(a, [4], "last"), (a, [5], "last")])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        rt.eval([(a, [4, 99999], "last")])
    assert rt.seq_len(a) == 3, "a failed eval leaves the sequence as it was"
    with pytest.raises(ValueError, match="context is full"):
        rt.eval([(a, [5] * 254, "last")])
    rt.seq_free(a)
    with pytest.raises(ValueError, match="not a live sequence"):
        rt.seq_len(a)


def test_eval_is_all_or_nothing_on_budget(core, exports):
    """A budget too small for a batch: a KVBudgetError naming the budget and what to change, and
    every sequence as before; the runtime stays usable."""
    from openelm_rt import KVBudgetError
    rt = _runtime(core, exports["f32"], kv_budget=20 * 14 * 1024)  # 20 blocks of 16 positions
    a, b = rt.seq_new(), rt.seq_new()
    rt.eval([(a, prompt_ids(100, 1024, seed=1), "none")])  # 7 blocks
    with pytest.raises(KVBudgetError, match=r"KV cache budget is exhausted.*raise kv_budget"):
        rt.eval([(a, [5] * 20, "none"), (b, prompt_ids(200, 1024, seed=2), "none")])
    assert rt.seq_len(a) == 100 and rt.seq_len(b) == 0
    assert rt.kv_blocks_free == rt.kv_blocks - 7
    rt.eval([(b, [1, 2, 3], "last")])


class KvMachine(RuleBasedStateMachine):
    """Random sequence operations against a model of what each sequence holds: block reference
    counts always equal the number of holders, logits always equal a recomputation from scratch,
    and once everything is freed every block is back in the pool. Sequences are named by a
    counter of the machine's own (the runtime reuses freed handles), so that each example
    replays the same way."""

    rt = None

    @initialize()
    def setup(self):
        self.seqs = {}  # name -> tokens
        self.rid = {}   # name -> the runtime's handle
        self.next = 0
        self.rng = np.random.default_rng(0)

    def _add(self, handle, tokens):
        self.seqs[self.next] = tokens
        self.rid[self.next] = handle
        self.next += 1

    def _pick(self, data, names=None):
        return data.draw(st.sampled_from(sorted(self.seqs if names is None else names)))

    @rule(n=st.integers(1, 40))
    def new_and_append(self, n):
        if self.rt.kv_blocks_free < 6:
            return
        h = self.rt.seq_new()
        ids = [int(t) for t in self.rng.integers(3, 1024, size=n)]
        self.rt.eval([(h, ids, "none")])
        self._add(h, ids)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), n=st.integers(1, 20))
    def append(self, data, n):
        s = self._pick(data)
        if len(self.seqs[s]) + n > 256 or self.rt.kv_blocks_free < 3:
            return
        ids = [int(t) for t in self.rng.integers(3, 1024, size=n)]
        self.rt.eval([(self.rid[s], ids, "none")])
        self.seqs[s] = self.seqs[s] + ids

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data):
        s = self._pick(data)
        n = data.draw(st.integers(0, len(self.seqs[s])))
        self._add(self.rt.seq_fork(self.rid[s], n), self.seqs[s][:n])

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def truncate(self, data):
        s = self._pick(data)
        n = data.draw(st.integers(0, len(self.seqs[s])))
        self.rt.seq_truncate(self.rid[s], n)
        self.seqs[s] = self.seqs[s][:n]

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        s = self._pick(data)
        self.rt.seq_free(self.rid.pop(s))
        del self.seqs[s]

    @precondition(lambda self: any(len(t) >= 2 for t in self.seqs.values()))
    @rule(data=st.data())
    def logits_equal_recomputation(self, data):
        s = self._pick(data, [k for k, t in self.seqs.items() if len(t) >= 2])
        ids = self.seqs[s]
        if self.rt.kv_blocks_free < len(ids) // 16 + 3:  # room to recompute it from scratch
            return
        probe = self.rt.seq_fork(self.rid[s], len(ids) - 1)  # the last position through the shared KV
        got = self.rt.eval([(probe, ids[-1:], "last")])
        self.rt.seq_free(probe)
        np.testing.assert_array_equal(got[0], _alone(self.rt, ids)[-1])

    @invariant()
    def refcounts_match_holders(self):
        holders = {}
        for s, ids in self.seqs.items():
            h = self.rid[s]
            assert self.rt.seq_len(h) == len(ids) and self.rt.seq_tokens(h) == ids
            blocks = self.rt.seq_blocks(h)
            assert len(blocks) >= (len(ids) + 15) // 16
            for b in blocks:
                holders[b] = holders.get(b, 0) + 1
        for b, n in holders.items():
            assert self.rt.block_refcount(b) == n, f"block {b}: refcount {self.rt.block_refcount(b)}, {n} holders"
        assert self.rt.kv_blocks_free == self.rt.kv_blocks - len(holders)

    def teardown(self):
        for h in self.rid.values():
            self.rt.seq_free(h)
        assert self.rt.kv_blocks_free == self.rt.kv_blocks, "blocks leaked"


def test_kv_operations_property(core, exports):
    """10,000 random operations (20 runs x 500 steps), with invariants checked after each."""
    KvMachine.rt = _runtime(core, exports["f32"], kv_budget=96 * 14 * 1024)
    run_state_machine_as_test(KvMachine, settings=settings(max_examples=20, stateful_step_count=500, deadline=None,
                                                           database=None, derandomize=True,
                                                           suppress_health_check=list(HealthCheck)))


# ----------------------------------------------------------------------------- scoring

def _oracle_logprobs(tiny, ctx, cont):
    logits = oracle.forward(tiny.weights, tiny.cfg, ctx + cont[:-1])[len(ctx) - 1:]
    z = logits - logits.max(axis=1, keepdims=True)
    lsm = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return np.array([lsm[i, t] for i, t in enumerate(cont)]), logits.argmax(axis=1)


def test_score_matches_the_oracle(session_f32, tiny_f32):
    ctx, cont = prompt_ids(30, 1024, seed=11), prompt_ids(12, 1024, seed=12, bos=False)
    want, argmax = _oracle_logprobs(tiny_f32, ctx, cont)
    r = session_f32.score(ctx, cont)
    assert len(r.logprobs) == len(cont)
    np.testing.assert_allclose(r.logprobs, want, rtol=1e-4, atol=1e-5)
    assert r.is_greedy is False
    assert r.total == pytest.approx(float(np.sum(want)), rel=1e-4)
    # the greedy continuation is greedy; changing one token of it is not
    greedy = session_f32.generate(ctx, max_new_tokens=6).token_ids
    assert session_f32.score(ctx, greedy).is_greedy is True
    _, am = _oracle_logprobs(tiny_f32, ctx, greedy)
    assert list(am) == list(greedy)
    changed = list(greedy)
    changed[3] = (changed[3] + 1) % 1024
    assert session_f32.score(ctx, changed).is_greedy is False


def test_score_batch_shares_prefixes(session_f32, tiny_f32):
    """Four questions with four choices each and a shared few-shot prefix: results equal to
    scoring each pair alone, in input order, with far fewer tokens forwarded."""
    s = session_f32
    shots = prompt_ids(60, 1024, seed=20)
    pairs = []
    for q in range(4):
        ctx = shots + prompt_ids(15, 1024, seed=30 + q, bos=False)
        for c in range(4):
            pairs.append((ctx, prompt_ids(3 + c, 1024, seed=40 + 4 * q + c, bos=False)))
    pairs.insert(5, ([1], [7]))  # a one-token context, out of order
    batch = s.score_batch(pairs)
    stats = s.last_score_stats
    for (ctx, cont), r in zip(pairs, batch):
        alone = s.score(ctx, cont)
        assert r.logprobs == alone.logprobs and r.is_greedy == alone.is_greedy
    want, _ = _oracle_logprobs(tiny_f32, pairs[0][0], pairs[0][1])
    np.testing.assert_allclose(batch[0].logprobs, want, rtol=1e-4, atol=1e-5)
    assert stats["pairs"] == len(pairs)
    # the prefix once, each question once, each choice's tokens, one recomputed row per pair
    expected = 60 + 4 * 15 + sum(len(c) - 1 for _, c in pairs) + len(pairs)
    assert stats["tokens_forwarded"] <= expected, stats
    assert stats["tokens_requested"] > 3 * stats["tokens_forwarded"], stats


def test_score_batch_runs_questions_of_a_shared_prefix_together(session_f32):
    """Eight questions after one few-shot prefix, four choices each (MMLU's shape): a question's
    choices wait for its context, but the next questions need only the prefix, so they start
    meanwhile from whichever sequence already holds it. A few full steps, not one step per
    question; every result bitwise that of scoring the pair alone."""
    s = session_f32
    shots = prompt_ids(60, 1024, seed=50)
    pairs = []
    for q in range(8):
        ctx = shots + prompt_ids(15, 1024, seed=60 + q, bos=False)
        pairs += [(ctx, [100 + c]) for c in range(4)]
    batch = s.score_batch(pairs)
    stats = s.last_score_stats
    for (ctx, cont), r in zip(pairs, batch):
        alone = s.score(ctx, cont)
        assert r.logprobs == alone.logprobs and r.is_greedy == alone.is_greedy
    # the prefix and the first question; the other questions with the first one's choices;
    # the other choices. Started strictly one after another, each question took a step.
    assert stats["steps"] <= 4, stats
    assert stats["tokens_forwarded"] == 60 + 8 * 15 + 8 * 3, stats


def test_score_batch_under_a_small_kv_budget(ort, exports):
    """Many requests after a shared prefix, with room for only a few at a time: they start as
    memory allows (none is left unable to finish), and the results are those of an ample budget."""
    shots = prompt_ids(40, 1024, seed=70)
    pairs = []
    for q in range(6):
        ctx = shots + prompt_ids(30, 1024, seed=80 + q, bos=False)
        pairs += [(ctx, prompt_ids(20, 1024, seed=90 + 4 * q + c, bos=False)) for c in range(4)]
    with ort.Session(str(exports["q8"]), prefix_cache=0) as s:
        want = s.score_batch(pairs)
    with ort.Session(str(exports["q8"]), kv_budget=14 * 14 * 1024, prefix_cache=0) as s:  # 14 blocks
        got = s.score_batch(pairs)
    assert [(r.logprobs, r.is_greedy) for r in got] == [(r.logprobs, r.is_greedy) for r in want]


def test_score_errors(session_f32):
    s = session_f32
    with pytest.raises(ValueError, match="context is empty"):
        s.score([], [5])
    with pytest.raises(ValueError, match="continuation is empty"):
        s.score([1], [])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.score([1], [5000])
    with pytest.raises(ValueError, match="exceed max_context"):
        s.score([1] * 200, [5] * 100)
    assert s.score_batch([]) == []


# ----------------------------------------------------------------------------- engine

@pytest.mark.parametrize("dtype", DTYPES)
def test_generate_batch_greedy_equals_alone(ort, exports, dtype):
    prompts = [prompt_ids(n, 1024, seed=n) for n in (1, 5, 17, 40, 3, 90)]
    with ort.Session(str(exports[dtype]), max_batch=4, prefix_cache=0) as s:
        alone = [s.generate(p, max_new_tokens=12).token_ids for p in prompts]
        batch = s.generate_batch(prompts, max_new_tokens=12)
    assert [r.token_ids for r in batch] == alone
    assert all(r.finish_reason in ("length", "eos") for r in batch)


def test_seeded_sampling_equals_alone_and_kwargs_per_prompt(session_f32):
    s = session_f32
    prompts = [prompt_ids(n, 1024, seed=n) for n in (4, 9, 30)]
    kw = dict(temperature=[0.7, 1.0, 1.3], top_k=[0, 40, 5], top_p=0.9, seed=[1, 2, 3], repetition_penalty=1.2,
              max_new_tokens=[5, 20, 11])
    batch = s.generate_batch(prompts, **kw)
    for i, p in enumerate(prompts):
        one = {k: (v[i] if isinstance(v, list) else v) for k, v in kw.items()}
        r = s.generate(p, **one)
        assert batch[i].token_ids == r.token_ids and batch[i].text == r.text
        assert len(r.token_ids) <= one["max_new_tokens"]


def test_generate_batch_stream_and_stop_strings(session_f32):
    s = session_f32
    prompts = ["The capital of France is", "Once upon a time", "def f(x):"]
    full = s.generate_batch(prompts, max_new_tokens=30)
    stops = []
    for r in full:
        stops.append([r.text[8:12]] if len(r.text) > 14 else None)
    stream = s.generate_batch(prompts, max_new_tokens=30, stop=stops, stream=True)
    pieces = [[] for _ in prompts]
    for i, piece in stream:
        pieces[i].append(piece)
    for i, r in enumerate(stream.results):
        assert "".join(pieces[i]) == r.text
        if stops[i]:
            assert r.finish_reason == "stop" and r.text == full[i].text[:full[i].text.index(stops[i][0])]
        else:
            assert r.text == full[i].text


def test_interleaved_streams_of_one_session(session_f32):
    s = session_f32
    a = s.generate(prompt_ids(10, 1024, seed=1), max_new_tokens=15, stream=True)
    b = s.generate(prompt_ids(20, 1024, seed=2), max_new_tokens=15, stream=True)
    pa, pb = [], []
    for x, y in zip(a, b):
        pa.append(x)
        pb.append(y)
    pa += list(a)
    pb += list(b)
    assert "".join(pa) == a.result.text and "".join(pb) == b.result.text
    assert a.result.token_ids == s.generate(prompt_ids(10, 1024, seed=1), max_new_tokens=15).token_ids
    assert b.result.token_ids == s.generate(prompt_ids(20, 1024, seed=2), max_new_tokens=15).token_ids


def test_cancel_leaves_the_others_running(session_f32):
    s = session_f32
    prompts = [prompt_ids(n, 1024, seed=n) for n in (6, 8, 12)]
    want = [s.generate(p, max_new_tokens=20).token_ids for p in prompts]
    streams = [s.generate(p, max_new_tokens=20, stream=True) for p in prompts]
    next(streams[1])
    streams[1].close()
    rest = [list(streams[i]) for i in (0, 2)]
    assert streams[0].result.token_ids == want[0] and streams[2].result.token_ids == want[2]
    assert all(rest)
    assert s._engine.idle and s._rt.n_seqs == 0
    st = s._engine.stats()  # a running sequence cancelled leaves the counts (the server's metrics)
    assert st["running"] == 0 and st["waiting"] == 0 and st["cancelled"] >= 1


def test_preemption_under_a_small_budget_changes_nothing(ort, exports):
    """Four sequences that do not fit together: the newest wait (preempted and recomputed),
    the tokens are those of each generated alone, and a prompt larger than the whole budget
    fails with a KVBudgetError while the others finish."""
    prompts = [prompt_ids(n, 1024, seed=n) for n in (40, 44, 48, 52)]
    with ort.Session(str(exports["q8"]), kv_budget=12 * 14 * 1024, prefix_cache=0) as s:  # 12 blocks
        alone = [s.generate(p, max_new_tokens=30).token_ids for p in prompts]
        batch = s.generate_batch(prompts, max_new_tokens=30)
        assert [r.token_ids for r in batch] == alone
        assert s.stats["preempted"] > 0
        with pytest.raises(ort.KVBudgetError, match=r"budget is exhausted.*kv_budget"):
            s.generate(prompt_ids(250, 1024, seed=3), max_new_tokens=2)
        assert s.generate(prompts[0], max_new_tokens=30).token_ids == alone[0]


def test_default_budget_holds_max_batch_full_sequences(ort, core, exports):
    """Without kv_budget, the pool holds max_batch sequences of max_context: a full batch never
    preempts. The budget is exactly that many blocks (the tiny model's block: 14 KiB)."""
    rt = _runtime(core, exports["f32"], max_context=256, budget_sequences=6)
    assert rt.kv_blocks == 6 * (256 // 16)
    with ort.Session(str(exports["q8"]), max_context=128, max_batch=5, prefix_cache=0) as s:
        assert s._rt.kv_blocks == 5 * (128 // 16)
        prompts = [prompt_ids(100, 1024, seed=n) for n in range(5)]
        batch = s.generate_batch(prompts, max_new_tokens=20)
        assert all(r.token_ids for r in batch)
        assert s.stats["preempted"] == 0


def test_generate_batch_errors(session_f32):
    s = session_f32
    with pytest.raises(ValueError, match="top_k has 2 values for 3 prompts"):
        s.generate_batch(["a", "b", "c"], top_k=[1, 2])
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        s.generate_batch([[1, 2], [1, 99999]])
    with pytest.raises(ValueError, match="prompts must be a list"):
        s.generate_batch("abc")
    assert s.generate_batch([]) == []
    assert s._engine.idle


def test_engine_thread_with_many_submitters(ort, exports):
    """The engine on its own thread; four threads submit, some cancel: every request ends
    once, with the tokens it would have alone (or cancelled)."""
    from openelm_rt import _core
    model = _core.Model(str(exports["q4"]), False)
    rt = _core.Runtime(model, _core.Backend("cpu", 2), max_context=256, prefix_cache=4)
    eng = _core.Engine(rt, max_batch=6)
    prompts = [prompt_ids(5 + 3 * i, 1024, seed=i) for i in range(12)]
    with ort.Session(str(exports["q4"]), prefix_cache=0) as s:
        want = [s.generate(p, max_new_tokens=10).token_ids for p in prompts]
    ids, lock = {}, threading.Lock()

    def submitter(k):
        for i in range(k, 12, 4):
            rid = eng.submit(prompts[i], max_new_tokens=10)
            with lock:
                ids[rid] = i
            if i % 5 == 0:
                eng.cancel(rid)

    eng.start()
    try:
        threads = [threading.Thread(target=submitter, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got, finished = {}, {}
        while len(finished) < 12:
            for e in eng.wait_events(5.0):
                got.setdefault(e["id"], []).append(e["token"]) if e["token"] >= 0 else None
                if e["finish"]:
                    assert e["id"] not in finished
                    finished[e["id"]] = e["finish"]
    finally:
        eng.stop()
    for rid, i in ids.items():
        if finished[rid] == "cancelled":
            assert i % 5 == 0
            assert got.get(rid, []) == want[i][:len(got.get(rid, []))]
        else:
            assert got[rid] == want[i], i
    assert eng.idle and rt.n_seqs == 0
    st = eng.stats()
    assert st["running"] == 0 and st["waiting"] == 0


# ----------------------------------------------------------------------------- prefix reuse

def test_second_turn_evaluates_only_new_tokens(ort, tiny_f32):
    """A follow-up prompt that extends the previous prompt and reply: only the new tokens (and
    the reply's last token, which was sampled but never evaluated) go through the model, and
    the output is a fresh session's."""
    p1 = prompt_ids(40, 1024, seed=60)
    new_turn = [2] + prompt_ids(9, 1024, seed=61, bos=False)
    with ort.Session(str(tiny_f32.oelm)) as s, ort.Session(str(tiny_f32.oelm), prefix_cache=0) as fresh:
        r1 = s.generate(p1, max_new_tokens=12)
        p2 = p1 + r1.token_ids + new_turn
        before = s.stats["tokens_forwarded"]
        r2 = s.generate(p2, max_new_tokens=12)
        forwarded = s.stats["tokens_forwarded"] - before
        assert r2.cached_tokens == len(p1) + len(r1.token_ids) - 1
        assert forwarded == 1 + len(new_turn) + len(r2.token_ids) - 1
        want = fresh.generate(p2, max_new_tokens=12)
        assert r2.token_ids == want.token_ids and want.cached_tokens == 0


def test_chat_next_turn_reuses_the_conversation(ort, tiny_f32):
    """Through chat(): the next turn's prompt is the conversation re-tokenized, which shares with
    the first turn's sequence everything up to where the reply's text tokenizes differently from
    the tokens generated (random weights produce odd pieces; a trained model's rarely differ)."""
    turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    with ort.Session(str(tiny_f32.oelm)) as s, ort.Session(str(tiny_f32.oelm), prefix_cache=0) as fresh:
        r1 = s.chat(turn1, max_new_tokens=12)
        p1 = s.chat_token_ids(turn1)
        turn2 = turn1 + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "Another one?"}]
        p2 = s.chat_token_ids(turn2)
        r2 = s.chat(turn2, max_new_tokens=12)
        kept = len(p1) + len(r1.token_ids) - 1
        common = next((i for i, (x, y) in enumerate(zip(p1 + r1.token_ids, p2)) if x != y), len(p2))
        assert r2.cached_tokens == min(kept, common) >= len(p1) - 1
        want = fresh.chat(turn2, max_new_tokens=12)
        assert r2.token_ids == want.token_ids and r2.text == want.text


def test_prefix_cache_serves_a_shared_system_prompt(ort, tiny_f32):
    system = prompt_ids(70, 1024, seed=50)
    with ort.Session(str(tiny_f32.oelm)) as s:
        s.generate(system + [5, 6, 7], max_new_tokens=3)
        r = s.generate(system + [9, 10], max_new_tokens=3)
        assert r.cached_tokens == 70
        # an identical prompt reuses all but its last token, which must be evaluated again
        r2 = s.generate(system + [9, 10], max_new_tokens=3)
        assert r2.cached_tokens == 71 and r2.token_ids == r.token_ids


def _run_one(eng, prompt, **kw):
    """The events of one request submitted to an engine stepped here until idle."""
    rid = eng.submit(prompt, **kw)
    events = []
    while not eng.idle:
        eng.step()
        events += [e for e in eng.take_events() if e["id"] == rid]
    return events


def test_engine_events_carry_their_emit_time_on_the_perf_counter_clock(session_f32):
    """Each event's "t" is when the engine emitted it, on time.perf_counter()'s clock (the server
    times its own delivery path from it): after the submission, before it is taken, in order."""
    import time
    t0 = time.perf_counter()
    events = _run_one(session_f32._engine, prompt_ids(9, 1024, seed=71), max_new_tokens=4)
    t1 = time.perf_counter()
    ts = [e["t"] for e in events]
    assert len(ts) == 4 and events[-1]["finish"] == "length"
    assert t0 < ts[0] and ts[-1] < t1 and ts == sorted(ts), (t0, ts, t1)


def test_engine_event_fd_is_readable_exactly_while_events_wait(session_f32):
    """Engine.event_fd (what the server's event loop watches): not readable while no event waits,
    readable once one is emitted (also for events emitted before it was asked for), drained by
    take_events and by wait_events."""
    import select
    eng = session_f32._engine

    def readable(fd):
        return bool(select.select([fd], [], [], 0)[0])
    eng.take_events()
    rid = eng.submit(prompt_ids(7, 1024, seed=72), max_new_tokens=2)
    eng.step()  # prefill + the first token, before the descriptor exists
    fd = eng.event_fd()
    assert fd >= 0 and eng.event_fd() == fd  # made once
    assert readable(fd)
    assert [e["id"] for e in eng.take_events()] == [rid]
    assert not readable(fd)
    eng.step()
    assert readable(fd) and readable(fd)  # level-triggered: stays readable until taken
    assert eng.wait_events(0.0)[-1]["finish"] == "length"
    assert not readable(fd) and eng.idle


def test_engine_logprobs_and_prompt_logprobs(session_f32):
    """The engine's per-token log-probabilities (with the likeliest alternatives) and the prompt's
    own log-probabilities agree with score() on the same tokens."""
    s = session_f32
    prompt = prompt_ids(25, 1024, seed=70)
    events = _run_one(s._engine, prompt, max_new_tokens=5, logprobs=3, prompt_logprobs=True)
    toks = [e["token"] for e in events if e["token"] >= 0]
    assert len(toks) == 5
    plp = events[0]["prompt_logprobs"]
    want = s.score(prompt[:1], prompt[1:]).logprobs
    np.testing.assert_allclose(plp, want, rtol=1e-5, atol=1e-6)
    gen = s.score(prompt, toks).logprobs
    for e, w in zip([e for e in events if e["token"] >= 0], gen):
        assert e["logprob"] == pytest.approx(w, rel=1e-5, abs=1e-6)
        assert len(e["top"]) == 3 and e["top"][0][0] == e["token"]  # greedy: the likeliest
        assert e["top"][0][1] >= e["top"][1][1] >= e["top"][2][1]
    # the likeliest tokens at each prompt position too (an API's echo + logprobs), from the same logits
    top = events[0]["prompt_top"]
    assert len(top) == len(prompt) - 1 and all(len(t) == 3 for t in top)
    for pos, row in enumerate(top):
        assert row[0][1] >= row[1][1] >= row[2][1] and row[0][1] >= plp[pos] - 1e-6
        if row[0][0] == prompt[pos + 1]:
            assert row[0][1] == pytest.approx(plp[pos], abs=1e-6)
    full = s.logits(prompt)
    assert [t for t, _ in top[3]] == list(np.argsort(-full[3], kind="stable")[:3])


def test_engine_prompt_logprobs_without_generating(session_f32):
    """max_new_tokens=0 with prompt_logprobs: the prompt is scored and no token is drawn."""
    s = session_f32
    prompt = prompt_ids(20, 1024, seed=71)
    events = _run_one(s._engine, prompt, max_new_tokens=0, logprobs=2, prompt_logprobs=True)
    assert [e["token"] for e in events] == [-1] and events[0]["finish"] == "length"
    assert events[0]["n_generated"] == 0 and len(events[0]["prompt_top"]) == len(prompt) - 1
    np.testing.assert_allclose(events[0]["prompt_logprobs"], s.score(prompt[:1], prompt[1:]).logprobs,
                               rtol=1e-5, atol=1e-6)


def test_cli_kv_options(tiny_f32, tmp_path):
    import subprocess
    import sys
    from conftest import env_with_pythonpath
    run = lambda *a: subprocess.run([sys.executable, "-m", "openelm_rt", "generate", "--model", str(tiny_f32.oelm),  # noqa: E731
                                     "--prompt", "Hello", "--max-new-tokens", "4", *a], capture_output=True,
                                    text=True, env=env_with_pythonpath())
    ok = run("--kv-budget", "8MiB", "--kv-dtype", "f16")
    assert ok.returncode == 0, ok.stderr
    bad = run("--kv-budget", "lots")
    assert bad.returncode != 0 and "--kv-budget must be a number of bytes or a size" in bad.stderr
    assert bad.stdout == ""
