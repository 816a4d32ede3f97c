"""How much the flash layout's neuron ranking depends on the weight type it is measured on, on
the trained stand-in (benchmarks/standin.py): the exporter ranks a block-quantized target on a
bf16 temporary (python/openelm_rt/export.py), and this shows that order is as close to the f32
weights' as the q8 export's is.

    python benchmarks/flash_ranking.py

Ranks each layer's neurons with flash.neuron_order (the exporter's rule) on the shipped corpus'
first 1024 tokens (the exporter's default) in the f32, bf16 and q8 exports, and prints for each
pair the overlap of their hottest 10 / 25 / 50 % (mean over layers) and the share of neurons
that land in the same 256-neuron bundle.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import standin  # noqa: E402
from openelm_rt import export, flash  # noqa: E402
from openelm_rt.tokenizer_train import CORPUS_PATH  # noqa: E402


def overlap(a, b, frac):
    return float(np.mean([len(np.intersect1d(x[:int(len(x) * frac)], y[:int(len(y) * frac)])) / int(len(x) * frac)
                          for x, y in zip(a, b)]))


def same_bundle(a, b, size=256):
    out = []
    for x, y in zip(a, b):
        bx, by = np.empty(len(x), int), np.empty(len(y), int)
        bx[x], by[y] = np.arange(len(x)) // size, np.arange(len(y)) // size
        out.append(float((bx == by).mean()))
    return float(np.mean(out))


def main() -> int:
    s = standin.ensure_standin(dtypes=("f32", "q8"))
    bf16 = os.path.join(s.dir, "standin-bf16.oelm")
    if not os.path.exists(bf16):
        export.export_checkpoint(s.checkpoint_dir, bf16, dtype="bf16", with_tokenizer=False, progress=False)
    ids = s.tokenizer().encode(CORPUS_PATH.read_text(encoding="utf-8")).ids[:flash.DEFAULT_CALIBRATION_TOKENS]
    orders = {}
    for name, path in (("f32", s.oelm["f32"]), ("bf16", bf16), ("q8", s.oelm["q8"])):
        t0 = time.time()
        orders[name], _ = flash.neuron_order(path, ids)
        print(f"{name}: ranked in {time.time() - t0:.1f} s", file=sys.stderr)
    out = {}
    for a, b in (("q8", "f32"), ("bf16", "f32"), ("bf16", "q8")):
        out[f"{a} vs {b}"] = {**{f"hottest {int(f * 100)} %": round(overlap(orders[a], orders[b], f), 4)
                                 for f in (0.1, 0.25, 0.5)},
                              "same bundle": round(same_bundle(orders[a], orders[b]), 4)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
