"""The .oelm reader against corrupt files made by editing a valid export per docs/FORMAT.md: each
case breaks one thing and must raise openelm_rt.FormatError naming it; a structured fuzz in a
subprocess (so a crash fails the test, not the run) allows only FormatError or success.
"""
from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import TESTS_DIR, env_with_pythonpath

HEADER = struct.Struct("<8sIIQQQQIIQ")    # FORMAT.md "Fixed header (64 bytes)"
FIELDS = ("magic", "format_version", "names_version", "metadata_offset", "metadata_size",
          "data_offset", "data_size", "alignment", "metadata_crc32", "file_size")
MAGIC = b"OELM-RT\x00"
assert HEADER.size == 64


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


class OelmImage:
    """A parsed .oelm file that can be edited and re-serialised with consistent sizes and
    metadata CRC, so that a test breaks exactly the one thing it means to break."""

    def __init__(self, raw: bytes):
        self.header = dict(zip(FIELDS, HEADER.unpack_from(raw, 0)))
        h = self.header
        meta = raw[h["metadata_offset"]: h["metadata_offset"] + h["metadata_size"]]
        self.meta = json.loads(meta.decode("utf-8"))
        self.data = bytearray(raw[h["data_offset"]: h["data_offset"] + h["data_size"]])

    @classmethod
    def load(cls, path) -> "OelmImage":
        return cls(Path(path).read_bytes())

    def tensor(self, name: str) -> dict:
        for t in self.meta["tensors"]:
            if t["name"] == name:
                return t
        raise KeyError(name)

    def tensor_bytes(self, name: str) -> bytearray:
        t = self.tensor(name)
        return self.data[t["offset"]: t["offset"] + t["size"]]

    def append_blob(self, blob: bytes) -> int:
        """Append bytes to the data section at the next aligned offset; returns that offset."""
        off = _align(len(self.data), self.header["alignment"])
        self.data += b"\x00" * (off - len(self.data)) + blob
        return off

    def to_bytes(self, meta_bytes: bytes | None = None, **header_overrides) -> bytes:
        h = dict(self.header)
        mb = meta_bytes if meta_bytes is not None else json.dumps(self.meta).encode("utf-8")
        h["metadata_offset"] = 64
        h["metadata_size"] = len(mb)
        h["metadata_crc32"] = zlib.crc32(mb) & 0xFFFFFFFF
        h["data_offset"] = max(h["data_offset"], _align(64 + len(mb), h["alignment"]))
        h["data_size"] = len(self.data)
        h["file_size"] = h["data_offset"] + h["data_size"]
        pad = b"\x00" * (h["data_offset"] - 64 - len(mb))
        # overrides change only what the header says, not where things are
        h.update(header_overrides)
        head = HEADER.pack(*(h[f] for f in FIELDS))
        return head + mb + pad + bytes(self.data)

    def write(self, path, **kw) -> Path:
        Path(path).write_bytes(self.to_bytes(**kw))
        return Path(path)


def _set_crc(t: dict, blob: bytes) -> None:
    t["crc32"] = zlib.crc32(blob) & 0xFFFFFFFF


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def valid(tiny_f32) -> bytes:
    return tiny_f32.oelm.read_bytes()


def _expect_format_error(ort, path, *patterns, verify=False):
    with pytest.raises(ort.FormatError) as e:
        ort.Session(str(path), verify=verify)
    msg = str(e.value)
    for p in patterns:
        assert re.search(p, msg, re.IGNORECASE), f"message {msg!r} does not match /{p}/"
    return msg


# ----------------------------------------------------------------------------- the helper

def test_rewrite_without_changes_is_valid(ort, valid, tmp_path, tiny_f32):
    img = OelmImage(valid)
    assert img.header["magic"] == MAGIC
    assert (img.header["format_version"], img.header["names_version"]) == (1, 1)
    assert img.header["alignment"] >= 64 and img.header["data_offset"] % img.header["alignment"] == 0
    assert img.header["file_size"] == len(valid)
    assert img.to_bytes(meta_bytes=valid[64:64 + img.header["metadata_size"]]) == valid
    # re-serialised JSON (other spacing/order) with the same content must load
    p = img.write(tmp_path / "same.oelm")
    with ort.Session(str(p), verify=True) as s, ort.Session(str(tiny_f32.oelm)) as s0:
        np.testing.assert_array_equal(s.logits([1, 7, 9]), s0.logits([1, 7, 9]))
    # so must a file where the metadata grew past the first data page
    img.meta["padding_for_test"] = "x" * (2 * img.header["alignment"])
    p = img.write(tmp_path / "bigger.oelm")
    with ort.Session(str(p), verify=True) as s:
        assert s.vocab_size == 1024


def test_ignorable_metadata(ort, valid, tmp_path):
    """Unknown optional keys are ignored; `source` is provenance only."""
    img = OelmImage(valid)
    img.meta["some_future_key"] = {"a": [1, 2, 3]}
    img.meta["model"]["some_future_model_key"] = 7
    del img.meta["source"]
    with ort.Session(str(img.write(tmp_path / "extra.oelm"))) as s:
        assert s.vocab_size == 1024


# ----------------------------------------------------------------------------- header

def test_bad_magic(ort, valid, tmp_path):
    p = tmp_path / "m.oelm"
    p.write_bytes(b"GGUF\x00\x00\x00\x00" + valid[8:])
    _expect_format_error(ort, p, "magic|not an? .?oelm")


def test_format_version_newer(ort, valid, tmp_path):
    p = OelmImage(valid).write(tmp_path / "fv.oelm", format_version=3)
    msg = _expect_format_error(ort, p, "format.?version|version", r"\b3\b", r"\b2\b")
    assert re.search("upgrade|re-?export|newer", msg, re.I), msg


def test_names_version_newer(ort, valid, tmp_path):
    p = OelmImage(valid).write(tmp_path / "nv.oelm", names_version=7)
    _expect_format_error(ort, p, "names.?version", r"\b7\b", r"\b1\b")


def test_version_zero_rejected(ort, valid, tmp_path):
    p = OelmImage(valid).write(tmp_path / "v0.oelm", format_version=0)
    _expect_format_error(ort, p, "version")


@pytest.mark.parametrize("cut", ["data", "metadata", "header", "empty"])
def test_truncated(ort, valid, tmp_path, cut):
    img = OelmImage(valid)
    n = {"data": len(valid) - 5000, "metadata": 64 + img.header["metadata_size"] // 2,
         "header": 40, "empty": 0}[cut]
    p = tmp_path / f"t_{cut}.oelm"
    p.write_bytes(valid[:n])
    _expect_format_error(ort, p, "trunc|size|short|end of file|smaller|expected|bytes")


def test_trailing_bytes(ort, valid, tmp_path):
    p = tmp_path / "trail.oelm"
    p.write_bytes(valid + b"\x00" * 100)
    _expect_format_error(ort, p, "size|trailing|expected|bytes")


@pytest.mark.parametrize("size", [2 ** 40, 2 ** 64 - 1])
def test_metadata_size_out_of_range(ort, valid, tmp_path, size):
    img = OelmImage(valid)
    raw = bytearray(img.to_bytes())
    struct.pack_into("<Q", raw, 24, size)
    p = tmp_path / "ms.oelm"
    p.write_bytes(bytes(raw))
    _expect_format_error(ort, p, "metadata")


def test_metadata_overlaps_data(ort, valid, tmp_path):
    img = OelmImage(valid)
    raw = bytearray(img.to_bytes())
    h = img.header
    struct.pack_into("<Q", raw, 24, h["data_offset"] - 64 + 16)     # past data_offset
    p = tmp_path / "mo.oelm"
    p.write_bytes(bytes(raw))
    _expect_format_error(ort, p, "metadata|data_offset")


@pytest.mark.parametrize("field,value", [("metadata_offset", 128), ("data_offset", 64 + 4096 + 8),
                                         ("alignment", 3000), ("alignment", 32),
                                         ("data_size", 12345), ("file_size", 1)])
def test_inconsistent_header_fields(ort, valid, tmp_path, field, value):
    p = OelmImage(valid).write(tmp_path / f"h_{field}.oelm", **{field: value})
    _expect_format_error(ort, p, field.split("_")[0] + "|align|size|offset")


def test_metadata_not_json(ort, valid, tmp_path):
    img = OelmImage(valid)
    p = img.write(tmp_path / "nj.oelm", meta_bytes=b'{"format": "openelm_rt", "model": {')
    _expect_format_error(ort, p, "json|metadata|parse")


def test_metadata_not_utf8_object(ort, valid, tmp_path):
    img = OelmImage(valid)
    p = img.write(tmp_path / "arr.oelm", meta_bytes=b"[1, 2, 3]")
    _expect_format_error(ort, p, "metadata|object|json")


def test_metadata_crc_mismatch(ort, valid, tmp_path):
    img = OelmImage(valid)
    crc = zlib.crc32(json.dumps(img.meta).encode()) ^ 0x1
    p = img.write(tmp_path / "crc.oelm", metadata_crc32=crc)
    _expect_format_error(ort, p, "crc|checksum")


# ----------------------------------------------------------------------------- tensor table

def test_tensor_offset_out_of_range(ort, valid, tmp_path):
    img = OelmImage(valid)
    t = img.tensor("blk.2.attn_output")
    t["offset"] = _align(len(img.data), img.header["alignment"]) + img.header["alignment"]
    p = img.write(tmp_path / "oor.oelm")
    _expect_format_error(ort, p, r"blk\.2\.attn_output", "offset|range|outside|beyond|exceed|past|end")


def test_tensor_offset_overflow(ort, valid, tmp_path):
    img = OelmImage(valid)
    t = img.tensor("blk.2.attn_output")
    t["offset"] = 2 ** 64 - img.header["alignment"]     # offset + size wraps around 2^64
    p = img.write(tmp_path / "wrap.oelm")
    _expect_format_error(ort, p, r"blk\.2\.attn_output")


def test_tensor_offset_misaligned(ort, valid, tmp_path):
    img = OelmImage(valid)
    img.tensor("blk.0.attn_norm")["offset"] += 4
    p = img.write(tmp_path / "mis.oelm")
    _expect_format_error(ort, p, r"blk\.0\.attn_norm", "align")


def test_overlapping_tensors(ort, valid, tmp_path):
    img = OelmImage(valid)
    emb = img.tensor("token_embd")
    qkv = img.tensor("blk.0.attn_qkv")
    assert qkv["size"] < emb["size"]
    qkv["offset"] = emb["offset"]
    _set_crc(qkv, bytes(img.data[emb["offset"]: emb["offset"] + qkv["size"]]))
    p = img.write(tmp_path / "ovl.oelm")
    _expect_format_error(ort, p, "overlap")


def test_wrong_shape_only(ort, valid, tmp_path):
    img = OelmImage(valid)
    t = img.tensor("blk.1.attn_qkv")
    rows, cols = t["shape"]
    t["shape"] = [rows // 2, cols * 2]      # same element count: size and crc stay right
    p = img.write(tmp_path / "shape.oelm")
    _expect_format_error(ort, p, r"blk\.1\.attn_qkv", "shape")


def test_size_not_matching_shape(ort, valid, tmp_path):
    img = OelmImage(valid)
    img.tensor("blk.1.ffn_down")["size"] -= 4
    p = img.write(tmp_path / "size.oelm")
    _expect_format_error(ort, p, r"blk\.1\.ffn_down", "size")


def test_missing_tensor(ort, valid, tmp_path):
    img = OelmImage(valid)
    img.meta["tensors"] = [t for t in img.meta["tensors"] if t["name"] != "blk.2.ffn_down"]
    p = img.write(tmp_path / "missing.oelm")
    _expect_format_error(ort, p, r"blk\.2\.ffn_down", "missing|not found|absent|required")


def test_missing_output_when_untied(ort, tiny_untied, tmp_path):
    img = OelmImage.load(tiny_untied.oelm)
    img.meta["tensors"] = [t for t in img.meta["tensors"] if t["name"] != "output"]
    p = img.write(tmp_path / "no_output.oelm")
    _expect_format_error(ort, p, r"\boutput\b", "missing|not found|absent|required")


def test_output_tensor_when_tied(ort, valid, tmp_path):
    """An `output` tensor in a tied file is an unknown extra (FORMAT.md: present only when
    tied_embeddings is false)."""
    img = OelmImage(valid)
    emb = img.tensor("token_embd")
    blob = bytes(img.tensor_bytes("token_embd"))
    t = dict(emb, name="output", offset=img.append_blob(blob))
    img.meta["tensors"].append(t)
    p = img.write(tmp_path / "tied_output.oelm")
    _expect_format_error(ort, p, r"\boutput\b")


def test_unknown_extra_tensor(ort, valid, tmp_path):
    img = OelmImage(valid)
    blob = np.arange(16, dtype=np.float32).tobytes()
    t = {"name": "blk.0.attn_bias", "dtype": "f32", "shape": [16],
         "offset": img.append_blob(blob), "size": len(blob)}
    _set_crc(t, blob)
    img.meta["tensors"].append(t)
    p = img.write(tmp_path / "extra.oelm")
    _expect_format_error(ort, p, r"blk\.0\.attn_bias", "unknown|unexpected|extra|not expected")


def test_duplicate_tensor(ort, valid, tmp_path):
    img = OelmImage(valid)
    src = img.tensor("blk.3.attn_norm")
    blob = bytes(img.tensor_bytes("blk.3.attn_norm"))
    img.meta["tensors"].append(dict(src, offset=img.append_blob(blob)))
    p = img.write(tmp_path / "dup.oelm")
    _expect_format_error(ort, p, r"blk\.3\.attn_norm", "duplicate|twice|more than once|again")


def test_n_head_kv_not_dividing(ort, valid, tmp_path):
    """Layer 0 has 4 q heads and 1 kv head. Declare 3 kv heads and give attn_qkv the shape
    that would follow ((4 + 2*3) * hd rows), so only the divisibility is wrong."""
    img = OelmImage(valid)
    m = img.meta["model"]
    assert m["n_head_q"][0] == 4 and m["n_head_kv"][0] == 1
    m["n_head_kv"][0] = 3
    hd, D = m["head_dim"], m["d_model"]
    t = img.tensor("blk.0.attn_qkv")
    elt = t["size"] // (t["shape"][0] * t["shape"][1])
    blob = bytes(np.random.default_rng(0).integers(0, 50, size=(4 + 6) * hd * D * elt,
                                                    dtype=np.uint8))
    t.update(shape=[(4 + 6) * hd, D], size=len(blob), offset=img.append_blob(blob))
    _set_crc(t, blob)
    p = img.write(tmp_path / "gqa.oelm")
    _expect_format_error(ort, p, "n_head_kv|kv head", r"\b3\b")


def test_n_head_kv_zero(ort, valid, tmp_path):
    img = OelmImage(valid)
    img.meta["model"]["n_head_kv"][2] = 0
    p = img.write(tmp_path / "kv0.oelm")
    _expect_format_error(ort, p, "n_head_kv|kv head")


def test_per_layer_list_wrong_length(ort, valid, tmp_path):
    img = OelmImage(valid)
    img.meta["model"]["ffn_dim"] = img.meta["model"]["ffn_dim"][:-1]
    p = img.write(tmp_path / "ffnlen.oelm")
    _expect_format_error(ort, p, "ffn_dim")


def test_missing_model_key(ort, valid, tmp_path):
    img = OelmImage(valid)
    del img.meta["model"]["head_dim"]
    p = img.write(tmp_path / "nohd.oelm")
    _expect_format_error(ort, p, "head_dim")


def test_unknown_dtype(ort, valid, tmp_path):
    img = OelmImage(valid)
    img.tensor("token_embd")["dtype"] = "q9_9"
    p = img.write(tmp_path / "dtype.oelm")
    _expect_format_error(ort, p, "q9_9", "dtype|type")


def test_norm_not_f32(ort, valid, tmp_path):
    img = OelmImage(valid)
    t = img.tensor("output_norm")
    t["dtype"] = "u8"
    t["shape"] = [t["size"]]
    p = img.write(tmp_path / "normdtype.oelm")
    _expect_format_error(ort, p, r"output_norm")


def test_weights_dtype_unknown(ort, valid, tmp_path):
    img = OelmImage(valid)
    img.meta["weights_dtype"] = "int3"
    p = img.write(tmp_path / "wdt.oelm")
    _expect_format_error(ort, p, "int3")


def test_garbage_tokenizer_blob(ort, valid, tmp_path):
    img = OelmImage(valid)
    t = img.tensor("tokenizer.model")
    blob = bytes(np.random.default_rng(1).integers(0, 256, size=t["size"], dtype=np.uint8))
    img.data[t["offset"]: t["offset"] + t["size"]] = blob
    _set_crc(t, blob)
    p = img.write(tmp_path / "tok.oelm")
    _expect_format_error(ort, p, "tokenizer")


# ----------------------------------------------------------------------------- verify

def test_verify_catches_flipped_data_byte(ort, valid, tmp_path, tiny_f32):
    img = OelmImage(valid)
    t = img.tensor("blk.3.ffn_down")
    img.data[t["offset"] + t["size"] // 8 * 4 + 3] ^= 0x80     # sign bit of one f32 weight
    p = img.write(tmp_path / "flip.oelm")
    _expect_format_error(ort, p, "crc|checksum", r"blk\.3\.ffn_down", verify=True)
    with ort.Session(str(p), verify=False) as s, ort.Session(str(tiny_f32.oelm)) as s0:
        a, b = s.logits([1, 5, 9]), s0.logits([1, 5, 9])
        assert not np.array_equal(a, b), "the flipped byte should change the weights"


def test_verify_passes_on_valid_file(ort, tiny_models, tiny_f32_export):
    for path in [m.oelm for m in tiny_models.values()] + list(tiny_f32_export.values()):
        with ort.Session(str(path), verify=True) as s:
            assert s.vocab_size == 1024


def test_exporter_header_and_table(valid):
    """What the exporter wrote follows FORMAT.md (offsets aligned, no overlap, crcs right,
    tensor order as in the table)."""
    img = OelmImage(valid)
    h = img.header
    assert h["metadata_crc32"] == zlib.crc32(valid[64:64 + h["metadata_size"]])
    spans = []
    for t in img.meta["tensors"]:
        assert t["offset"] % h["alignment"] == 0, t["name"]
        assert t["offset"] + t["size"] <= h["data_size"], t["name"]
        assert zlib.crc32(bytes(img.tensor_bytes(t["name"]))) == t["crc32"], t["name"]
        spans.append((t["offset"], t["offset"] + t["size"]))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    names = [t["name"] for t in img.meta["tensors"] if t["name"] != "tokenizer.model"]
    L = img.meta["model"]["n_layer"]
    expected = ["token_embd"] + [f"blk.{i}.{n}" for i in range(L) for n in (
        "attn_norm", "attn_qkv", "attn_q_norm", "attn_k_norm", "attn_output", "ffn_norm",
        "ffn_gate_up", "ffn_down")] + ["output_norm"]
    assert names == expected


# ----------------------------------------------------------------------------- fuzz

_FUZZ_SCRIPT = textwrap.dedent("""
    import json, random, sys, zlib
    sys.path.insert(0, sys.argv[3])
    import openelm_rt
    from test_loader import OelmImage
    raw = open(sys.argv[1], "rb").read()
    out_path = sys.argv[2]
    rng = random.Random(int(sys.argv[4]))
    VALUES = [-1, 0, 1, 3, 7, 2**31, 2**32 + 1, 2**63, 2**64 - 1, 2**64 + 5, 10**30, 1.5,
              -0.5, 1e308, "x", "f32", "", None, True, [], {}, [1, 2], [0] * 4]
    def paths(obj, prefix=()):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k == "source":
                    continue
                yield prefix + (k,)
                yield from paths(v, prefix + (k,))
        elif isinstance(obj, list):
            for i, v in enumerate(obj[:64]):
                yield prefix + (i,)
                yield from paths(v, prefix + (i,))
    bad = []
    n_ok = n_err = 0
    for it in range(int(sys.argv[5])):
        img = OelmImage(raw)
        kind = rng.random()
        if kind < 0.7:
            ps = list(paths(img.meta))
            p = rng.choice(ps)
            node = img.meta
            for k in p[:-1]:
                node = node[k]
            if rng.random() < 0.15 and isinstance(node, dict):
                del node[p[-1]]
            else:
                node[p[-1]] = rng.choice(VALUES)
            data = img.to_bytes()
            what = "meta %r" % (p,)
        elif kind < 0.85:
            field = rng.choice(["format_version", "names_version", "metadata_offset",
                                "metadata_size", "data_offset", "data_size", "alignment",
                                "file_size"])
            bits = 32 if field in ("format_version", "names_version", "alignment") else 64
            val = rng.choice([0, 1, 63, 64, 4096, 2**(bits - 1), 2**bits - 1,
                              rng.randrange(2**bits)])
            data = img.to_bytes(**{field: val})
            what = "header %s=%d" % (field, val)
        else:
            data = bytearray(img.to_bytes())
            hi = img.header["data_offset"]
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(64, hi)] = rng.randrange(256)
            mb = bytes(data[64:64 + img.header["metadata_size"]])
            data[52:56] = (zlib.crc32(mb) & 0xFFFFFFFF).to_bytes(4, "little")
            data = bytes(data)
            what = "metadata bytes"
        open(out_path, "wb").write(data)
        print(it, what, flush=True)
        try:
            with openelm_rt.Session(out_path) as s:
                s.logits([1, 2, 3])
            n_ok += 1
        except openelm_rt.FormatError:
            n_err += 1
        except Exception as e:
            bad.append("%s -> %s: %s" % (what, type(e).__name__, str(e)[:200]))
    print(json.dumps({"ok": n_ok, "format_error": n_err, "bad": bad}))
""")


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzz_metadata_and_header(ort, valid, tmp_path, seed):
    src = tmp_path / "valid.oelm"
    src.write_bytes(valid)
    script = tmp_path / "fuzz.py"
    script.write_text(_FUZZ_SCRIPT)
    n = 250
    p = subprocess.run([sys.executable, str(script), str(src), str(tmp_path / "fuzzed.oelm"),
                        str(TESTS_DIR), str(seed), str(n)], capture_output=True, text=True,
                       env=env_with_pythonpath(), timeout=300)
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 0, (f"fuzz process died with rc {p.returncode} on case "
                               f"{lines[-1] if lines else '?'}; stderr: {p.stderr[-2000:]}")
    summary = json.loads(lines[-1])
    assert not summary["bad"], (f"{len(summary['bad'])} mutations raised something other "
                                f"than FormatError: {summary['bad'][:10]}")
    assert summary["format_error"] > n // 3     # most mutations must be caught
