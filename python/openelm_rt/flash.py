"""The flash layout (docs/FORMAT.md, "Flash layout"): calibration and bundle geometry.

`openelm-rt-export --flash-layout` stores each layer's FFN neurons hottest-first, in bundles
of `bundle_neurons` neurons (gate rows, up rows and down columns together), so that under a
memory budget the neurons that do not fit are one contiguous tail of the file, read in one
sequential request per layer (docs/MEMORY.md).

Hotness is measured on calibration text (by default the corpus the project ships,
openelm_rt/data/corpus.txt): the model in the ordinary layout runs it with the core's FFN
probe, which counts, per neuron, the tokens on which |silu(gate) * up| exceeds that token's
mean over the layer; neurons are ranked by that count, ties by the summed magnitude.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import quant
from .hf_config import ExportError

VERSION = 2          # metadata "flash_layout" version this writer produces (2: the permutation
                     # in the tensors blk.{i}.ffn_perm; 1 kept it in the metadata, no longer read)
BUNDLE_ALIGN = 4096  # each part of a bundle is padded to this (direct I/O reads whole pages)
DEFAULT_BUNDLE_NEURONS = 256
DEFAULT_CALIBRATION_TOKENS = 1024
_WINDOW = 256        # calibration tokens per sequence (each starts with BOS)


def shipped_corpus() -> Path:
    return Path(__file__).with_name("data") / "corpus.txt"


def _pad(n: int) -> int:
    return (n + BUNDLE_ALIGN - 1) // BUNDLE_ALIGN * BUNDLE_ALIGN


def bundle_geometry(dtype: str, d_model: int, ffn_dim: int, bundle_neurons: int) -> list[dict]:
    """A layer's bundles, as the C++ reader computes them (csrc/model/flash_layout.cpp):
    per bundle its first neuron position, neuron count, offset in the tensor, the gate_up part's
    bytes, the down part's offset and bytes, and the bundle's padded size."""
    out, offset = [], 0
    for first in range(0, ffn_dim, bundle_neurons):
        n = min(bundle_neurons, ffn_dim - first)
        gu = quant.tensor_nbytes(dtype, (2 * n, d_model))
        dn = quant.tensor_nbytes(dtype, (d_model, n))
        size = _pad(gu) + _pad(dn)
        out.append({"first": first, "neurons": n, "offset": offset, "gate_up_bytes": gu,
                    "down_offset": _pad(gu), "down_bytes": dn, "bytes": size})
        offset += size
    return out


def bundles_nbytes(dtype: str, d_model: int, ffn_dim: int, bundle_neurons: int) -> int:
    g = bundle_geometry(dtype, d_model, ffn_dim, bundle_neurons)
    return g[-1]["offset"] + g[-1]["bytes"]


def check_bundle_neurons(n: int) -> int:
    if not isinstance(n, int) or n < 32 or n > 65536 or n % 32:
        raise ExportError(f"bundle_neurons is {n!r}; it must be a multiple of 32 in [32, 65536] "
                          f"(whole 32-neuron quantization blocks of the down columns)")
    return n


def calibration_tokens(model, text_path=None, max_tokens: int = DEFAULT_CALIBRATION_TOKENS) -> list[int]:
    """Token ids of the calibration text (default: the shipped corpus) under `model`'s tokenizer,
    at most max_tokens of them (without the BOS each window gets)."""
    if not model.has_tokenizer:
        raise ExportError("the model has no tokenizer (exported with --no-tokenizer), so calibration "
                          "text cannot be tokenized; pass flash_calibration_ids (token ids) to "
                          "export_checkpoint instead")
    path = Path(text_path) if text_path is not None else shipped_corpus()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"cannot read the calibration text {path}: {e}") from e
    ids = list(model.tokenizer.encode(text))[:max_tokens]
    if len(ids) < 16:
        raise ExportError(f"the calibration text {path} gives {len(ids)} tokens; give at least 16 "
                          f"(a few paragraphs of text like what the model will see)")
    return ids


def neuron_order(oelm_path, tokens: list[int], bos: int | None = None) -> tuple[list[np.ndarray], int]:
    """Runs `tokens` (windows of 256, each after BOS) through the ordinary-layout file and returns
    per layer the neurons hottest-first (a permutation of range(ffn_dim)), and the tokens seen."""
    from . import _core

    model = _core.Model(str(oelm_path), False)
    rt = _core.Runtime(model, _core.Backend("cpu", 0), max_context=_WINDOW + 1,
                       max_step_tokens=_WINDOW + 1, kv_budget=0)
    bos = model.config["bos_token_id"] if bos is None else bos
    rt.ffn_probe_start()
    for i in range(0, len(tokens), _WINDOW):
        s = rt.seq_new()
        rt.eval([(s, [bos] + list(tokens[i:i + _WINDOW]), "last")])
        rt.seq_free(s)
    stats = rt.ffn_probe_take()
    order = [np.lexsort((-mag, -act)).astype(np.int64)  # last key first: active count, then magnitude
             for act, mag in zip(stats["active"], stats["magnitude"])]
    return order, int(stats["tokens"])
