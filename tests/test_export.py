"""Tests for the Python side of the .oelm pipeline: safetensors I/O, random HF checkpoints,
test tokenizers and openelm-rt-export (round trips, file layout per docs/FORMAT.md, and every
error path). The C++ reader has its own tests; here the file is parsed independently with
struct/json, not with openelm_rt's reader, wherever the layout itself is under test.
"""

import json
import math
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from openelm_rt import export as export_mod
from openelm_rt.checkpoint import load_hf_checkpoint, write_random_checkpoint
from openelm_rt.export import export_checkpoint, main, read_oelm
from openelm_rt.hf_config import ExportError, make_config, parse_config, tensor_layout
from openelm_rt.safetensors_io import (SafetensorsFile, bf16_to_f32, f32_to_bf16,
                                       write_safetensors)
from openelm_rt.tokenizer_train import CORPUS_PATH, train_sentencepiece

PER_LAYER = ["attn_norm", "attn_qkv", "attn_q_norm", "attn_k_norm", "attn_output", "ffn_norm",
             "ffn_gate_up", "ffn_down"]


# ----------------------------------------------------------------------------- fixtures/helpers

@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Path:
    """A 1024-piece LLaMA-style tokenizer trained on the shipped corpus (matches the tiny preset)."""
    return train_sentencepiece(tmp_path_factory.mktemp("tok") / "tokenizer.model", 1024)


def make_ckpt(path: Path, tokenizer: Path | None, dtype="f32", shards=1, seed=0, **overrides) -> Path:
    write_random_checkpoint(path, make_config("tiny", **overrides), dtype=dtype, seed=seed,
                            shards=shards)
    if tokenizer is not None:
        shutil.copy(tokenizer, path / "tokenizer.model")
    return path


@pytest.fixture
def ckpt(tmp_path, tokenizer) -> Path:
    return make_ckpt(tmp_path / "ckpt", tokenizer)


def raw_tensors(ckpt_dir: Path):
    """{name: stored array (BF16 as uint16 bits)}, {name: safetensors dtype} of model.safetensors."""
    with SafetensorsFile(ckpt_dir / "model.safetensors") as st:
        return {n: np.array(st.get(n)) for n in st.keys()}, {n: st.dtype(n) for n in st.keys()}


def rewrite(ckpt_dir: Path, edit) -> None:
    arrays, dtypes = raw_tensors(ckpt_dir)
    edit(arrays, dtypes)
    write_safetensors(ckpt_dir / "model.safetensors", arrays, dtypes)


def edit_config(ckpt_dir: Path, **changes) -> None:
    path = ckpt_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def assert_nothing_written(out_dir: Path, name: str) -> None:
    left = [p.name for p in out_dir.iterdir() if p.name == name or ".tmp-" in p.name]
    assert left == [], f"export left {left} behind"


def parse_oelm(path: Path):
    """Independent parse of the fixed header and metadata, per docs/FORMAT.md."""
    raw = path.read_bytes()
    (magic, fmt_v, names_v, meta_off, meta_size, data_off, data_size, align, meta_crc,
     file_size) = struct.unpack_from("<8sIIQQQQIIQ", raw, 0)
    header = dict(magic=magic, format_version=fmt_v, names_version=names_v,
                  metadata_offset=meta_off, metadata_size=meta_size, data_offset=data_off,
                  data_size=data_size, alignment=align, metadata_crc32=meta_crc,
                  file_size=file_size)
    meta_bytes = raw[meta_off:meta_off + meta_size]
    return raw, header, meta_bytes, json.loads(meta_bytes.decode("utf-8"))


def expected_names(n_layer: int, untied=False) -> list[str]:
    return (["tokenizer.model", "token_embd"]
            + [f"blk.{i}.{n}" for i in range(n_layer) for n in PER_LAYER]
            + ["output_norm"] + (["output"] if untied else []))


def round_bf16_reference(x: np.ndarray) -> np.ndarray:
    """Independent RNE f32 -> bf16 bits via 64-bit arithmetic (finite inputs only)."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


# ----------------------------------------------------------------------------- safetensors_io

def test_bf16_rounding_ties_to_even_and_specials():
    one = np.float32(1.0)
    ulp = np.float32(2.0 ** -7)  # bf16 spacing at 1.0
    x = np.array([1.0, one + ulp / 2, one + ulp * 1.5, one + ulp / 2 + np.float32(2 ** -20),
                  -(one + ulp * 1.5), np.inf, -np.inf, 3.4028235e38, 1e-45, 0.0, -0.0],
                 dtype=np.float32)
    got = bf16_to_f32(f32_to_bf16(x))
    want = np.array([1.0, 1.0, 1.0 + 2 * ulp, 1.0 + ulp, -(1.0 + 2 * ulp), np.inf, -np.inf,
                     np.inf, 0.0, 0.0, -0.0], dtype=np.float32)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    nan_bits = np.array([0x7FC00000, 0xFFC00001, 0x7F800001, 0xFFFFFFFF], np.uint32).view(np.float32)
    out = f32_to_bf16(nan_bits)
    assert np.isnan(bf16_to_f32(out)).all()
    assert list(out >> 15) == [0, 1, 0, 1]  # sign kept


def test_bf16_matches_independent_rounding_on_random_values():
    x = np.random.default_rng(1).standard_normal(100_000, dtype=np.float32) * 7
    assert np.array_equal(f32_to_bf16(x), round_bf16_reference(x))
    b = f32_to_bf16(x)
    assert np.array_equal(f32_to_bf16(bf16_to_f32(b)), b)  # bf16 -> f32 -> bf16 is exact


def test_safetensors_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5), dtype=np.float32),
               "b": rng.standard_normal(7).astype(np.float16),
               "c": f32_to_bf16(rng.standard_normal((2, 2, 2), dtype=np.float32)),
               "empty": np.zeros((0, 4), np.float32)}
    path = tmp_path / "t.safetensors"
    size = write_safetensors(path, tensors, dtypes={"c": "BF16"})
    assert size == path.stat().st_size
    n = int.from_bytes(path.read_bytes()[:8], "little")
    assert n % 8 == 0  # header padded so the data is 8-byte aligned, as the safetensors library does
    with SafetensorsFile(path) as st:
        assert sorted(st.keys()) == ["a", "b", "c", "empty"]
        assert (st.dtype("a"), st.dtype("b"), st.dtype("c")) == ("F32", "F16", "BF16")
        assert st.shape("c") == (2, 2, 2)
        assert st.metadata == {"format": "pt"}
        for k, v in tensors.items():
            got = st.get(k)
            assert got.dtype == v.dtype and np.array_equal(got, v)
    with pytest.raises(ValueError, match="BF16 needs uint16"):
        write_safetensors(tmp_path / "x.safetensors", {"a": tensors["a"]}, dtypes={"a": "BF16"})


def _write_raw_safetensors(path: Path, header, data: bytes) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)
    return path


@pytest.mark.parametrize("header, data, pattern", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4,
     r"lie outside the 4-byte data section"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8,
     r"needs 12 bytes but data_offsets \[0, 8\] span 8"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, r"overlap"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, b"\0", r"unknown dtype 'Q4'"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", r"invalid shape"),
    (b"{not json", b"", r"not valid UTF-8 JSON"),
    (b"[1, 2]", b"", r"not an object"),
])
def test_safetensors_header_validation(tmp_path, header, data, pattern):
    path = _write_raw_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(ExportError, match=pattern) as err:
        SafetensorsFile(path)
    assert "bad.safetensors" in str(err.value)


def test_safetensors_truncated_header(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(ExportError, match="header length field says 1000000 bytes"):
        SafetensorsFile(path)
    path.write_bytes(b"\1\2")
    with pytest.raises(ExportError, match="too short"):
        SafetensorsFile(path)


# ----------------------------------------------------------------------------- checkpoints

def test_random_checkpoint_layout_and_init(tmp_path):
    d = write_random_checkpoint(tmp_path / "c", make_config("tiny"))
    cfg, w = load_hf_checkpoint(d)
    assert json.loads((d / "config.json").read_text()) == cfg and cfg["torch_dtype"] == "float32"
    spec = parse_config(cfg)
    assert set(w) == {t.hf_name for t in tensor_layout(spec)}
    for t in tensor_layout(spec):
        assert w[t.hf_name].shape == t.shape and w[t.hf_name].dtype == np.float32
    D, L = 128, 4
    norm = w["transformer.layers.2.ffn_norm.weight"]
    assert not np.all(norm == 1) and abs(norm.mean() - 1) < 0.05 and 0.07 < norm.std() < 0.13
    # CoreNet init: std in_features^-0.5, embeddings D^-0.5, residual outputs D^-0.5 (2L)^-0.5
    for name, std in [("transformer.token_embeddings.weight", D ** -0.5),
                      ("transformer.layers.3.ffn.proj_1.weight", D ** -0.5),
                      ("transformer.layers.3.attn.out_proj.weight", D ** -0.5 * (2 * L) ** -0.5),
                      ("transformer.layers.3.ffn.proj_2.weight", D ** -0.5 * (2 * L) ** -0.5)]:
        assert abs(w[name].std() / std - 1) < 0.05, name
    with SafetensorsFile(d / "model.safetensors") as st:
        assert st.metadata == {"format": "pt"}
        assert st.keys() == sorted(st.keys())  # name order, like the safetensors library


def test_random_checkpoint_deterministic_sharded_and_bf16(tmp_path):
    a = write_random_checkpoint(tmp_path / "a", make_config("tiny"), seed=7)
    b = write_random_checkpoint(tmp_path / "b", make_config("tiny"), seed=7)
    c = write_random_checkpoint(tmp_path / "c", make_config("tiny"), seed=8)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    s = write_random_checkpoint(tmp_path / "s", make_config("tiny"), seed=7, shards=3)
    index = json.loads((s / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert not (s / "model.safetensors").exists()
    _, wa = load_hf_checkpoint(a)
    _, ws = load_hf_checkpoint(s)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in wa.values())
    assert wa.keys() == ws.keys() and all(np.array_equal(wa[k], ws[k]) for k in wa)
    h = write_random_checkpoint(tmp_path / "h", make_config("tiny"), seed=7, dtype="bf16")
    assert json.loads((h / "config.json").read_text())["torch_dtype"] == "bfloat16"
    raw, dtypes = raw_tensors(h)
    assert set(dtypes.values()) == {"BF16"}
    assert all(np.array_equal(raw[k], f32_to_bf16(wa[k])) for k in wa)


def test_checkpoint_readable_by_test_oracle(tmp_path):
    oracle = pytest.importorskip("oracle")  # tests/oracle.py: a separate safetensors reader
    d = write_random_checkpoint(tmp_path / "c", make_config("tiny"), dtype="bf16", shards=2)
    cfg_o, w_o = oracle.read_checkpoint(d)
    cfg, w = load_hf_checkpoint(d)
    assert cfg_o == cfg and w_o.keys() == w.keys()
    assert all(np.array_equal(w_o[k], w[k]) for k in w)


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_training_llama_style_and_deterministic(tmp_path, tokenizer):
    again = train_sentencepiece(tmp_path / "again.model", 1024)
    assert again.read_bytes() == tokenizer.read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    assert sp.vocab_size() == 1024
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.id_to_piece(3) == "<0x00>" and sp.id_to_piece(258) == "<0xFF>"
    text = CORPUS_PATH.read_text(encoding="utf-8")
    for line in text.splitlines()[:200] + ["tabs\tand   spaces  ", "\u0915\u094d\u0937 🧑🏽‍🔬 𝔘"]:
        assert sp.decode(sp.encode(line)) == line  # byte fallback + identity normalization
    ids = sp.encode("𝔘")  # a character the corpus lacks: spelled as its 4 UTF-8 bytes
    assert [sp.id_to_piece(i) for i in ids][-4:] == ["<0xF0>", "<0x9D>", "<0x94>", "<0x98>"]
    # split_digits: no piece holds two digits
    assert all(sum(c.isdigit() for c in sp.id_to_piece(i)) <= 1 for i in sp.encode("x 2024 31.5"))


def test_tokenizer_4000_and_too_large(tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(train_sentencepiece(tmp_path / "t.model", 4000)))
    assert sp.vocab_size() == 4000
    with pytest.raises(ExportError, match=r"cannot train 50000 pieces.*source='stdlib'"):
        train_sentencepiece(tmp_path / "big.model", 50000)


def test_corpus_covers_scripts_and_hard_cases():
    text = CORPUS_PATH.read_text(encoding="utf-8")
    assert 40_000 <= len(text.encode("utf-8")) <= 60_000
    for lo, hi, what in [(0x4E00, 0x9FFF, "CJK"), (0x0400, 0x04FF, "Cyrillic"),
                         (0x0600, 0x06FF, "Arabic"), (0x0900, 0x097F, "Devanagari"),
                         (0x0370, 0x03FF, "Greek"), (0x3040, 0x30FF, "kana"),
                         (0xAC00, 0xD7AF, "Hangul"), (0x0300, 0x036F, "combining marks"),
                         (0x1F300, 0x1FAFF, "emoji")]:
        assert sum(lo <= ord(c) <= hi for c in text) >= 20, what
    assert "\u200d" in text and "\t" in text and "     " in text


# ----------------------------------------------------------------------------- export: round trips

def test_export_f32_bit_exact_and_file_layout(tmp_path, ckpt, tokenizer):
    out = export_checkpoint(ckpt, tmp_path / "m.oelm")
    cfg, w = load_hf_checkpoint(ckpt)
    raw, h, meta_bytes, meta = parse_oelm(out)

    # fixed header
    assert h["magic"] == b"OELM-RT\0" and raw[:8] == bytes.fromhex("4F454C4D2D525400")
    assert (h["format_version"], h["names_version"]) == (1, 1)
    assert h["metadata_offset"] == 64 and h["alignment"] == 4096
    assert h["data_offset"] % 4096 == 0 and h["data_offset"] >= 64 + h["metadata_size"]
    assert h["file_size"] == len(raw) == h["data_offset"] + h["data_size"]
    assert h["metadata_crc32"] == zlib.crc32(meta_bytes)
    assert raw[64 + h["metadata_size"]:h["data_offset"]].count(0) == h["data_offset"] - 64 - h["metadata_size"]

    # metadata
    assert meta["format"] == "openelm_rt" and meta["weights_dtype"] == "f32"
    assert meta["writer"].startswith("openelm-rt-export ")
    assert meta["tokenizer"] == {"type": "sentencepiece", "tensor": "tokenizer.model"}
    assert meta["source"]["hf_config"] == cfg
    assert meta["model"] == {
        "architecture": "openelm", "n_layer": 4, "d_model": 128, "head_dim": 16,
        "vocab_size": 1024, "n_head_q": [4, 8, 8, 8], "n_head_kv": [1, 2, 2, 2],
        "ffn_dim": [64, 224, 352, 512], "rope_theta": 10000.0, "norm_eps": 1e-6,
        "max_context": 256, "bos_token_id": 1, "eos_token_id": 2, "tied_embeddings": True,
        "qk_norm": True}

    # tensor table: FORMAT.md order, aligned, no overlap, sizes, CRCs, zero padding, tight end
    tensors = meta["tensors"]
    assert [t["name"] for t in tensors] == expected_names(4)
    itemsize = {"f32": 4, "f16": 2, "bf16": 2, "u8": 1}
    end = 0
    for t in tensors:
        assert t["offset"] % 4096 == 0 and t["offset"] >= end
        assert t["size"] == math.prod(t["shape"]) * itemsize[t["dtype"]]
        start = h["data_offset"] + t["offset"]
        assert not any(raw[h["data_offset"] + end:start])  # padding is zeros
        assert zlib.crc32(raw[start:start + t["size"]]) == t["crc32"]
        end = t["offset"] + t["size"]
    assert end == h["data_size"]
    by_name = {t["name"]: t for t in tensors}
    assert by_name["tokenizer.model"]["dtype"] == "u8"
    tok = by_name["tokenizer.model"]
    assert raw[h["data_offset"] + tok["offset"]:][:tok["size"]] == tokenizer.read_bytes()

    # every weight bit-exact, norms f32
    spec = parse_config(cfg)
    with read_oelm(out) as f:
        assert f.header["data_offset"] == h["data_offset"] and f.metadata == meta
        for t in tensor_layout(spec):
            got = f.tensor(t.oelm_name)
            assert by_name[t.oelm_name]["dtype"] == "f32"
            assert got.dtype == np.float32 and got.shape == t.shape
            assert np.array_equal(got.view(np.uint32), w[t.hf_name].view(np.uint32)), t.hf_name


def test_export_sharded_equals_single_file(tmp_path, tokenizer):
    single = make_ckpt(tmp_path / "single", tokenizer)
    sharded = make_ckpt(tmp_path / "sharded", tokenizer, shards=3)
    a = export_checkpoint(single, tmp_path / "a.oelm")
    b = export_checkpoint(sharded, tmp_path / "b.oelm")
    assert a.read_bytes() == b.read_bytes()  # same weights, same config -> identical files


def test_export_bf16_checkpoint(tmp_path, tokenizer):
    d = make_ckpt(tmp_path / "bf", tokenizer, dtype="bf16")
    bits, _ = raw_tensors(d)
    spec = parse_config(json.loads((d / "config.json").read_text()))
    keep = export_checkpoint(d, tmp_path / "keep.oelm")  # auto -> bf16, bit copy
    up = export_checkpoint(d, tmp_path / "up.oelm", dtype="f32")  # exact upcast
    with read_oelm(keep) as k, read_oelm(up) as u:
        assert k.metadata["weights_dtype"] == "bf16" and u.metadata["weights_dtype"] == "f32"
        kdtypes = {x["name"]: x["dtype"] for x in k.metadata["tensors"]}
        for t in tensor_layout(spec):
            src = bits[t.hf_name]
            if t.is_norm:  # norms are always f32 (exact upcast)
                assert kdtypes[t.oelm_name] == "f32"
                assert np.array_equal(k.tensor(t.oelm_name), bf16_to_f32(src))
            else:
                assert k.tensor(t.oelm_name).dtype == np.uint16
                assert np.array_equal(k.tensor(t.oelm_name), src)
            assert np.array_equal(u.tensor(t.oelm_name), bf16_to_f32(src))


def test_export_f32_to_f16_and_bf16_round_to_nearest_even(tmp_path, ckpt):
    _, w = load_hf_checkpoint(ckpt)
    spec = parse_config(json.loads((ckpt / "config.json").read_text()))
    half = export_checkpoint(ckpt, tmp_path / "h.oelm", dtype="f16")
    brain = export_checkpoint(ckpt, tmp_path / "b.oelm", dtype="bf16")
    with read_oelm(half) as h, read_oelm(brain) as b:
        for t in tensor_layout(spec):
            if t.is_norm:
                assert np.array_equal(h.tensor(t.oelm_name), w[t.hf_name])
                assert np.array_equal(b.tensor(t.oelm_name), w[t.hf_name])
            else:
                assert h.tensor(t.oelm_name).dtype == np.float16
                assert np.array_equal(h.tensor(t.oelm_name).view(np.uint16),
                                      w[t.hf_name].astype(np.float16).view(np.uint16))
                assert np.array_equal(b.tensor(t.oelm_name), round_bf16_reference(w[t.hf_name]))


def test_export_untied_checkpoint(tmp_path, tokenizer, caplog):
    d = make_ckpt(tmp_path / "u", tokenizer, share_input_output_layers=False)
    _, w = load_hf_checkpoint(d)
    assert "transformer.classifier.weight" in w and "lm_head.weight" in w  # as HF saves them
    with caplog.at_level("INFO", logger="openelm_rt.export"):
        out = export_checkpoint(d, tmp_path / "u.oelm")
    assert "skipping transformer.classifier.weight" in caplog.text
    with read_oelm(out) as f:
        assert f.metadata["model"]["tied_embeddings"] is False
        assert [t["name"] for t in f.metadata["tensors"]] == expected_names(4, untied=True)
        assert np.array_equal(f.tensor("output"), w["lm_head.weight"])
        assert not np.array_equal(f.tensor("output"), f.tensor("token_embd"))


def test_export_untied_flag_without_tie_word_embeddings_is_tied(tmp_path, tokenizer, caplog):
    # share_input_output_layers=false but tie_word_embeddings left at HF's default (true):
    # HF ties lm_head to the embedding, so the stored lm_head is unused (OPENELM.md 3.8).
    d = make_ckpt(tmp_path / "q", tokenizer, share_input_output_layers=False,
                  tie_word_embeddings=True)
    with caplog.at_level("INFO", logger="openelm_rt.export"):
        out = export_checkpoint(d, tmp_path / "q.oelm")
    assert "skipping lm_head.weight" in caplog.text
    with read_oelm(out) as f:
        assert f.metadata["model"]["tied_embeddings"] is True
        assert "output" not in f.names()


def test_export_mixed_dtypes_auto_picks_f32(tmp_path, ckpt, caplog):
    name = "transformer.layers.1.ffn.proj_2.weight"
    rewrite(ckpt, lambda a, d: (a.__setitem__(name, f32_to_bf16(a[name])), d.__setitem__(name, "BF16")))
    _, w = load_hf_checkpoint(ckpt)
    with caplog.at_level("INFO", logger="openelm_rt.export"):
        out = export_checkpoint(ckpt, tmp_path / "m.oelm")
    assert "mix dtypes BF16, F32" in caplog.text and "writes f32" in caplog.text
    with read_oelm(out) as f:
        assert f.metadata["weights_dtype"] == "f32"
        assert np.array_equal(f.tensor("blk.1.ffn_down"), w[name])


def test_export_f16_checkpoint_and_progress(tmp_path, ckpt, capsys):
    rewrite(ckpt, lambda a, d: [(a.__setitem__(k, a[k].astype(np.float16)), d.__setitem__(k, "F16"))
                                for k in list(a)])
    out = export_checkpoint(ckpt, tmp_path / "m.oelm", progress=True)
    assert "MB/s" in capsys.readouterr().err
    with read_oelm(out) as f:
        assert f.metadata["weights_dtype"] == "f16"
        assert f.tensor("blk.0.attn_norm").dtype == np.float32


def test_export_overwrites_existing_file(tmp_path, ckpt):
    out = tmp_path / "m.oelm"
    out.write_bytes(b"old")
    export_checkpoint(ckpt, out)
    assert out.read_bytes()[:8] == b"OELM-RT\0"
    assert_nothing_written(tmp_path, "none")  # no temp file left


# ----------------------------------------------------------------------------- export: errors

def _drop(name):
    return lambda a, d: (a.pop(name), d.pop(name))


@pytest.mark.parametrize("edit, pattern", [
    (_drop("transformer.layers.2.attn.k_norm.weight"),
     r"missing 1 tensor\(s\).*transformer\.layers\.2\.attn\.k_norm\.weight"),
    (lambda a, d: a.__setitem__("transformer.layers.0.attn.rotary.inv_freq", np.ones(8, np.float32)),
     r"1 tensor\(s\) an OpenELM model.*transformer\.layers\.0\.attn\.rotary\.inv_freq"),
    (lambda a, d: a.__setitem__("transformer.classifier.weight", np.ones((4, 4), np.float32)),
     r"transformer\.classifier\.weight"),  # only untied models may carry it
    (lambda a, d: a.__setitem__("transformer.layers.1.attn.q_norm.weight", np.ones(17, np.float32)),
     r"transformer\.layers\.1\.attn\.q_norm\.weight has shape \[17\], expected \[16\]"),
    (lambda a, d: a.__setitem__("transformer.layers.3.ffn.proj_1.weight",
                                np.ones((1024, 129), np.float32)),
     r"proj_1\.weight has shape \[1024, 129\], expected \[1024, 128\]"),
])
def test_export_rejects_bad_tensors(tmp_path, ckpt, edit, pattern):
    rewrite(ckpt, edit)
    with pytest.raises(ExportError, match=pattern):
        export_checkpoint(ckpt, tmp_path / "m.oelm")
    assert_nothing_written(tmp_path, "m.oelm")


def test_export_rejects_unsupported_dtype(tmp_path, ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    info = header["transformer.norm.weight"]
    info["dtype"], info["shape"] = "I32", info["shape"]  # same size, unsupported type
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data[8 + n:])
    with pytest.raises(ExportError, match=r"transformer\.norm\.weight is stored as I32"):
        export_checkpoint(ckpt, tmp_path / "m.oelm")


@pytest.mark.parametrize("dtype, value, pattern", [
    ("f32", np.nan, r"proj_1\.weight contains 1 NaN and 0 infinite value\(s\).*index \[37, 5\]"),
    ("f32", -np.inf, r"contains 0 NaN and 1 infinite"),
    ("bf16", np.nan, r"proj_1\.weight contains 1 NaN"),
])
def test_export_rejects_non_finite_weights(tmp_path, tokenizer, dtype, value, pattern):
    d = make_ckpt(tmp_path / "c", tokenizer, dtype=dtype)
    name = "transformer.layers.2.ffn.proj_1.weight"

    def poison(a, _):
        a[name] = a[name].copy()
        a[name][37, 5] = value if dtype == "f32" else f32_to_bf16(np.array([value], np.float32))[0]

    rewrite(d, poison)
    with pytest.raises(ExportError, match=pattern):
        export_checkpoint(d, tmp_path / "m.oelm")
    assert_nothing_written(tmp_path, "m.oelm")


def test_export_rejects_f16_overflow(tmp_path, ckpt):
    name = "transformer.layers.0.attn.out_proj.weight"
    rewrite(ckpt, lambda a, d: a[name].__setitem__((0, 0), 1e5))
    with pytest.raises(ExportError, match=r"out_proj\.weight has values beyond the float16 range"):
        export_checkpoint(ckpt, tmp_path / "m.oelm", dtype="f16")
    assert_nothing_written(tmp_path, "m.oelm")
    export_checkpoint(ckpt, tmp_path / "ok.oelm", dtype="bf16")  # bf16 has the range


@pytest.mark.parametrize("changes, pattern", [
    ({"num_query_heads": [4, 4, 8, 8]}, r"num_query_heads\[1\] = 4.*gives 8 for layer 1"),
    ({"activation_fn_name": "gelu"}, r"activation_fn_name = 'gelu' is not supported"),
    ({"model_type": "llama"}, r"model_type is 'llama'"),
    ({"bos_token_id": 5}, r"has bos id 1 but config.json bos_token_id is 5"),
    ({"initializer_range": float("nan")}, r"contains NaN or Infinity"),
])
def test_export_rejects_config_problems(tmp_path, ckpt, changes, pattern):
    edit_config(ckpt, **changes)
    with pytest.raises(ExportError, match=pattern):
        export_checkpoint(ckpt, tmp_path / "m.oelm")
    assert_nothing_written(tmp_path, "m.oelm")


def test_export_rejects_bad_config_json(tmp_path, ckpt):
    (ckpt / "config.json").write_text("{oops")
    with pytest.raises(ExportError, match=r"cannot read .*config\.json"):
        export_checkpoint(ckpt, tmp_path / "m.oelm")
    (ckpt / "config.json").unlink()
    with pytest.raises(ExportError, match=r"config\.json does not exist"):
        export_checkpoint(ckpt, tmp_path / "m.oelm")


def test_export_tokenizer_errors(tmp_path, tokenizer):
    d = make_ckpt(tmp_path / "c", None)
    with pytest.raises(ExportError, match=r"no tokenizer.*ship no tokenizer.*LLaMA-2.*--tokenizer"):
        export_checkpoint(d, tmp_path / "m.oelm")
    with pytest.raises(ExportError, match=r"does not exist or is not a file"):
        export_checkpoint(d, tmp_path / "m.oelm", tokenizer=tmp_path / "nope.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"definitely not a protobuf")
    with pytest.raises(ExportError, match=r"is not a SentencePiece model"):
        export_checkpoint(d, tmp_path / "m.oelm", tokenizer=junk)
    big = make_ckpt(tmp_path / "big", tokenizer, vocab_size=2048)
    with pytest.raises(ExportError, match=r"has 1024 pieces but config.json vocab_size is 2048"):
        export_checkpoint(big, tmp_path / "m.oelm")
    assert_nothing_written(tmp_path, "m.oelm")
    # an explicit --tokenizer wins over SRC/tokenizer.model
    shutil.copy(junk, d / "tokenizer.model")
    with pytest.raises(ExportError, match=r"is not a SentencePiece model"):
        export_checkpoint(d, tmp_path / "m.oelm")
    assert export_checkpoint(d, tmp_path / "m.oelm", tokenizer=tokenizer).is_file()


def test_export_sharded_index_errors(tmp_path, tokenizer):
    d = make_ckpt(tmp_path / "s", tokenizer, shards=2)
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    (d / "model-00002-of-00002.safetensors").rename(d / "moved.safetensors")
    with pytest.raises(ExportError, match=r"lists shard model-00002-of-00002\.safetensors.*does not exist"):
        export_checkpoint(d, tmp_path / "m.oelm")
    (d / "moved.safetensors").rename(d / "model-00002-of-00002.safetensors")
    name = next(k for k, v in index["weight_map"].items() if v.startswith("model-00001"))
    bad = dict(index, weight_map={**index["weight_map"], name: "model-00002-of-00002.safetensors"})
    index_path.write_text(json.dumps(bad))
    with pytest.raises(ExportError, match=rf"maps tensor {name} to model-00002"):
        export_checkpoint(d, tmp_path / "m.oelm")
    short = dict(index, weight_map={k: v for k, v in index["weight_map"].items() if k != name})
    index_path.write_text(json.dumps(short))
    with pytest.raises(ExportError, match=rf"contains tensor {name}, which .* does not assign"):
        export_checkpoint(d, tmp_path / "m.oelm")
    index_path.unlink()
    with pytest.raises(ExportError, match=r"neither model\.safetensors nor"):
        export_checkpoint(d, tmp_path / "m.oelm")


def test_export_output_path_errors(tmp_path, ckpt):
    (tmp_path / "dir.oelm").mkdir()
    with pytest.raises(ExportError, match=r"is a directory; give a file name"):
        export_checkpoint(ckpt, tmp_path / "dir.oelm")
    with pytest.raises(ExportError, match=r"output directory .* does not exist"):
        export_checkpoint(ckpt, tmp_path / "missing" / "m.oelm")
    with pytest.raises(ExportError, match=r"checkpoint directory .* does not exist"):
        export_checkpoint(tmp_path / "nowhere", tmp_path / "m.oelm")


def test_interrupted_export_leaves_nothing(tmp_path, ckpt, monkeypatch):
    out = tmp_path / "m.oelm"
    out.write_bytes(b"previous export")  # must survive an interrupted re-export untouched
    real = export_mod._write_tensor
    calls = []

    def interrupt_midway(f, entry, chunks, bar):
        calls.append(entry.name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(f, entry, chunks, bar)

    monkeypatch.setattr(export_mod, "_write_tensor", interrupt_midway)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(ckpt, out)
    assert len(calls) == 5
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []

    out.unlink()
    calls.clear()
    assert main([str(ckpt), "-o", str(out), "--no-progress"]) == 130
    assert not out.exists() and [p for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


# ----------------------------------------------------------------------------- CLI

def test_cli_success_and_errors(tmp_path, ckpt, capsys):
    out = tmp_path / "m.oelm"
    assert main([str(ckpt), "-o", str(out), "--dtype", "bf16", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "wrote" in err and "weights bf16" in err
    with read_oelm(out) as f:
        assert f.metadata["weights_dtype"] == "bf16"

    assert main([str(ckpt), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("openelm-rt-export: error: output ") and "is a directory" in err
    assert "Traceback" not in err

    edit_config(ckpt, num_query_heads=[4, 4, 8, 8])
    assert main([str(ckpt), "-o", str(tmp_path / "x.oelm")]) == 2
    assert "openelm-rt-export: error: config.json num_query_heads[1]" in capsys.readouterr().err

    assert main([str(ckpt)]) == 2  # usage error: -o missing
    assert "openelm-rt-export: error: the following arguments are required" in capsys.readouterr().err
    assert main([str(ckpt), "-o", "x.oelm", "--dtype", "q3"]) == 2  # not a choice
    capsys.readouterr()
    assert main(["--help"]) == 0
    assert "example:" in capsys.readouterr().out
