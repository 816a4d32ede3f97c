"""openelm-rt-export: convert a Hugging Face OpenELM checkpoint into one .oelm file.

Reads config.json, model.safetensors (or shards + model.safetensors.index.json) and a SentencePiece
tokenizer.model, validates all of it, and writes the file exactly as docs/FORMAT.md specifies,
one tensor at a time (a 3B checkpoint never sits in memory twice), converting or block-quantizing
(quant.py) the matrices to the chosen weight type. Also holds read_oelm(), a
minimal reader for tests and debugging; the validating reader is the C++ one (csrc/format).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import math
import os
import shutil
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from . import flash, quant
from . import imatrix as imatrix_mod
from .checkpoint import CLASSIFIER, HFCheckpoint, ProgressBar
from .hf_config import ExportError, ModelSpec, parse_config, tensor_layout
from .safetensors_io import bf16_to_f32, f32_to_bf16

PROG = "openelm-rt-export"
log = logging.getLogger("openelm_rt.export")

# --- docs/FORMAT.md constants -------------------------------------------------------------------
MAGIC = b"OELM-RT\0"
FORMAT_VERSION = 1
FLASH_FORMAT_VERSION = 2  # files in the flash layout (FORMAT.md); every other file stays 1
NAMES_VERSION = 1
HEADER_SIZE = 64
ALIGNMENT = 4096  # the page size: tensors can be mapped and read with large aligned reads
# magic, format_version, names_version, metadata_offset, metadata_size, data_offset, data_size,
# alignment, metadata_crc32, file_size
_HEADER = struct.Struct("<8sIIQQQQIIQ")
assert _HEADER.size == HEADER_SIZE
_NUMPY = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "bf16": np.dtype("<u2"),
          "u8": np.dtype("u1"), "i32": np.dtype("<i4")}
_FROM_SAFETENSORS = {"F32": "f32", "BF16": "bf16", "F16": "f16"}
# --dtype names; the file records the q types by their dtype ids (quant.Q8, quant.Q4).
WEIGHT_DTYPES = ("f32", "f16", "bf16", "q8", "q6", "q5", "q4", "q4k")
FILE_DTYPE = {"f32": "f32", "f16": "f16", "bf16": "bf16", "q8": quant.Q8, "q6": quant.Q6, "q5": quant.Q5,
              "q4": quant.Q4, "q4k": quant.Q4K}
TOKENIZER_TENSOR = "tokenizer.model"

_CHUNK_BYTES = 16 << 20  # conversion granularity: bounds temporaries and keeps the bar moving


def _writer_version() -> str:
    pkg = sys.modules.get(__package__ or "openelm_rt")
    version = getattr(pkg, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version
        return dist_version("openelm_rt")
    except (ImportError, PackageNotFoundError):
        return "0.1.0"


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


# ----------------------------------------------------------------------------- checkpoint input

def _load_tokenizer(src: Path, tokenizer, spec: ModelSpec) -> bytes:
    if tokenizer is None:
        path = src / "tokenizer.model"
        if not path.is_file():
            raise ExportError(
                f"no tokenizer: {src} has no tokenizer.model and --tokenizer was not given. "
                f"Apple's OpenELM repos ship no tokenizer; OpenELM uses the LLaMA-2 SentencePiece "
                f"model, so pass its tokenizer.model (from meta-llama/Llama-2-7b-hf, or an "
                f"ungated copy) with --tokenizer PATH (or --no-tokenizer for a file of "
                f"token ids only).")
    else:
        path = Path(tokenizer)
        if not path.is_file():
            raise ExportError(f"tokenizer {path} does not exist or is not a file; pass the path "
                              f"of a SentencePiece tokenizer.model")
    data = path.read_bytes()
    try:
        if not data:
            raise RuntimeError("the file is empty")
        sp = spm.SentencePieceProcessor(model_proto=data)
    except RuntimeError as e:
        raise ExportError(f"tokenizer {path} is not a SentencePiece model ({e}); pass the "
                          f"LLaMA-2 tokenizer.model, not tokenizer.json or a vocab file") from e
    if sp.vocab_size() != spec.vocab_size:
        raise ExportError(f"tokenizer {path} has {sp.vocab_size()} pieces but config.json "
                          f"vocab_size is {spec.vocab_size}; OpenELM needs the 32000-piece LLaMA-2 "
                          f"tokenizer (or one trained with exactly vocab_size pieces)")
    for what, got, want in (("bos", sp.bos_id(), spec.bos_token_id),
                            ("eos", sp.eos_id(), spec.eos_token_id)):
        if got != want:
            raise ExportError(f"tokenizer {path} has {what} id {got} but config.json "
                              f"{what}_token_id is {want}; use the tokenizer the model was "
                              f"trained with (LLaMA-2: bos 1, eos 2)")
    return data


# ----------------------------------------------------------------------------- planning

@dataclass
class _Entry:
    name: str                  # .oelm tensor name
    dtype: str                 # .oelm dtype id
    shape: tuple[int, ...]
    offset: int = 0            # relative to data_offset
    crc32: int = 0
    hf_name: str | None = None  # source tensor (None: the tokenizer blob)
    importance: np.ndarray | None = None  # imatrix.py's statistics of a quantized matrix's input

    @property
    def size(self) -> int:
        return quant.tensor_nbytes(self.dtype, self.shape)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "offset": self.offset, "size": self.size, "crc32": self.crc32}


def _check_tensors(ckpt: HFCheckpoint, spec: ModelSpec, cfg: dict) -> list:
    """Every expected tensor present, nothing unexplained extra, shapes and dtypes right."""
    layout = tensor_layout(spec)
    expected = {t.hf_name for t in layout}
    missing = [t.hf_name for t in layout if t.hf_name not in ckpt.where]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ExportError(f"checkpoint is missing {len(missing)} tensor(s) that config.json "
                          f"requires: {shown}. The download is incomplete or config.json belongs "
                          f"to another model.")
    extra = []
    for name in sorted(set(ckpt.where) - expected):
        if name == CLASSIFIER and not cfg["share_input_output_layers"]:
            log.info("skipping %s: HF builds it for untied models but never uses it", name)
        elif name == "lm_head.weight" and spec.tied_embeddings:
            log.info("skipping lm_head.weight: config.json leaves tie_word_embeddings at true, "
                     "so Hugging Face ties lm_head to the token embeddings and ignores it")
        else:
            extra.append(name)
    if extra:
        shown = ", ".join(extra[:8]) + (f" and {len(extra) - 8} more" if len(extra) > 8 else "")
        raise ExportError(f"checkpoint has {len(extra)} tensor(s) an OpenELM model with this "
                          f"config.json does not have: {shown}. It is not a plain OpenELM "
                          f"checkpoint (or config.json belongs to another model); nothing is "
                          f"ignored silently.")
    for t in layout:
        st = ckpt.where[t.hf_name]
        if st.shape(t.hf_name) != t.shape:
            raise ExportError(f"tensor {t.hf_name} has shape {list(st.shape(t.hf_name))}, "
                              f"expected {list(t.shape)} from config.json (layer dims derived "
                              f"from model_dim, head_dim, qkv/ffn multipliers); the weights and "
                              f"config.json do not belong together")
        if st.dtype(t.hf_name) not in _FROM_SAFETENSORS:
            raise ExportError(f"tensor {t.hf_name} is stored as {st.dtype(t.hf_name)}; only F32, "
                              f"BF16 and F16 checkpoints can be exported")
    return layout


def _choose_dtype(requested: str, ckpt: HFCheckpoint, layout) -> str:
    if requested != "auto":
        if requested not in WEIGHT_DTYPES:
            raise ExportError(f"dtype {requested!r} is not one of auto, {', '.join(WEIGHT_DTYPES)}")
        return FILE_DTYPE[requested]
    # Norm weights are stored f32 whatever is chosen, so only the matrices decide.
    found = {ckpt.where[t.hf_name].dtype(t.hf_name) for t in layout if not t.is_norm}
    if len(found) == 1:
        return _FROM_SAFETENSORS[found.pop()]
    log.info("checkpoint matrices mix dtypes %s; --dtype auto writes f32, which holds each of "
             "them exactly (pass --dtype to choose another)", ", ".join(sorted(found)))
    return "f32"


def _choose_embedding_dtype(requested: str | None, weights: str) -> str:
    """The dtype of the vocabulary matrices (token_embd, and output when untied).

    Default: the weights' dtype, except q8 for q4 weights and q6 for q4k weights. With a tied
    head this matrix is the LM head, whose rounding error goes straight into every logit
    (llama.cpp likewise keeps its output matrix, or a tied embedding, at Q6_K in its Q4_0 and
    Q4_K_M models); q8 costs 4 more bits on 2-12% of the weights, q6 2 more.
    """
    if requested is None:
        return quant.Q8 if weights == quant.Q4 else quant.Q6 if weights == quant.Q4K else weights
    if requested not in WEIGHT_DTYPES:
        raise ExportError(f"embedding dtype {requested!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    return FILE_DTYPE[requested]


def _importance_stats(src: Path, tok, entries, imatrix, calibration, ctx, imatrix_out, n_tokens, show):
    """The importance statistics for export_checkpoint (its docstring), attached to the quantized
    entries; None without calibration or imatrix."""
    if imatrix is not None and calibration is not None:
        raise ExportError("give calibration (text or token ids) or imatrix (statistics), not both")
    if imatrix is None and calibration is None:
        if imatrix_out is not None:
            raise ExportError("imatrix_out (--imatrix-out) needs calibration input "
                              "(--calibration-text or --calibration-ids)")
        return None
    quantized = [e for e in entries if e.dtype in quant.QUANT_DTYPES]
    if not quantized:
        raise ExportError("importance-weighted quantization applies to block-quantized (q8, q6, q5, "
                          "q4, q4k) matrices only; choose one of them as --dtype (or --embedding-dtype), "
                          "or drop the "
                          "calibration options")
    if calibration is not None:
        if isinstance(calibration, str):
            if tok is None:
                raise ExportError("calibration text needs the file's SentencePiece tokenizer; this "
                                  "export has none (--no-tokenizer): give token ids instead "
                                  "(--calibration-ids)")
            sp = spm.SentencePieceProcessor(model_proto=tok)
            ids, bos = sp.encode(calibration), True
        else:
            ids, bos = [int(t) for t in calibration], False
        ids = ids[:n_tokens] if n_tokens is not None else ids

        def note(msg: str) -> None:
            if show:
                print(f"\r{msg}", end="", file=sys.stderr, flush=True)

        t0 = time.monotonic()
        imatrix = imatrix_mod.compute_imatrix(src, ids, ctx, add_bos=bos, progress=note)
        if show:
            print(file=sys.stderr)
        log.info("importance statistics from %d calibration tokens in %.1f s",
                 int(imatrix[imatrix_mod.TOKENS_KEY]), time.monotonic() - t0)
        if imatrix_out is not None:
            imatrix_mod.save_imatrix(imatrix_out, imatrix)
    elif not isinstance(imatrix, dict):
        imatrix = imatrix_mod.load_imatrix(imatrix)
    untied = any(e.name == "output" for e in entries)
    for e in quantized:
        if untied and e.name == "token_embd":
            continue  # only a lookup table when the head is separate: no product to weigh by
        e.importance = _importance_vector(imatrix, e.name, e.shape[1])
    imatrix.setdefault(imatrix_mod.TOKENS_KEY, np.array(0))
    return imatrix


def _importance_vector(imatrix, name: str, columns: int) -> np.ndarray:
    """The statistics of the matrix `name` (`columns` inputs), checked against the model."""
    v = imatrix.get(name)
    if v is None:
        raise ExportError(f"the importance statistics have no entry for {name}; they were "
                          f"computed for another model: recompute them from calibration input")
    if np.shape(v) != (columns,):
        raise ExportError(f"the importance statistics for {name} have shape {list(np.shape(v))}, "
                          f"the matrix {columns} columns; they were computed for another model")
    return np.asarray(v, np.float64)


# ----------------------------------------------------------------------------- conversion

def _nonfinite_error(hf_name: str, x: np.ndarray, row0: int) -> ExportError:
    bad = ~np.isfinite(x)
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    first = (first[0] + row0,) + first[1:]
    return ExportError(f"tensor {hf_name} contains {int(np.isnan(x).sum())} NaN and "
                       f"{int(np.isinf(x).sum())} infinite value(s) in rows from {row0} (first "
                       f"at index {list(first)}); the checkpoint is corrupt or comes from a "
                       f"diverged run. Re-download it.")


def _convert(x: np.ndarray, src: str, dst: str, hf_name: str, row0: int) -> np.ndarray:
    """One chunk of a source tensor (safetensors dtype src) in .oelm dtype dst; checks finiteness."""
    if src == "BF16":
        if int(np.bitwise_and(x, np.uint16(0x7FFF)).max(initial=0)) >= 0x7F80:  # exponent all ones
            raise _nonfinite_error(hf_name, bf16_to_f32(x), row0)
        if dst == "bf16":
            return x  # bit-exact copy
        x = bf16_to_f32(x)  # exact
    else:
        # A sum is finite only if every element is (NaN and inf propagate): one fast pass
        # instead of materialising isfinite() for every chunk.
        if not np.isfinite(np.sum(x, dtype=np.float32)) and not np.isfinite(x).all():
            raise _nonfinite_error(hf_name, x, row0)
        if src == dst.upper():
            return x  # F32 -> f32, F16 -> f16: bit-exact copy
        x = x.astype(np.float32)  # F16 -> f32 is exact
    if dst == "f32":
        return x
    if dst == "bf16":
        y = f32_to_bf16(x)  # round to nearest even
        if int(np.bitwise_and(y, np.uint16(0x7FFF)).max(initial=0)) >= 0x7F80:
            raise ExportError(f"tensor {hf_name} has values beyond the bfloat16 range "
                              f"(max |x| = {float(np.abs(x).max()):.6g}); export with --dtype f32")
        return y
    with np.errstate(over="ignore"):
        y = x.astype(_NUMPY["f16"])  # IEEE conversion: round to nearest even
    if not np.isfinite(np.sum(y, dtype=np.float32)):
        raise ExportError(f"tensor {hf_name} has values beyond the float16 range (max |x| = "
                          f"{float(np.abs(x).max()):.6g} > 65504); export with --dtype bf16 or f32")
    return y


def _quantize(x: np.ndarray, src: str, entry: _Entry, row0: int) -> np.ndarray:
    """One chunk of whole panels (rows row0 ..) of a matrix, block-quantized and packed."""
    w = _convert(x, src, "f32", entry.hf_name, row0)  # checks finiteness
    try:
        return np.frombuffer(quant.quantize_packed(w, entry.dtype, entry.importance), np.uint8)
    except ValueError as e:
        raise ExportError(f"tensor {entry.hf_name} (rows from {row0}) cannot be stored as "
                          f"{entry.dtype}: {e}") from None


def _chunks(entry: _Entry, ckpt: HFCheckpoint | None, tokenizer: bytes):
    """The bytes of one output tensor, as contiguous arrays of at most ~_CHUNK_BYTES."""
    if entry.hf_name is None:
        yield np.frombuffer(tokenizer, dtype=np.uint8)
        return
    st = ckpt.where[entry.hf_name]
    src = st.dtype(entry.hf_name)
    a = st.get(entry.hf_name)
    row_bytes = math.prod(a.shape[1:]) * a.itemsize  # a 1-D norm: one element per "row"
    rows = max(1, _CHUNK_BYTES // max(1, row_bytes))
    if entry.dtype in quant.QUANT_DTYPES:  # whole panels of 16 rows, so the chunks concatenate
        rows = max(1, rows // quant.QROWS) * quant.QROWS
        for r in range(0, a.shape[0], rows):
            yield _quantize(a[r:r + rows], src, entry, r)
        return
    for r in range(0, a.shape[0], rows):
        yield np.ascontiguousarray(_convert(a[r:r + rows], src, entry.dtype, entry.hf_name, r))


def _write_tensor(f, entry: _Entry, chunks, bar: ProgressBar) -> int:
    """Write one tensor's chunks; returns their CRC-32, computed on the bytes as written."""
    crc = 0
    written = 0
    for chunk in chunks:
        buf = chunk.reshape(-1).view(np.uint8)
        crc = zlib.crc32(buf, crc)
        f.write(buf)
        written += buf.nbytes
        bar.update(buf.nbytes)
    if written != entry.size:  # would be a bug here, not a user error
        raise AssertionError(f"{entry.name}: wrote {written} bytes, expected {entry.size}")
    return crc


def _metadata_bytes(meta: dict) -> bytes:
    return json.dumps(meta, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


# ----------------------------------------------------------------------------- export

def _drop_from_page_cache(fd: int) -> None:
    """Evicts the just-written (and synced) file from the page cache.

    Pages cached by write() are small (4 KiB) folios, and the loader's huge-page
    mapping (csrc/format/oelm_file.cpp) would keep them small; when the first load
    reads the file back through that mapping instead, Linux caches it in 2 MiB folios
    where the file system supports them, and decode runs faster. Advisory only.
    """
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def _tensor_dtype_overrides(tensor_dtypes, layout, flash_layout: bool) -> dict:
    """{oelm name: file dtype} of export_checkpoint's tensor_dtypes, checked against the layout."""
    if not tensor_dtypes:
        return {}
    pairs = list(tensor_dtypes.items()) if isinstance(tensor_dtypes, dict) else list(tensor_dtypes)
    matrices = [t.oelm_name for t in layout if not t.is_norm and t.oelm_name not in ("token_embd", "output")]
    out = {}
    for pattern, dt in pairs:
        if dt not in WEIGHT_DTYPES:
            raise ExportError(f"tensor dtype {pattern}={dt}: {dt!r} is not one of {', '.join(WEIGHT_DTYPES)}")
        hit = fnmatch.filter(matrices, pattern)
        if not hit:
            raise ExportError(f"tensor dtype {pattern}={dt}: the pattern matches no layer matrix (names such as "
                              f"{matrices[0]}, blk.0.ffn_down; the vocabulary matrices take --embedding-dtype)")
        if flash_layout and any(n.endswith((".ffn_gate_up", ".ffn_down")) for n in hit):
            raise ExportError(f"tensor dtype {pattern}={dt}: the flash layout stores the FFN matrices in bundles of "
                              f"one dtype; give the FFN matrices no dtype of their own, or drop --flash-layout")
        out.update({n: FILE_DTYPE[dt] for n in hit})
    return out


def _bundle_chunks(gu_hf: str, dn_hf: str, ckpt: HFCheckpoint, order: np.ndarray, bundle: int,
                   wdtype: str, name: str, importance=(None, None)):
    """The bytes of blk.{i}.ffn_bundles (FORMAT.md, "Flash layout"): per bundle of neurons (in
    `order`), their gate rows then up rows as one [2n, D] matrix, then their down columns as a
    [D, n] matrix, each converted like any matrix and padded to 4096 bytes. importance: the
    importance statistics (imatrix.py) of ffn_gate_up's input (D values, the same for any rows)
    and of ffn_down's (F values, one per neuron: taken in the bundle's order), or None."""
    st_gu, st_dn = ckpt.where[gu_hf], ckpt.where[dn_hf]
    gu, dn = st_gu.get(gu_hf), st_dn.get(dn_hf)
    F = dn.shape[1]
    imp_gu, imp_dn = importance

    def encode(x, src, hf, imp=None):
        if wdtype in quant.QUANT_DTYPES:
            e = _Entry(name, wdtype, x.shape, hf_name=hf)
            e.importance = imp
            out = _quantize(x, src, e, 0)
        else:
            out = np.ascontiguousarray(_convert(x, src, wdtype, hf, 0)).reshape(-1).view(np.uint8)
        pad = -out.nbytes % flash.BUNDLE_ALIGN
        return [out, np.zeros(pad, np.uint8)] if pad else [out]

    for first in range(0, F, bundle):
        idx = np.asarray(order[first:first + bundle])
        yield from encode(np.concatenate([gu[idx], gu[F + idx]]), st_gu.dtype(gu_hf), gu_hf, imp_gu)
        yield from encode(np.ascontiguousarray(dn[:, idx]), st_dn.dtype(dn_hf), dn_hf,
                          None if imp_dn is None else imp_dn[idx])


def _bundle_importance(imp, spec: ModelSpec, layers) -> dict:
    """{layer: (ffn_gate_up's, ffn_down's) importance statistics} for the layers written as flash
    bundles; {} without statistics. Checked before anything is written, as _importance_stats
    checks the other matrices'."""
    if imp is None:
        return {}
    return {i: (_importance_vector(imp, f"blk.{i}.ffn_gate_up", spec.d_model),
                _importance_vector(imp, f"blk.{i}.ffn_down", spec.ffn_dim[i])) for i in layers}


def export_checkpoint(src_dir, out_path, dtype: str = "auto", tokenizer=None,
                      progress: bool | None = None, embedding_dtype: str | None = None,
                      with_tokenizer: bool = True, imatrix=None, calibration=None,
                      calibration_ctx: int = 512, imatrix_out=None,
                      calibration_tokens: int | None = None, flash_layout: bool = False,
                      bundle_neurons: int = flash.DEFAULT_BUNDLE_NEURONS, flash_calibration=None,
                      flash_calibration_ids=None,
                      flash_calibration_tokens: int = flash.DEFAULT_CALIBRATION_TOKENS,
                      tensor_dtypes=None) -> Path:
    """Convert the HF OpenELM checkpoint in src_dir into the .oelm file out_path; returns its path.

    dtype: "auto" (the checkpoint's: F32 -> f32, BF16 -> bf16, F16 -> f16; f32 if the matrices
    mix dtypes), "f32", "f16", "bf16", or the block-quantized "q8" / "q6" / "q5" / "q4" / "q4k" (FORMAT.md,
    quant.py);
    norm weights are always f32. embedding_dtype: one of those (not auto) for the token
    embedding, which is also the LM head when tied (and for `output` when untied); default
    the weights' dtype, but q8 for q4 and q6 for q4k weights (_choose_embedding_dtype). tokenizer: path of a
    SentencePiece tokenizer.model (default src_dir/tokenizer.model); with_tokenizer=False writes
    a file of token ids only, with no tokenizer (FORMAT.md; for models whose vocabulary is not
    SentencePiece, e.g. the SmolLM2 stand-in of benchmarks/standin.py). progress: show a bar on
    stderr (None: only if stderr is a terminal). Everything is validated before a byte is
    written; NaN/Inf and out-of-range values are found while converting, and then, as on any
    error or Ctrl-C, the temporary file is removed and out_path is left untouched. Notes
    (skipped tensors, dtype choice) go to the "openelm_rt.export" logger at INFO level.

    Importance-weighted quantization (block-quantized matrices; quant.py, imatrix.py): calibration =
    text (tokenized with the file's SentencePiece tokenizer, BOS first in each window) or a
    sequence of token ids, run through the checkpoint in windows of calibration_ctx to collect
    each matrix's input statistics (the first calibration_tokens of them, default all); or imatrix = such statistics (a dict, or the path of an .npz
    that imatrix_out wrote). imatrix_out: also save the statistics computed from calibration.

    flash_layout=True writes the flash layout (FORMAT.md, flash.py; format_version 2): the FFN
    neurons of each layer hottest-first in bundles of bundle_neurons, hotness measured by first
    exporting the ordinary layout to a temporary file beside out_path and running calibration
    text through it: `flash_calibration` (a UTF-8 text file; default the shipped corpus), its
    first flash_calibration_tokens tokens, or `flash_calibration_ids` (token ids, for files
    without a tokenizer).

    tensor_dtypes: per-matrix exceptions to dtype, as (pattern, dtype) pairs (or a dict): every
    layer matrix whose .oelm name matches the fnmatch pattern (e.g. "blk.*.ffn_down") gets that
    dtype (one of dtype's names, not auto), later pairs winning; each pattern must match a layer
    matrix (the vocabulary matrices take embedding_dtype). Recorded in the metadata's
    tensor_dtypes (FORMAT.md); e.g. llama.cpp's Q4_K_M-like mixes (q6 for some ffn_down).
    """
    src, out = Path(src_dir), Path(out_path)
    if not src.is_dir():
        raise ExportError(f"checkpoint directory {src} does not exist or is not a directory")
    if out.is_dir():
        raise ExportError(f"output {out} is a directory; give a file name, e.g. {out / 'model.oelm'}")
    if not out.parent.is_dir():
        raise ExportError(f"output directory {out.parent} does not exist; create it first")

    cfg_path = src / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{cfg_path} does not exist; pass the directory of a Hugging Face "
                          f"OpenELM checkpoint (config.json + model.safetensors)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read {cfg_path}: {e}") from e
    spec = parse_config(cfg)
    try:  # the config is copied into the metadata, which must be strict JSON
        json.dumps(cfg, allow_nan=False)
    except ValueError:
        raise ExportError(f"{cfg_path} contains NaN or Infinity, which is not valid JSON; "
                          f"fix the value in config.json") from None
    if with_tokenizer:
        tok = _load_tokenizer(src, tokenizer, spec)
    elif tokenizer is not None:
        raise ExportError("a tokenizer was given but with_tokenizer is False (--no-tokenizer); "
                          "pass one or the other")
    else:
        tok = None

    order = None
    if flash_layout:
        flash.check_bundle_neurons(bundle_neurons)
        if flash_calibration is not None and flash_calibration_ids is not None:
            raise ExportError("give flash_calibration (a text file) or flash_calibration_ids, not both")
        plain = out.parent / f".{out.name}.calibration-{os.getpid()}.oelm"
        try:
            # Ranked on a cheap temporary: block-quantized targets on bf16 (a rounding, no
            # quantizer search; the activation counts that rank the neurons are the same to
            # within the quantization noise, docs/MEMORY.md).
            rank_dtype = "bf16" if FILE_DTYPE.get(dtype, dtype) in quant.QUANT_DTYPES else dtype
            export_checkpoint(src, plain, dtype=rank_dtype, tokenizer=tokenizer, progress=progress,
                              embedding_dtype=None if rank_dtype == "bf16" else embedding_dtype,
                              with_tokenizer=with_tokenizer)
            if flash_calibration_ids is None:
                from . import _core
                ranking_ids = flash.calibration_tokens(
                    _core.Model(str(plain), False), flash_calibration, flash_calibration_tokens)
                source = str(flash_calibration or "openelm_rt/data/corpus.txt")
            else:
                ranking_ids = [int(t) for t in flash_calibration_ids]
                if not ranking_ids or min(ranking_ids) < 0 or max(ranking_ids) >= spec.vocab_size:
                    raise ExportError(f"flash_calibration_ids must be a non-empty list of token ids in "
                                      f"[0, {spec.vocab_size})")
                source = "token ids"
            order, seen = flash.neuron_order(plain, ranking_ids)
        finally:
            plain.unlink(missing_ok=True)
        log.info("flash layout: neurons ranked on %d calibration tokens (%s)", seen, source)

    ckpt = HFCheckpoint(src)
    try:
        layout = _check_tensors(ckpt, spec, cfg)
        wdtype = _choose_dtype(dtype, ckpt, layout)
        edtype = _choose_embedding_dtype(embedding_dtype, wdtype)

        overrides = _tensor_dtype_overrides(tensor_dtypes, layout, order is not None)

        def dtype_of(t) -> str:
            if t.is_norm:
                return "f32"
            return edtype if t.oelm_name in ("token_embd", "output") else overrides.get(t.oelm_name, wdtype)

        entries = [_Entry(TOKENIZER_TENSOR, "u8", (len(tok),))] if tok is not None else []
        bundle_src = {}  # flash layout: ffn_bundles entry name -> (gate_up hf name, down hf name, layer)
        for t in layout:
            if order is not None and t.oelm_name.endswith(".ffn_down"):
                continue  # in the bundles, written with ffn_gate_up
            if order is not None and t.oelm_name.endswith(".ffn_gate_up"):
                layer = int(t.oelm_name.split(".")[1])
                name = f"blk.{layer}.ffn_bundles"
                dn = next(u.hf_name for u in layout if u.oelm_name == f"blk.{layer}.ffn_down")
                bundle_src[name] = (t.hf_name, dn, layer)
                nbytes = flash.bundles_nbytes(wdtype, spec.d_model, spec.ffn_dim[layer], bundle_neurons)
                entries.append(_Entry(name, "u8", (nbytes,)))
                entries.append(_Entry(f"blk.{layer}.ffn_perm", "i32", (spec.ffn_dim[layer],)))
                continue
            entries.append(_Entry(t.oelm_name, dtype_of(t), t.shape, hf_name=t.hf_name))
        imp = _importance_stats(src, tok, entries, imatrix, calibration, calibration_ctx, imatrix_out,
                                calibration_tokens,
                                show=sys.stderr.isatty() if progress is None else progress)
        bundle_imp = _bundle_importance(imp, spec, [layer for _, _, layer in bundle_src.values()])
        offset = 0
        for e in entries:
            e.offset = _align(offset)
            offset = e.offset + e.size
        data_size = offset  # no padding after the last tensor: the file ends with it

        meta = {
            "format": "openelm_rt",
            "writer": f"{PROG} {_writer_version()}",
            "weights_dtype": wdtype,
            "embedding_dtype": edtype,
            "model": spec.to_metadata(),
            "tokenizer": ({"type": "sentencepiece", "tensor": TOKENIZER_TENSOR}
                          if tok is not None else None),
            "source": {"hf_config": cfg},
            "tensors": [e.to_json() for e in entries],
        }
        overrides = {k: v for k, v in overrides.items() if v != wdtype}
        if overrides:
            meta["tensor_dtypes"] = overrides
        if imp is not None:  # provenance: how the scales were chosen
            meta["source"]["importance"] = {"tokens": int(imp[imatrix_mod.TOKENS_KEY])}
        if order is not None:
            meta["flash_layout"] = {"version": flash.VERSION, "bundle_neurons": bundle_neurons,
                                    "calibration": {"source": source, "tokens": seen}}
        # The CRCs are only known after the data is written, so reserve room for the metadata
        # with every crc32 at its widest (10 digits), write the data, then the real metadata
        # (never longer) at offset 64; the rest of the reserved room stays zero padding.
        for t in meta["tensors"]:
            t["crc32"] = 0xFFFFFFFF
        data_offset = _align(HEADER_SIZE + len(_metadata_bytes(meta)))
        file_size = data_offset + data_size
        free = shutil.disk_usage(out.parent).free
        if free < file_size:
            raise ExportError(f"{out.parent} has {free / 1e9:.2f} GB free but {out.name} needs "
                              f"{file_size / 1e9:.2f} GB; free space or choose another directory")

        show = sys.stderr.isatty() if progress is None else progress
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                bar = ProgressBar(data_size, f"writing {out.name}", show)
                try:
                    for e in entries:
                        f.seek(data_offset + e.offset)  # skipped bytes read back as zeros
                        if e.name.endswith(".ffn_perm"):
                            chunks = [np.asarray(order[int(e.name.split(".")[1])], dtype="<i4")]
                        elif e.name in bundle_src:
                            gu, dn, layer = bundle_src[e.name]
                            chunks = _bundle_chunks(gu, dn, ckpt, order[layer], bundle_neurons, wdtype,
                                                    e.name, bundle_imp.get(layer, (None, None)))
                        else:
                            chunks = _chunks(e, ckpt, tok)
                        e.crc32 = _write_tensor(f, e, chunks, bar)
                finally:
                    bar.close()
                meta["tensors"] = [e.to_json() for e in entries]
                blob = _metadata_bytes(meta)
                assert HEADER_SIZE + len(blob) <= data_offset, "metadata outgrew its reserved room"
                header = _HEADER.pack(MAGIC, FLASH_FORMAT_VERSION if order is not None else FORMAT_VERSION,
                                      NAMES_VERSION, HEADER_SIZE, len(blob),
                                      data_offset, data_size, ALIGNMENT, zlib.crc32(blob),
                                      file_size)
                f.seek(0)
                f.write(header + blob + bytes(data_offset - HEADER_SIZE - len(blob)))
                f.flush()
                os.fsync(f.fileno())
                _drop_from_page_cache(f.fileno())
            os.replace(tmp, out)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise ExportError(f"writing {out} failed: {exc.strerror or exc}") from exc
            raise
    finally:
        ckpt.close()
    return out


# ----------------------------------------------------------------------------- reading back

class OelmFile:
    """Memory-mapped .oelm file for tests and tools; checks only the magic (the C++ reader validates)."""

    def __init__(self, path):
        self.path = Path(path)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        fields = _HEADER.unpack(self._map[:HEADER_SIZE].tobytes())
        names = ("magic", "format_version", "names_version", "metadata_offset", "metadata_size",
                 "data_offset", "data_size", "alignment", "metadata_crc32", "file_size")
        self.header = dict(zip(names, fields))
        if self.header["magic"] != MAGIC:
            raise ExportError(f"{self.path} is not an .oelm file (magic {self.header['magic']!r})")
        start = self.header["metadata_offset"]
        self.metadata = json.loads(
            self._map[start:start + self.header["metadata_size"]].tobytes().decode("utf-8"))
        self._tensors = {t["name"]: t for t in self.metadata["tensors"]}

    def names(self) -> list[str]:
        return list(self._tensors)

    def tensor(self, name: str) -> np.ndarray:
        """Read-only view: f32 float32, f16 float16, bf16 uint16 bits, u8 uint8, i32 int32; the
        block-quantized types as their raw bytes (1-D uint8; decode with quant.dequantize)."""
        t = self._tensors[name]
        begin = self.header["data_offset"] + t["offset"]
        raw = self._map[begin:begin + t["size"]]
        if t["dtype"] in quant.QUANT_DTYPES:
            return raw
        return raw.view(_NUMPY[t["dtype"]]).reshape(t["shape"])

    def close(self) -> None:
        self._map = None

    def __enter__(self) -> "OelmFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_oelm(path) -> OelmFile:
    return OelmFile(path)


# ----------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Convert a Hugging Face OpenELM checkpoint (config.json + model.safetensors,\n"
                    "or shards + model.safetensors.index.json) and a SentencePiece tokenizer\n"
                    "into one .oelm file for openelm_rt. Everything is validated first; the\n"
                    "output appears only when complete.",
        epilog="example:\n  %(prog)s ./OpenELM-270M-Instruct -o openelm-270m-instruct.oelm "
               "--tokenizer ./Llama-2-7b-hf/tokenizer.model\n\n"
               "Apple's OpenELM repos ship no tokenizer: pass the LLaMA-2 tokenizer.model.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="checkpoint directory (as downloaded from the Hub)")
    p.add_argument("-o", "--output", metavar="OUT.oelm", required=True,
                   help="output file (written atomically: a temporary file, renamed at the end)")
    p.add_argument("--dtype", choices=("auto",) + WEIGHT_DTYPES, default="auto",
                   help="weight type: auto keeps the checkpoint's (F32 -> f32, BF16 -> bf16); "
                        "q8 / q6 / q5 / q4 are 8 / 6 / 5 / 4-bit blocks of 32 weights with a 16-bit "
                        "scale (8.5 / 6.5 / 5.5 / 4.5 bits per weight; q8, q5, q4 like llama.cpp "
                        "Q8_0 / Q5_0 / Q4_0); q4k is 4-bit with 6-bit scales and minimums per 32 "
                        "weights in super-blocks of 256 (4.5 bits per weight, like llama.cpp Q4_K; "
                        "docs/FORMAT.md); norm weights "
                        "are always f32 (default: %(default)s)")
    p.add_argument("--embedding-dtype", choices=WEIGHT_DTYPES, default=None,
                   help="type of the token embedding, which is also the LM head (default: as "
                        "--dtype, but q8 for q4 and q6 for q4k: the head's rounding goes straight "
                        "into the logits)")
    p.add_argument("--tensor-dtype", action="append", default=[], metavar="PATTERN=DTYPE",
                   help="give the layer matrices whose names match PATTERN (fnmatch, e.g. "
                        "'blk.*.ffn_down' or 'blk.[0-2].ffn_down') their own type (one of --dtype's); "
                        "repeatable, later ones win (e.g. a q4k model with q6 ffn_down in some layers, "
                        "as llama.cpp's Q4_K_M mixes Q4_K and Q6_K)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="SentencePiece tokenizer.model (default: SRC/tokenizer.model)")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="store no tokenizer: the model then takes and returns token ids only "
                        "(for a model whose vocabulary is not a SentencePiece model)")
    g = p.add_argument_group(
        "importance-weighted quantization (q8, q6, q5, q4, q4k)",
        "Choose each block's scale by the error it causes in the matrix products on calibration\n"
        "text (llama.cpp's imatrix): the checkpoint runs once on the calibration tokens to\n"
        "measure the inputs of every matrix. The file layout is the same.")
    c = g.add_mutually_exclusive_group()
    c.add_argument("--calibration-text", metavar="FILE",
                   help="UTF-8 text, tokenized with the stored tokenizer (e.g. the package's "
                        "openelm_rt/data/corpus.txt)")
    c.add_argument("--calibration-ids", metavar="FILE",
                   help="token ids (integers separated by spaces, commas or newlines, or .npy)")
    c.add_argument("--imatrix", metavar="FILE.npz", help="statistics saved by --imatrix-out")
    g.add_argument("--calibration-tokens", type=int, default=8192, metavar="N",
                   help="use the first N calibration tokens (default %(default)s)")
    g.add_argument("--calibration-ctx", type=int, default=512, metavar="N",
                   help="calibration window in tokens (default %(default)s)")
    g.add_argument("--imatrix-out", metavar="FILE.npz", help="also save the computed statistics")
    p.add_argument("--flash-layout", action="store_true",
                   help="store each layer's FFN neurons hottest-first in bundles (gate row, up row "
                        "and down column together) for running under a memory budget: the "
                        "neurons that do not fit are then one sequential read per layer. Hotness "
                        "is measured on calibration text (format_version 2; docs/MEMORY.md)")
    p.add_argument("--bundle-neurons", type=int, default=flash.DEFAULT_BUNDLE_NEURONS, metavar="N",
                   help="neurons per bundle with --flash-layout, a multiple of 32 (default: %(default)s)")
    p.add_argument("--flash-calibration", metavar="TEXT",
                   help="UTF-8 text to rank neurons on with --flash-layout (default: the corpus "
                        "shipped in openelm_rt/data/corpus.txt)")
    p.add_argument("--flash-calibration-tokens", type=int, default=flash.DEFAULT_CALIBRATION_TOKENS,
                   metavar="N", help="tokens of --flash-calibration to rank neurons on (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--version", action="version", version=f"%(prog)s {_writer_version()} "
                   f"(writes .oelm format_version {FORMAT_VERSION}, names_version {NAMES_VERSION})")
    return p


def main(argv=None) -> int:
    """CLI entry point: 0 ok, 2 on a usage or export error, 130 on Ctrl-C."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed usage and the error (or --help)
        return e.code if isinstance(e.code, int) else 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: note: %(message)s"))
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        t0 = time.monotonic()
        calibration = None
        if args.calibration_tokens < 2 or args.calibration_ctx < 2:
            raise ExportError("--calibration-tokens and --calibration-ctx must be at least 2")
        try:
            if args.calibration_ids is not None:
                from .perplexity import _read_ids
                calibration = _read_ids(args.calibration_ids)[:args.calibration_tokens]
            elif args.calibration_text is not None:
                with open(args.calibration_text, encoding="utf-8") as f:
                    text = f.read()
                # tokens beyond the first N are dropped after tokenizing (export_checkpoint)
                calibration = text
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ExportError(f"cannot read the calibration input: {e}") from None
        tensor_dtypes = []
        for item in args.tensor_dtype:
            pattern, eq, dt = item.rpartition("=")
            if not eq or not pattern:
                raise ExportError(f"--tensor-dtype {item!r}: expected PATTERN=DTYPE, e.g. 'blk.*.ffn_down=q6'")
            tensor_dtypes.append((pattern, dt))
        out = export_checkpoint(args.src, args.output, dtype=args.dtype, tokenizer=args.tokenizer,
                                progress=False if args.no_progress else None,
                                embedding_dtype=args.embedding_dtype,
                                with_tokenizer=not args.no_tokenizer, imatrix=args.imatrix,
                                calibration=calibration, calibration_ctx=args.calibration_ctx,
                                imatrix_out=args.imatrix_out,
                                calibration_tokens=args.calibration_tokens,
                                flash_layout=args.flash_layout, bundle_neurons=args.bundle_neurons,
                                flash_calibration=args.flash_calibration,
                                flash_calibration_tokens=args.flash_calibration_tokens,
                                tensor_dtypes=tensor_dtypes)
        with read_oelm(out) as f:
            n, wd = len(f.metadata["tensors"]), f.metadata["weights_dtype"]
            ed = f.metadata["embedding_dtype"]
            own = f.metadata.get("tensor_dtypes", {})
        mixed = f", {len(own)} matrices of their own dtype" if own else ""
        print(f"{PROG}: wrote {out} ({out.stat().st_size:,} bytes, {n} tensors, weights {wd}, "
              f"embedding {ed}{mixed}) in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        return 0
    except ExportError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no output written", file=sys.stderr)
        return 130
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


if __name__ == "__main__":
    sys.exit(main())
