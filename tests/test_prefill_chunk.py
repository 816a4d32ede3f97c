"""The engine's prefill_chunk: while sequences decode, a step takes at most that many prompt tokens
of new requests (bounding the decode step's delay), steps without decoding take up to the whole
budget, and no greedy or seeded token changes with the chunk size."""
import pytest

from conftest import core_or_skip, prompt_ids


@pytest.fixture(scope="module")
def ort():
    core_or_skip()
    import openelm_rt
    return openelm_rt


def _step_tokens(eng):
    return eng.stats()["step_tokens"]


@pytest.mark.parametrize("chunk", [0, 1, 7, 64])
def test_a_step_takes_at_most_the_chunk_while_sequences_decode(ort, tiny_f32, chunk):
    from openelm_rt import _core

    with ort.Session(str(tiny_f32.oelm), threads=2, max_batch=4, prefix_cache=0) as s:
        eng = _core.Engine(s._rt, max_batch=4, prefill_chunk=chunk)
        assert eng.prefill_chunk == chunk
        a = eng.submit(prompt_ids(100, 1024, seed=1), max_new_tokens=50)
        before = _step_tokens(eng)
        eng.step()  # nothing decodes yet: the whole prompt in one step, whatever the chunk
        assert _step_tokens(eng) - before == 100
        eng.step()  # a decodes
        b = eng.submit(prompt_ids(90, 1024, seed=2), max_new_tokens=5)
        before = _step_tokens(eng)
        eng.step()  # a's next token and a chunk of b's prompt
        assert _step_tokens(eng) - before == 1 + (90 if chunk == 0 else min(chunk, 90))
        assert (eng.stats()["mixed_steps"] == 1)
        for rid in (a, b):
            eng.cancel(rid)
        eng.step()
        assert eng.idle


def test_greedy_and_seeded_tokens_do_not_depend_on_the_chunk(ort, tiny_f32_all_dtypes):
    """Requests joining while others decode (max_batch 3 of 7 prompts), so prompts are split
    into chunks of different sizes next to decode rows: the same tokens as each request alone."""
    prompts = [prompt_ids(n, 1024, seed=n) for n in (60, 5, 33, 90, 2, 17, 41)]
    kw = dict(max_new_tokens=[14, 3, 20, 9, 25, 6, 11], temperature=[0, 0, 0.8, 0, 1.1, 0, 0.7],
              seed=[0, 0, 5, 0, 9, 0, 3])
    for dtype in ("f32", "q4"):
        got = {}
        for chunk in (0, 1, 5, 64):
            with ort.Session(str(tiny_f32_all_dtypes[dtype]), threads=2, max_batch=3, prefix_cache=0,
                             prefill_chunk=chunk) as s:
                got[chunk] = [r.token_ids for r in s.generate_batch(prompts, **kw)]
                if chunk in (1, 5):
                    assert s._engine.stats()["mixed_steps"] > 0, "no step mixed prefill and decode"
                if chunk == 0:
                    alone = [s.generate(p, **{k: v[i] for k, v in kw.items()}).token_ids
                             for i, p in enumerate(prompts)]
        assert got[0] == alone, dtype
        for chunk in (1, 5, 64):
            assert got[chunk] == alone, (dtype, chunk)


def test_bad_prefill_chunk(ort, tiny_f32):
    from openelm_rt import _core

    with pytest.raises(ValueError, match="prefill_chunk"):
        ort.Session(str(tiny_f32.oelm), prefill_chunk=-1)
    with ort.Session(str(tiny_f32.oelm), threads=1) as s:
        assert s._engine.prefill_chunk == 64  # the core's default
        with pytest.raises(ValueError, match="prefill_chunk must be >= 0"):
            _core.Engine(s._rt, prefill_chunk=-3)
