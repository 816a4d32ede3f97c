"""A Hugging Face OpenELM checkpoint directory as a model: exported once into a cache.

`resolve_model(DIR)` returns the path of an .oelm file made from the checkpoint as published
(config.json + safetensors, tokenizer.model beside it or given), exporting it on first use
into `~/.cache/openelm_rt` (or $OPENELM_RT_CACHE, or $XDG_CACHE_HOME/openelm_rt) under a
name keyed by the checkpoint's content, the tokenizer and the weight type; later calls load
the cached file. `Session(DIR)` and the lm-eval adapter go through it. A file path is
returned as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

_HASH_CHUNK = 8 << 20


def cache_dir() -> Path:
    d = os.environ.get("OPENELM_RT_CACHE")
    if d:
        return Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "openelm_rt"


def _log(msg: str) -> None:
    print(f"[openelm-rt] {msg}", file=sys.stderr, flush=True)


def _file_digest(path: Path, memo: dict) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so a large checkpoint is read once."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key in memo:
        return memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(block)
    memo[key] = h.hexdigest()
    return memo[key]


def _tokenizer_path(src: Path, tokenizer) -> Path:
    if tokenizer is not None:
        t = Path(os.fspath(tokenizer))
        if t.is_dir():
            t = t / "tokenizer.model"
        if t.is_file():
            return t
        if (src / "tokenizer.model").is_file() and not os.path.isabs(os.fspath(tokenizer)) \
                and "/" in os.fspath(tokenizer) and not t.exists():
            # A hub id such as the model card's meta-llama/Llama-2-7b-hf: the tokenizer.model
            # beside the checkpoint is that tokenizer's file (nothing is downloaded).
            return src / "tokenizer.model"
        raise FileNotFoundError(
            f"tokenizer {tokenizer}: no such tokenizer.model (nothing is downloaded); pass the path of "
            f"LLaMA-2's tokenizer.model or of a directory holding it, or put it beside config.json in {src}")
    t = src / "tokenizer.model"
    if not t.is_file():
        raise FileNotFoundError(
            f"{src} has no tokenizer.model. Apple's OpenELM repos ship none: OpenELM uses LLaMA-2's "
            f"SentencePiece tokenizer, so copy its tokenizer.model into {src} or pass tokenizer=PATH")
    return t


def resolve_model(path, dtype: str = "auto", tokenizer=None, cache=None, progress=None) -> str:
    """The .oelm file for `path`: the file itself, or the cached export of a checkpoint
    directory (made now if missing, with progress on stderr)."""
    from . import export  # NumPy and sentencepiece only

    path = Path(os.fspath(path))
    if not path.is_dir():
        return str(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is a directory without config.json; pass an .oelm file or a Hugging Face "
                                f"OpenELM checkpoint directory (config.json + model.safetensors)")
    if dtype != "auto" and dtype not in export.WEIGHT_DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {', '.join(export.WEIGHT_DTYPES)}, got {dtype!r}")
    tok = _tokenizer_path(path, tokenizer)
    cdir = Path(cache) if cache is not None else cache_dir()
    cdir.mkdir(parents=True, exist_ok=True)
    memo_path = cdir / "digests.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    files = sorted(p for p in path.iterdir()
                   if p.is_file() and (p.name == "config.json" or p.name.endswith(".safetensors")
                                       or p.name == "model.safetensors.index.json"))
    h = hashlib.sha256(f"oelm {export.FORMAT_VERSION}.{export.NAMES_VERSION} {dtype}\n".encode())
    for p in files:
        h.update(f"{p.name} {_file_digest(p, memo)}\n".encode())
    h.update(f"tokenizer {_file_digest(tok, memo)}\n".encode())
    try:
        tmp = memo_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_path)
    except OSError:
        pass
    out = cdir / f"{path.resolve().name}-{dtype}-{h.hexdigest()[:16]}.oelm"
    if out.is_file():
        return str(out)
    _log(f"exporting {path} ({dtype}) once into the cache: {out}")
    export.export_checkpoint(path, out, dtype=dtype, tokenizer=tok,
                             progress=sys.stderr.isatty() if progress is None else progress)
    return str(out)
