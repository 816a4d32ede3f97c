"""Train a LLaMA-style SentencePiece tokenizer from text available offline.

Tests need a real SentencePiece model (the LLaMA-2 one cannot be downloaded), so this trains one
with the trainer settings of LLaMA's tokenizer.model (BPE, byte fallback, identity
normalization, digits split, unk/bos/eos = 0/1/2, no pad) on the corpus shipped in
data/corpus.txt or on Python's own standard library sources. It is not a replacement for the
LLaMA-2 vocabulary: pieces and ids differ, only the algorithm and special ids match.
"""

from __future__ import annotations

import io
import os
import sysconfig
from pathlib import Path

import sentencepiece as spm

from .hf_config import ExportError

CORPUS_PATH = Path(__file__).with_name("data") / "corpus.txt"

# Enough Python source for a 32000-piece BPE vocabulary (measured: ~4.7 MB trains in <1 s).
_STDLIB_BYTES = 5_000_000

# SentencePiece skips sentences longer than this (its max_sentence_length default, 4192 bytes).
_MAX_LINE_BYTES = 4192


def _corpus_lines() -> list[str]:
    return CORPUS_PATH.read_text(encoding="utf-8").splitlines()


def _py_files(root: Path):
    """.py files under root in a fixed order (sorted walk), skipping installed packages."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def _stdlib_lines(limit: int = _STDLIB_BYTES) -> list[str]:
    """Lines of the running Python's stdlib .py files, in a fixed walk order, up to `limit` bytes.

    Deterministic for a given Python installation (the text, hence the vocabulary, differs
    between Python versions); installed packages (site-packages) are not read.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    lines, total = [], 0
    for path in _py_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test files are deliberately not UTF-8
        for line in text.splitlines():
            n = len(line.encode("utf-8"))
            if n == 0 or n > _MAX_LINE_BYTES:
                continue
            lines.append(line)
            total += n + 1
            if total >= limit:
                return lines
    return lines


def train_sentencepiece(out_path, vocab_size: int, source: str = "corpus",
                        byte_fallback: bool = True, model_type: str = "bpe") -> Path:
    """Train a SentencePiece model with LLaMA's trainer settings and write it to out_path.

    source: "corpus" (data/corpus.txt, ~60 KB, many scripts and emoji: good up to a few
    thousand pieces) or "stdlib" (~5 MB of the Python standard library: enough for a
    LLaMA-sized 32000-piece vocabulary). The result is deterministic for the same inputs.
    Raises ExportError when vocab_size is too large for the source.
    """
    if source == "corpus":
        lines = _corpus_lines()
    elif source == "stdlib":
        lines = _stdlib_lines()
    else:
        raise ValueError(f"source must be 'corpus' or 'stdlib', got {source!r}")
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            # Special ids as in LLaMA-1/2's tokenizer.model (OPENELM.md section 4).
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            byte_fallback=byte_fallback,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            # Rarest 0.05% of characters get no piece of their own: they go through byte
            # fallback (or <unk> without it), a path tests should exercise.
            character_coverage=0.9995,
            max_sentencepiece_length=16,
            input_sentence_size=0,  # use every line: no random sampling, so output is stable
            shuffle_input_sentence=False,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:
        if "Vocabulary size" in str(e) or "vocab_size" in str(e):
            raise ExportError(
                f"cannot train {vocab_size} pieces from source={source!r} "
                f"({sum(len(x) for x in lines):,} characters): {str(e).rstrip('. ')}. Use a smaller vocab_size"
                + (" or source='stdlib' (enough text for 32000 pieces)." if source == "corpus"
                   else ".")) from e
        raise
    out = Path(out_path)
    out.write_bytes(model.getvalue())
    return out
