"""Fixtures for the C API tests (tests/cpp): a tiny OpenELM model exported by the
Python exporter, and what the Python path (openelm_rt.Session) computes on it, so the
C++ tests can require the C API to give the same logits, tokens and text.

    python3 tests/cpp/make_fixtures.py DIR     # then: OELM_TEST_DATA=DIR ctest ...

Writes into DIR:
  model.oelm      tiny f32 model (4 layers, vocab 1024) with a SentencePiece tokenizer
  logits.bin      u32 n, i32 ids[n], u32 vocab, f32 logits[n][vocab]  (Session.logits)
  generate.bin    u32 count, then per case: f32 temperature, i32 top_k, f32 top_p,
                  f32 min_p, f32 repetition_penalty, u64 seed, i32 max_new_tokens,
                  u32 n, i32 prompt[n], u32 m, i32 tokens[m]      (Session.generate)
  text.bin        u32 count, then per case: u32 len, text, u32 n, i32 ids[n] (with BOS),
                  u32 len, decoded text        (the sentencepiece package: the reference
                  the native tokenizer must equal)
  stream.bin      u32 count, then per case: u32 len, prompt text, f32 temperature,
                  u64 seed, i32 max_new_tokens, u32 m, i32 tokens[m], u32 len, generated
                  text                                                (Session.generate)
  noqk.oelm       tiny model with normalize_qk_projections=false, rms_norm_eps 1e-5 and no
                  tokenizer (token ids only)
  noqk.bin        u32 n, i32 prompt[n], u32 m, i32 tokens[m]   (greedy, Session.generate)
  poisoned.oelm   tiny untied model in q8 with an f32 embedding whose row 7 is NaN (corrupt
                  tensor data: loads without verify, non-finite logits for prompts with 7)
All little-endian. Needs the openelm_rt package (with its compiled core) importable.
"""
from __future__ import annotations

import re
import struct
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS_DIR))

from conftest import TEXT_PROMPTS, build_model, poison_token_embedding, prompt_ids  # noqa: E402

import openelm_rt  # noqa: E402
from openelm_rt import export  # noqa: E402
import sentencepiece  # noqa: E402
from openelm_rt.tokenizer_train import train_sentencepiece  # noqa: E402

# Sampling cases for generate.bin: greedy, greedy with a penalty, and seeded sampling
# through every filter, so each part of the sampler is compared with the Python path.
GENERATE_CASES = [
    dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=0),
    dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.3, seed=0),
    dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.1, seed=7),
    dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=12345678901234),
]

# Text cases beyond conftest's prompts: empty, newlines, a character absent from the
# training corpus (byte fallback), and text that normalises (double spaces).
EXTRA_TEXTS = ["", "line one\nline two\n", "\u2603 snowman \U0001f680 rocket", "a  b   c"]


def _ids(ids) -> bytes:
    return struct.pack("<I", len(ids)) + struct.pack(f"<{len(ids)}i", *ids)


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<I", len(b)) + b


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    tok = train_sentencepiece(out / "tok1024.model", 1024)
    model = build_model(out, tok, "model", seed=0)  # writes out/model.oelm

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tok))
    with openelm_rt.Session(model.oelm) as s:
        ids = prompt_ids(33, s.vocab_size)
        logits = s.logits(ids)
        (out / "logits.bin").write_bytes(
            _ids(ids) + struct.pack("<I", s.vocab_size) + logits.astype("<f4").tobytes())

        gen = struct.pack("<I", len(GENERATE_CASES))
        for i, c in enumerate(GENERATE_CASES):
            prompt = prompt_ids(5 + 3 * i, s.vocab_size, seed=i)
            max_new = 24
            r = s.generate(prompt, max_new_tokens=max_new, **c)
            gen += struct.pack("<fifffQi", c["temperature"], c["top_k"], c["top_p"],
                               c["min_p"], c["repetition_penalty"], c["seed"], max_new)
            gen += _ids(prompt) + _ids(r.token_ids)
        (out / "generate.bin").write_bytes(gen)

        texts = TEXT_PROMPTS + EXTRA_TEXTS
        text = struct.pack("<I", len(texts))
        for t in texts:
            ids = [sp.bos_id()] + sp.encode(t)
            text += _str(t) + _ids(ids) + _str(sp.decode(ids))
        (out / "text.bin").write_bytes(text)

        # Greedy continuations of text prompts; one sampled continuation whose first token
        # starts with a space ("\u2581"), which the streamed text must keep; and one cut
        # right after the lead byte of a multi-byte character, which must end as U+FFFD.
        cases = [(t, 0.0, 0, 40) for t in TEXT_PROMPTS]
        seed = next((seed for seed in range(1000)
                     if sp.id_to_piece(s.generate(TEXT_PROMPTS[1], max_new_tokens=1, temperature=1.5,
                                                     seed=seed).token_ids[0]).startswith("\u2581")), None)
        lead = next(((t, k + 1) for t in TEXT_PROMPTS
                     for k, tok in enumerate(s.generate(t, max_new_tokens=40).token_ids)
                     if re.fullmatch(r"<0x[C-F][0-9A-F]>", sp.id_to_piece(tok))), None)
        if seed is None or lead is None:
            raise SystemExit("no continuation starting with a space or cut inside a character found; "
                             "widen the search in make_fixtures.py")
        cases += [(TEXT_PROMPTS[1], 1.5, seed, 40), (lead[0], 0.0, 0, lead[1])]
        stream = struct.pack("<I", len(cases))
        for t, temperature, seed, max_new in cases:
            r = s.generate(t, max_new_tokens=max_new, temperature=temperature, seed=seed)
            stream += _str(t) + struct.pack("<fQi", temperature, seed, max_new) + _ids(r.token_ids) + _str(r.text)
        (out / "stream.bin").write_bytes(stream)
    noqk = build_model(out, tok, "noqk", seed=4, with_tokenizer=False,
                       config_overrides={"normalize_qk_projections": False, "rms_norm_eps": 1e-5})
    with openelm_rt.Session(noqk.oelm) as s:
        prompt = prompt_ids(9, s.vocab_size, seed=3)
        (out / "noqk.bin").write_bytes(_ids(prompt) + _ids(s.generate(prompt, max_new_tokens=16).token_ids))
    # bf16 weights: logits with exact f32 activations (the default) and rounded to bf16 (exact=False).
    bf16 = export.export_checkpoint(model.ckpt_dir, out / "model_bf16.oelm", dtype="bf16", tokenizer=tok)
    with openelm_rt.Session(bf16, threads=1) as e, openelm_rt.Session(bf16, threads=1, exact=False) as r:
        ids = prompt_ids(40, e.vocab_size, seed=5)
        (out / "bf16.bin").write_bytes(
            _ids(ids) + _str(e.kernels) + struct.pack("<Ii", e.vocab_size, int(r._backend.rounds_activations("bf16")))
            + e.logits(ids).astype("<f4").tobytes() + r.logits(ids).astype("<f4").tobytes())
    untied = build_model(out, tok, "untied", seed=3, config_overrides={"share_input_output_layers": False})
    q8 = export.export_checkpoint(untied.ckpt_dir, out / "untied_q8.oelm", dtype="q8", embedding_dtype="f32",
                                  tokenizer=tok)
    poison_token_embedding(q8, out / "poisoned.oelm", 7)
    print(f"fixtures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
