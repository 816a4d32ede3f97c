"""Random-weight OpenELM models for the demo and the benchmarks.

Builds (once, cached) a Hugging Face-format OpenELM checkpoint with random weights in
a real shape, a tokenizer that needs no download, and the exported .oelm file. The
text such a model writes is meaningless; its speed and numerics are real.
"""

from __future__ import annotations

import os
import sys
import time
import zlib
from dataclasses import dataclass

from . import checkpoint, export, hf_config, tokenizer_train


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "openelm_rt")


@dataclass
class RandomModel:
    path: str  # the .oelm file
    checkpoint_dir: str  # the HF-format checkpoint it was exported from
    tokenizer_path: str
    tokenizer_desc: str


def _log(msg):
    print(f"[openelm-rt] {msg}", file=sys.stderr, flush=True)


def ensure_random_model(preset: str = "270M", dtype: str = "f32", cache_dir: str | None = None,
                        tokenizer: str | None = None, log=_log,
                        logit_scale: float = 1.0) -> RandomModel:
    """Returns a cached random OpenELM model of `preset` shape, building what is missing.

    tokenizer: a tokenizer.model to use (e.g. LLaMA-2's); by default one with the
    model's vocabulary size is trained locally (Python's standard library sources give
    enough text for 32000 pieces; the shipped corpus serves small test vocabularies).
    logit_scale: see checkpoint.write_random_checkpoint; a value other than 1 gets its own
    checkpoint and .oelm files in the cache.
    """
    cache = os.path.abspath(cache_dir or default_cache_dir())
    os.makedirs(cache, exist_ok=True)
    cfg = hf_config.make_config(preset)
    vocab = cfg["vocab_size"]
    if tokenizer:
        tok_path, tok_desc = os.path.abspath(tokenizer), tokenizer
    else:
        source = "stdlib" if vocab > 4000 else "corpus"
        tok_path = os.path.join(cache, f"tokenizer-{source}-{vocab}.model")
        tok_desc = f"SentencePiece BPE, {vocab} pieces, trained locally on {source} text"
        if not os.path.exists(tok_path):
            log(f"training a tokenizer ({tok_desc}) ...")
            tokenizer_train.train_sentencepiece(tok_path, vocab, source=source)
    with open(tok_path, "rb") as f:  # the .oelm embeds the tokenizer: key the cache on its bytes
        tok_crc = zlib.crc32(f.read())
    name = preset if logit_scale == 1.0 else f"{preset}-ls{logit_scale:g}"
    # q8/q4 files are named by their layout's dtype id, so a layout change re-exports them.
    tag = f"{name}-{export.FILE_DTYPE.get(dtype, dtype)}-tok{tok_crc:08x}"
    ckpt = os.path.join(cache, f"random-openelm-{name}")
    model_path = os.path.join(cache, f"random-openelm-{tag}.oelm")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        log(f"writing a Hugging Face-format OpenELM-{preset} checkpoint with random weights to {ckpt} ...")
        t0 = time.time()
        checkpoint.write_random_checkpoint(ckpt, cfg, dtype="f32", seed=0, progress=sys.stderr.isatty(),
                                           logit_scale=logit_scale)
        log(f"  done in {time.time() - t0:.1f} s")
    if not os.path.exists(model_path):
        log(f"exporting it to {model_path} ...")
        export.export_checkpoint(ckpt, model_path, dtype=dtype, tokenizer=tok_path,
                                 progress=sys.stderr.isatty())
    return RandomModel(model_path, ckpt, tok_path, tok_desc)
