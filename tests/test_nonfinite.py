"""Non-finite activations and logits (issue 19): a file whose tensor data is corrupt loads
(tensor CRCs are checked only with verify) and computes NaN / inf. Quantizing them is defined
(kernels.h; kernel_check tests every variant bitwise), and every path that returns logits or
tokens ends with a FormatError naming the likely cause and the check (openelm-rt info
--verify), never garbage tokens. The file: the untied tiny model exported q8 (so the NaN
activations go through the integer matmul) with an f32 embedding whose row POISON is NaN or
inf; prompts without that token are unaffected and must give the clean file's results.
"""
from __future__ import annotations

import math

import pytest

from conftest import poison_token_embedding, prompt_ids

POISON = 7
CLEAN_PROMPT = [1, 5, 9, 300, 42]
POISONED_PROMPT = [1, 5, POISON, 300]


@pytest.fixture(scope="module")
def clean_q8(tiny_untied, work_dir, tokenizer_path):
    from openelm_rt import export
    return export.export_checkpoint(tiny_untied.ckpt_dir, work_dir / "untied_q8_ef32.oelm", dtype="q8",
                                    embedding_dtype="f32", tokenizer=tokenizer_path)


@pytest.fixture(scope="module", params=["nan", "inf"])
def poisoned(request, clean_q8, work_dir):
    value = float(request.param) if request.param == "nan" else math.inf
    return poison_token_embedding(clean_q8, work_dir / f"poisoned_{request.param}.oelm", POISON, value)


def _check_message(msg, path):
    assert "non-finite logits" in msg, msg
    assert "corrupt" in msg, msg
    assert f"openelm-rt info --verify {path}" in msg, msg


def test_verify_finds_the_corruption(ort, poisoned):
    with pytest.raises(ort.FormatError, match="token_embd"):
        ort.Session(str(poisoned), verify=True)


def test_generate_is_a_format_error(ort, poisoned, clean_q8):
    with ort.Session(str(clean_q8)) as s:
        want = s.generate(CLEAN_PROMPT, max_new_tokens=6).token_ids
    with ort.Session(str(poisoned)) as s:
        with pytest.raises(ort.FormatError) as e:
            s.generate(POISONED_PROMPT, max_new_tokens=6)
        _check_message(str(e.value), poisoned)
        # The Session stays usable, and a prompt without the token is the clean file's.
        assert s.generate(CLEAN_PROMPT, max_new_tokens=6).token_ids == want


def test_logits_and_score_are_format_errors(ort, poisoned, clean_q8):
    with ort.Session(str(clean_q8)) as s:
        want_logits = s.logits(CLEAN_PROMPT)
        want_score = s.score(CLEAN_PROMPT[:3], CLEAN_PROMPT[3:]).logprobs
    with ort.Session(str(poisoned)) as s:
        with pytest.raises(ort.FormatError) as e:
            s.logits(POISONED_PROMPT)
        _check_message(str(e.value), poisoned)
        assert "position 2" in str(e.value)  # the poisoned token's row
        with pytest.raises(ort.FormatError) as e:
            s.score_batch([(CLEAN_PROMPT[:3], CLEAN_PROMPT[3:]), (POISONED_PROMPT[:3], [5, 6])])
        _check_message(str(e.value), poisoned)
        assert "scoring pair 1" in str(e.value)
        assert (s.logits(CLEAN_PROMPT) == want_logits).all()
        assert s.score(CLEAN_PROMPT[:3], CLEAN_PROMPT[3:]).logprobs == want_score


def test_engine_ends_only_the_poisoned_request(ort, poisoned, clean_q8):
    """In one batch, the request whose logits are not finite ends with error_kind "model";
    the other runs on and gives the clean file's tokens."""
    with ort.Session(str(clean_q8)) as s:
        want = s.generate(CLEAN_PROMPT, max_new_tokens=8).token_ids
    with ort.Session(str(poisoned)) as s:
        eng = s._engine
        bad = eng.submit(POISONED_PROMPT, max_new_tokens=8)
        good = eng.submit(CLEAN_PROMPT, max_new_tokens=8)
        final, tokens = {}, {bad: [], good: []}
        while len(final) < 2:
            eng.step()
            for e in eng.take_events():
                if e["token"] >= 0:
                    tokens[e["id"]].append(e["token"])
                if e["finish"]:
                    final[e["id"]] = e
        assert final[bad]["finish"] == "error" and final[bad]["error_kind"] == "model"
        _check_message(final[bad]["error"], poisoned)
        assert tokens[bad] == []
        assert final[good]["finish"] == "length" and final[good]["error_kind"] == ""
        assert tokens[good] == want


def test_generate_batch_raises_format_error(ort, poisoned):
    with ort.Session(str(poisoned)) as s:
        with pytest.raises(ort.FormatError, match="non-finite logits"):
            s.generate_batch([CLEAN_PROMPT, POISONED_PROMPT, prompt_ids(9, s.vocab_size)], max_new_tokens=4)
