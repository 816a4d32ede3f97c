"""The native tokenizer against the `sentencepiece` library, id for id: 10,000 deterministic
strings of every hard category (tests/tokenizer_cases.py) and hypothesis-generated text, on
the real LLaMA-2 tokenizer (skipped when absent) and on tokenizers trained here (BPE with
byte fallback; without it, to cover <unk>; with USER_DEFINED and UNUSED pieces; without the
dummy prefix); decoding of random id sequences (byte pieces forming invalid UTF-8
included); the streaming decoder; and malformed vocabularies refused at load.
"""
from __future__ import annotations

import random

import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spm_proto as P
from conftest import REAL_LLAMA_TOKENIZER, build_model
from tokenizer_cases import cases

VOCABS = ["llama2", "bpe_byte_fallback", "bpe_no_byte_fallback", "user_defined_unused", "no_dummy_prefix"]
HYP = settings(max_examples=300, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="session")
def no_byte_fallback_path(work_dir):
    from openelm_rt.tokenizer_train import train_sentencepiece
    return train_sentencepiece(work_dir / "tok1024_nobf.model", 1024, byte_fallback=False)


def _variant_user_defined_unused(blob: bytes) -> bytes:
    """USER_DEFINED pieces are matched before anything else and never merged; UNUSED
    pieces may be formed by merges but are split back into their parts."""
    m = P.Model(blob)
    normal = [i for i, (p, _, t) in enumerate(m.pieces) if t == P.NORMAL and len(p) > 1]
    for i in normal[:: len(normal) // 12][:12]:
        p, s, _ = m.pieces[i]
        m.pieces[i] = (p, s, P.UNUSED)
    for i in normal[5:: len(normal) // 8][:8]:
        p, _, _ = m.pieces[i]
        m.pieces[i] = (p, 0.0, P.USER_DEFINED)
    return m.serialize()


def _variant_no_dummy_prefix(blob: bytes) -> bytes:
    m = P.Model(blob)
    m.set_field(m.normalizer, 3, 0, 0)
    return m.serialize()


@pytest.fixture(scope="session", params=VOCABS)
def vocab(request, tokenizer_path, no_byte_fallback_path, ort):
    """(name, our Tokenizer, sentencepiece processor) built from the same bytes."""
    name = request.param
    if name == "llama2":
        if not REAL_LLAMA_TOKENIZER.is_file():
            pytest.skip(f"LLaMA-2 tokenizer not present at {REAL_LLAMA_TOKENIZER}")
        blob = REAL_LLAMA_TOKENIZER.read_bytes()
    elif name == "bpe_no_byte_fallback":
        blob = no_byte_fallback_path.read_bytes()
    else:
        blob = tokenizer_path.read_bytes()
        if name == "user_defined_unused":
            blob = _variant_user_defined_unused(blob)
        elif name == "no_dummy_prefix":
            blob = _variant_no_dummy_prefix(blob)
    return name, ort._core.Tokenizer.from_sentencepiece(blob), spm.SentencePieceProcessor(model_proto=blob)


def _first_mismatch(texts, ours, theirs):
    for t, a, b in zip(texts, ours, theirs):
        if a != b:
            return f"{t!r}: ours {a} != sentencepiece {b}"
    return None


# ----------------------------------------------------------------------------- encode

def test_cases_cover_the_categories():
    cs = cases()
    assert len(cs) >= 10_000 and len(set(cs)) > 9_000
    joined = "".join(cs)
    for probe in ("東", "Ж", "ب", "क", "\u200d", "\u0301", "\t", "\n", "   ", "\x00", "<s>", "</s>",
                  "🙂", "7"):
        assert probe in joined, probe
    assert "" in cs and any(len(c) >= 5000 for c in cs)
    assert any(c.startswith(" ") for c in cs) and any(c.endswith(" ") for c in cs)


def test_encode_equals_sentencepiece(vocab):
    name, tok, sp = vocab
    texts = cases()
    assert tok.vocab_size == sp.vocab_size()
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    ours, theirs = tok.encode_batch(texts), sp.encode(texts)
    assert _first_mismatch(texts, ours, theirs) is None, _first_mismatch(texts, ours, theirs)
    assert tok.encode(texts[100], True) == [sp.bos_id()] + theirs[100]
    if name == "bpe_no_byte_fallback":  # the cases reach <unk>, and runs of it collapse
        assert any(sp.unk_id() in ids for ids in theirs)
    elif name != "no_dummy_prefix":
        assert any(tok.piece(i).startswith("<0x") for ids in ours for i in ids)  # byte fallback used


def test_llama2_reference_ids(ort):
    """The example from ../shared/tokenizers/llama2/README.md and a few by hand."""
    if not REAL_LLAMA_TOKENIZER.is_file():
        pytest.skip("LLaMA-2 tokenizer not present")
    tok = ort._core.Tokenizer.from_sentencepiece(REAL_LLAMA_TOKENIZER.read_bytes())
    assert tok.encode("The capital of France is", True) == [1, 450, 7483, 310, 3444, 338]
    assert tok.encode("", False) == [] and tok.encode("", True) == [1]
    assert tok.encode(" ", False) == [259]  # "▁▁": the dummy prefix and the space
    assert tok.encode("\n", False) == [29871, 13]  # "▁", <0x0A>
    assert tok.encode("<s>", False) == [529, 29879, 29958]  # text, never the BOS token


@HYP
@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=120))
def test_encode_random_unicode_equals_sentencepiece(vocab, text):
    _, tok, sp = vocab
    assert tok.encode(text, False) == sp.encode(text)


@HYP
@given(text=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), max_size=120))
def test_round_trip(vocab, text):
    """decode(encode(s)) == s with byte fallback (U+2581 excluded: SentencePiece reads it as
    its own escaped space and decodes it to ' ')."""
    name, tok, sp = vocab
    ids = tok.encode(text, True)
    if tok.byte_fallback:
        assert tok.decode(ids) == text
    else:
        assert tok.decode(ids) == sp.decode(ids)


# ----------------------------------------------------------------------------- decode

def _random_id_sequences(tok, n, seed):
    rng = random.Random(seed)
    V = tok.vocab_size
    byte_ids = [i for i in range(V) if tok.piece(i).startswith("<0x") and len(tok.piece(i)) == 6]
    specials = [tok.bos_id, tok.eos_id, tok.unk_id]
    text_ids = tok.encode(" ".join(cases(300, seed=seed)), False)
    out = []
    for _ in range(n):
        k = rng.randrange(4)
        L = rng.randint(0, 30)
        if k == 0:
            seq = [rng.randrange(V) for _ in range(L)]
        elif k == 1 and byte_ids:  # raw bytes: valid and invalid UTF-8, mixed with pieces
            seq = [rng.choice(byte_ids) if rng.random() < 0.8 else rng.randrange(V) for _ in range(L)]
        elif k == 2:  # specials in front of and between text pieces (dummy-prefix stripping)
            seq = [rng.choice(specials) for _ in range(rng.randint(0, 3))] + \
                  [rng.choice(text_ids) for _ in range(L)]
        else:
            i = rng.randrange(len(text_ids))
            seq = text_ids[i:i + L]
        out.append(seq)
    return out


def test_decode_equals_sentencepiece(vocab):
    _, tok, sp = vocab
    for ids in _random_id_sequences(tok, 3000, seed=1):
        assert tok.decode(ids) == sp.decode(ids), ids
    texts = cases(2000, seed=5)
    for t, ids in zip(texts, sp.encode(texts)):
        assert tok.decode(ids) == sp.decode(ids), t


@HYP
@given(data=st.data())
def test_decode_random_ids_equals_sentencepiece(vocab, data):
    _, tok, sp = vocab
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
    assert tok.decode(ids) == sp.decode(ids)


def test_decode_invalid_utf8_like_sentencepiece(vocab):
    """One U+FFFD per invalid byte (not Python's maximal-subpart rule)."""
    _, tok, sp = vocab
    if not tok.byte_fallback:
        pytest.skip("no byte pieces")
    b = {v: sp.piece_to_id(f"<0x{v:02X}>") for v in range(256)}
    for raw in (b"\xe2\x82", b"\xe2\x82A", b"\xf0\x9f\x99", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                b"\xff", b"\x80\x80", b"A\xf0\x9f\x99\x82\x80"):
        ids = [b[x] for x in raw]
        assert tok.decode(ids) == sp.decode(ids), raw
    assert tok.decode([b[0xE2], b[0x82]]) == "\ufffd\ufffd"


def test_decode_rejects_bad_ids(vocab, ort):
    _, tok, _ = vocab
    d = ort._core.StreamDecoder(tok)
    for bad in (-1, tok.vocab_size, 2**40):
        with pytest.raises(ValueError, match=f"token id {bad} .*outside"):
            tok.decode([bad])
        with pytest.raises(ValueError, match=f"token id {bad} .*outside"):
            d.push(bad)


# ----------------------------------------------------------------------------- streaming

def _stream(ort, tok, ids):
    d = ort._core.StreamDecoder(tok)
    return [d.push(i) for i in ids] + [d.flush()]


def test_stream_concatenates_to_decode(vocab, ort):
    _, tok, _ = vocab
    for ids in _random_id_sequences(tok, 1500, seed=2):
        parts = _stream(ort, tok, ids)  # each part is a str: no partial UTF-8 character
        assert "".join(parts) == tok.decode(ids), ids


def test_stream_emits_byte_fallback_emoji_as_one_piece(vocab, ort):
    _, tok, _ = vocab
    if not tok.byte_fallback:
        pytest.skip("no byte pieces")
    emoji = "\U0001FAE0"  # 🫠: in no trained vocabulary, so it is 4 byte pieces
    ids = tok.encode("a" + emoji, False)
    assert [tok.piece(i) for i in ids[-4:]] == ["<0xF0>", "<0x9F>", "<0xAB>", "<0xA0>"]
    parts = _stream(ort, tok, ids)
    assert parts[-5:] == ["", "", "", emoji, ""]
    assert "".join(parts) == "a" + emoji


# ----------------------------------------------------------------------------- malformed vocabularies

def _mutate(blob, fn):
    m = P.Model(blob)
    fn(m)
    return m.serialize()


def _set_piece(i, name=None, typ=None):
    def fn(m):
        p, s, t = m.pieces[i]
        m.pieces[i] = (p if name is None else name, s, t if typ is None else typ)
    return fn


def _idx(m, piece):
    return next(i for i, (p, _, _) in enumerate(m.pieces) if p == piece)


MALFORMED = [
    ("duplicate", lambda m: _set_piece(400, name=m.pieces[300][0])(m), r"duplicate piece .* at ids 300 and 400"),
    ("bad_byte", lambda m: _set_piece(_idx(m, "<0x41>"), name="<0xG1>")(m), r"bad byte token.*<0xG1>"),
    ("lowercase_byte", lambda m: _set_piece(_idx(m, "<0x0A>"), name="<0x0a>")(m), r"bad byte token.*<0x0a>"),
    ("missing_byte", lambda m: _set_piece(_idx(m, "<0x41>"), typ=P.NORMAL)(m), r"<0x41> is missing"),
    ("missing_unk", _set_piece(0, typ=P.CONTROL), r"missing <unk>"),
    ("two_unk", _set_piece(700, typ=P.UNKNOWN), r"two UNKNOWN pieces, ids 0 and 700"),
    ("missing_bos", _set_piece(1, name="<bos>"), r"missing BOS piece '<s>'"),
    ("missing_eos", _set_piece(2, name="<eos>"), r"missing EOS piece '</s>'"),
    ("eos_wrong_type", _set_piece(2, typ=P.NORMAL), r"EOS piece '</s>' \(id 2\) has type NORMAL, expected CONTROL"),
    ("bad_type", _set_piece(500, typ=9), r"type 9"),
    ("empty_piece", _set_piece(500, name=""), r"piece 500 is empty"),
    ("bytes_without_fallback", lambda m: m.set_field(m.trainer, 35, 0, 0), r"BYTE piece but byte_fallback is off"),
    ("unigram", lambda m: m.set_field(m.trainer, 3, 0, 1), r"model_type is UNIGRAM, not BPE.*LLaMA-2"),
    ("nfkc", lambda m: (m.set_field(m.normalizer, 1, 2, b"nmt_nfkc"), m.set_field(m.normalizer, 2, 2, b"\x01" * 9)),
     r"normalizer 'nmt_nfkc'.*only 'identity'"),
    ("remove_extra_ws", lambda m: m.set_field(m.normalizer, 4, 0, 1), r"remove_extra_whitespaces"),
]


@pytest.mark.parametrize("name,mutate,pattern", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_vocabulary_rejected(ort, tokenizer_path, name, mutate, pattern):
    blob = _mutate(tokenizer_path.read_bytes(), mutate)
    with pytest.raises(ort.FormatError, match=pattern):
        ort._core.Tokenizer.from_sentencepiece(blob)


@pytest.mark.parametrize("blob", [b"\x0a\xff", b"\x0a\x05\x0a\x03<s", b"\x08", b"\x0b\x00", b"\xff" * 12])
def test_corrupt_protobuf_rejected(ort, blob):
    with pytest.raises(ort.FormatError, match="not a valid SentencePiece model protobuf"):
        ort._core.Tokenizer.from_sentencepiece(blob)


@pytest.mark.parametrize("name", ["duplicate", "bad_byte", "missing_byte", "missing_unk", "missing_bos",
                                  "eos_wrong_type"])
def test_malformed_vocabulary_rejected_at_model_load(ort, work_dir, tokenizer_path, monkeypatch, name):
    """A file whose stored tokenizer is malformed (written past the exporter's checks) is
    refused by Model load, naming the file and the problem."""
    from openelm_rt import export
    _, mutate, pattern = next(c for c in MALFORMED if c[0] == name)
    blob = _mutate(tokenizer_path.read_bytes(), mutate)
    monkeypatch.setattr(export, "_load_tokenizer", lambda *a: blob)
    m = build_model(work_dir, tokenizer_path, f"badtok_{name}", seed=9)
    with pytest.raises(ort.FormatError, match=pattern) as e:
        ort.Session(str(m.oelm))
    assert str(m.oelm) in str(e.value)
    with pytest.raises(ort.FormatError, match=pattern):
        ort._core.Model(str(m.oelm))
