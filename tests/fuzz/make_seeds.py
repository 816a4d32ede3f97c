"""Seed corpora and the tokenizer for the libFuzzer targets (tests/fuzz/README.md), generated
rather than checked in: small .oelm exports by the package's own exporter, their metadata
JSON, SentencePiece models and text.

    python3 tests/fuzz/make_seeds.py DIR     # needs the openelm_rt package (pip install .)

Writes DIR/<target>/ for each target (model, json, spm, tokenizer, flash) and DIR/tokenizer.model
(the vocabulary fuzz_tokenizer loads from $OELM_FUZZ_TOKENIZER). Deterministic: the same
files on every run. Model seeds are kept small (tens of KB; libFuzzer mutates and re-reads the
whole input on every execution; alignment 64): token-id-only files of vocabulary 64-96 in every weight type
(f32, f16, bf16, q8, q4; tied and untied; 1 and 2 layers) and one 1024-piece file that holds
a tokenizer; a 3-layer f32 file (FFN widths 32, 64, 64: its smallest memory budget streams whole
FFN matrices, where 1 or 2 layers stream nothing); and two flash-layout files of that shape
(format_version 2, FORMAT.md "Flash layout"; f32 in bundles of 32 neurons, q8 in bundles of
64, so one bundle is partial), which need alignment 4096 (their bundles are read with direct
I/O): 160 and 120 KB.
DIR/flash/ holds fuzz_flash's seeds: those files' metadata, bare "flash_layout" values and permutation tensors,
valid and each broken in one way.
"""
from __future__ import annotations

import json
import struct
import sys
import tempfile
from pathlib import Path

from openelm_rt import checkpoint, export, hf_config
from openelm_rt.tokenizer_train import train_sentencepiece

HEADER = struct.Struct("<8sIIQQQQIIQ")  # FORMAT.md's fixed header

# (name, config overrides) of the token-id-only shapes.
SHAPES = [
    ("l1d32", dict(num_transformer_layers=1, model_dim=32, head_dim=8, vocab_size=64, max_context_length=32)),
    ("l2d32u", dict(num_transformer_layers=2, model_dim=32, head_dim=16, vocab_size=96, max_context_length=64,
                    share_input_output_layers=False)),
]
DTYPES = ("f32", "f16", "bf16", "q8", "q4")

# Text seeds for fuzz_tokenizer: scripts, spaces, byte fallback, invalid UTF-8, control pieces.
TEXTS = [
    b"Once upon a time, there was a tiny model.",
    b"  leading and  double  spaces \n\ttabs\n",
    "\u00dcn\u00efc\u00f6d\u00e9 \u2014 na\u00efve caf\u00e9, \u6771\u4eac \U0001f642".encode("utf-8"),
    b"\xff\xfe invalid \xc3( utf-8 \xe2\x82 truncated \xf0\x9f\x99",
    b"<s> </s> <unk> <0x41> \xe2\x96\x81piece",
    b"def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    b"",
]

# JSON seeds beyond the exports' metadata: each construct the parser handles.
JSON_TEXTS = [
    b'{"a": [1, -2.5e-3, 1e308, true, false, null, "s\\u00e9\\ud83d\\ude42\\n"], "b": {}}',
    b'[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]',
    b'{"n": 9223372036854775807, "m": -9223372036854775808, "o": 9223372036854775808}',
    b'"\\u0000 \\" \\\\ \\/ \\b \\f \\r \\t"',
]

# The flash-layout shape: 3 layers (so that the smallest memory budget streams a tail of
# bundles: with 1 or 2 layers the read buffers cost what streaming saves), FFN widths 32, 64, 64.
FLASH_SHAPE = dict(num_transformer_layers=3, model_dim=32, head_dim=8, vocab_size=64, max_context_length=32,
                   ffn_multipliers=[1.0, 2.0])
FLASH_EXPORTS = [("f32", 32), ("q8", 64)]  # (dtype, bundle_neurons)

# Bare "flash_layout" values for fuzz_flash: valid, then each of FORMAT.md's rules broken once;
# and permutation tensors (int32 little-endian: the input's bytes as blk.0.ffn_perm), valid and not.
FLASH_TEXTS = [
    b'{"version": 2, "bundle_neurons": 32, "calibration": {"source": "ids", "tokens": 64}}',
    b'{"version": 2, "bundle_neurons": 65536}',
    b'{"version": 1, "bundle_neurons": 32, "perm": [[0]]}',
    b'{"version": 3, "bundle_neurons": 32}',
    b'{"version": 0, "bundle_neurons": 32}',
    b'{"version": 2.0, "bundle_neurons": 48}',
    b'{"version": 2, "bundle_neurons": 65568}',
    b'{"version": 2}',
    b'[2, 32]',
]
FLASH_PERMS = [
    struct.pack("<4i", 2, 0, 3, 1),
    struct.pack("<4i", 2, 0, 2, 1),
    struct.pack("<3i", 0, 1, -1),
    struct.pack("<2i", 0, 7),
]


def metadata_of(path: Path) -> bytes:
    raw = path.read_bytes()
    h = HEADER.unpack_from(raw, 0)
    return raw[h[3]: h[3] + h[4]]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    out = Path(argv[0])
    # The smallest alignment FORMAT.md allows (the exporter's is the page size): the seeds are
    # a few KB instead of a page per tensor, and the reader's alignment rules get exercised.
    export.ALIGNMENT = 64
    dirs = {t: out / t for t in ("model", "json", "spm", "tokenizer", "flash")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = train_sentencepiece(out / "tokenizer.model", 1024)
        (dirs["spm"] / "bpe1024.model").write_bytes(tok.read_bytes())
        nofallback = train_sentencepiece(tmp / "nofallback.model", 1024, byte_fallback=False)
        (dirs["spm"] / "bpe1024_no_byte_fallback.model").write_bytes(nofallback.read_bytes())
        models = []
        for seed, (name, over) in enumerate(SHAPES):
            ckpt = checkpoint.write_random_checkpoint(tmp / f"ckpt_{name}", hf_config.make_config("tiny", **over),
                                                      seed=seed)
            for dt in DTYPES:
                models.append(export.export_checkpoint(ckpt, dirs["model"] / f"{name}_{dt}.oelm", dtype=dt,
                                                       with_tokenizer=False))
        ckpt = checkpoint.write_random_checkpoint(
            tmp / "ckpt_tok", hf_config.make_config("tiny", num_transformer_layers=1, model_dim=32, head_dim=8,
                                                    max_context_length=32), seed=7)
        models.append(export.export_checkpoint(ckpt, dirs["model"] / "tok_l1d32_q4.oelm", dtype="q4",
                                               embedding_dtype="q4", tokenizer=tok))
        for m in models:
            (dirs["json"] / (m.stem + ".json")).write_bytes(metadata_of(m))
        ckpt = checkpoint.write_random_checkpoint(tmp / "ckpt_flash", hf_config.make_config("tiny", **FLASH_SHAPE),
                                                  seed=11)
        m = export.export_checkpoint(ckpt, dirs["model"] / "l3d32_f32.oelm", dtype="f32", with_tokenizer=False)
        (dirs["json"] / (m.stem + ".json")).write_bytes(metadata_of(m))
        calibration = [(i * 37 + 5) % FLASH_SHAPE["vocab_size"] for i in range(128)]
        export.ALIGNMENT = 4096  # a flash file's bundles start on a page (FORMAT.md)
        for dt, bundle in FLASH_EXPORTS:
            m = export.export_checkpoint(ckpt, dirs["model"] / f"flash_l3d32_{dt}_b{bundle}.oelm", dtype=dt,
                                         with_tokenizer=False, flash_layout=True, bundle_neurons=bundle,
                                         flash_calibration_ids=calibration, progress=False)
            for d in ("json", "flash"):
                (dirs[d] / (m.stem + ".json")).write_bytes(metadata_of(m))
        export.ALIGNMENT = 64
    for i, t in enumerate(JSON_TEXTS):
        (dirs["json"] / f"syntax{i}.json").write_bytes(t)
    for i, t in enumerate(FLASH_TEXTS):
        (dirs["flash"] / f"layout{i}.json").write_bytes(t)
    for i, t in enumerate(FLASH_PERMS):
        (dirs["flash"] / f"perm{i}.bin").write_bytes(t)
    for i, t in enumerate(TEXTS):
        (dirs["tokenizer"] / f"text{i}.txt").write_bytes(t)
    for t, d in dirs.items():
        files = sorted(d.iterdir())
        print(f"{t}: {len(files)} seeds, {sum(f.stat().st_size for f in files) // 1024} KiB, "
              f"largest {max(f.stat().st_size for f in files)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
