"""Like-for-like check of q4k against llama.cpp's Q4_K where the K-quants apply in full: the
stand-in's ffn_down matrices ([576, 1536]: rows of 1536 = 6 x 256 weights, so Q4_K's super-blocks
of 256 and ours of 8 x 32 both fit, at 4.5 bits per weight each). For every layer whose ffn_down
llama.cpp's Q4_K_M stores as Q4_K, the reconstruction error of

* llama.cpp Q4_K, dequantized from the stand-in's Q4_K_M GGUF (the `gguf` package's dequantizer;
  llama-cpp-python's quantizer with its default parameters, i.e. no imatrix),
* our q4k (`quant.quantize_q4k`, no importance), and q4k+im (importance-weighted, the stand-in's
  calibration statistics: corpus tokens 8192-16383),
* our q4 / q4+im (4.5 bits, blocks of 32 with one f16 scale) for reference,

each as a relative error of the matrix against the f32 weights: plain, sqrt(sum (w - w')^2 /
sum w^2), and importance-weighted with the same statistics for every row, sqrt(sum_k imp_k
sum_n (w - w')^2 / sum_k imp_k sum_n w^2) (the expected error of the product for inputs with
those mean squares, up to cross terms).

    python benchmarks/bench_ffn_down_q4k.py [--noise 0.5] [--out results/ffn_down_q4k]

The stand-in's weights are dequantized Q4_1 (benchmarks/standin.py): each block of 32 already lies
on an affine 4-bit grid, which both Q4_K and q4k (affine per block of 32) can nearly reproduce.
--noise F adds Gaussian noise of F times each matrix's standard deviation to every ffn_down (seeded,
the same for both sides: a copy of the F32 GGUF with the noisy weights is quantized to Q4_K_M by
llama.cpp), which takes the weights off that grid.

Needs the stand-in built (benchmarks/standin.py) with its Q4_K_M GGUF and imatrix (bench_standin.py
makes both), and the `gguf` package.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from openelm_rt import quant  # noqa: E402
from openelm_rt.demo import default_cache_dir  # noqa: E402
from openelm_rt.safetensors_io import SafetensorsFile  # noqa: E402

import standin  # noqa: E402


def rel(w: np.ndarray, back: np.ndarray, imp=None) -> float:
    e = (back.astype(np.float64) - w) ** 2
    w2 = w.astype(np.float64) ** 2
    if imp is not None:
        e = e * imp[None, :]
        w2 = w2 * imp[None, :]
    return float(np.sqrt(e.sum() / w2.sum()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--noise", type=float, default=0.0, help="noise on ffn_down, times its std (default 0)")
    p.add_argument("--llama-venv", default=os.path.join(default_cache_dir(), "llama-venv"))
    p.add_argument("--out", default=None, help="write PATH.json and PATH.md")
    args = p.parse_args(argv)
    import gguf
    from gguf.quants import dequantize

    s = standin.ensure_standin(args.cache_dir, ("f32",))
    gpath = os.path.join(s.dir, "standin-Q4_K_M.gguf")
    ipath = os.path.join(s.dir, f"imatrix-{standin.CALIBRATION_START}-{standin.CALIBRATION_TOKENS}.npz")
    for f in (gpath, ipath):
        if not os.path.exists(f):
            p.error(f"{f} is missing: run benchmarks/bench_standin.py --ours q4+im --llama Q4_K_M first")
    imat = {k: np.asarray(v, np.float64) for k, v in np.load(ipath).items()}
    ckpt = SafetensorsFile(os.path.join(s.checkpoint_dir, "model.safetensors"))
    weights = {}
    tmp = None
    if args.noise > 0:  # noisy ffn_down on both sides: a GGUF copy for llama.cpp to quantize
        import shutil
        import tempfile
        import llama_side
        tmp = tempfile.mkdtemp(prefix="ffn_down_q4k_")
        f32 = os.path.join(tmp, "noisy-F32.gguf")
        shutil.copyfile(s.gguf_f32, f32)
        rng = np.random.default_rng(0)
        noisy = gguf.GGUFReader(f32, "r+")
        for t in noisy.tensors:
            if t.name.endswith("ffn_down.weight"):
                w = np.asarray(t.data, np.float32)
                w = w + rng.standard_normal(w.shape).astype(np.float32) * np.float32(args.noise * w.std())
                t.data[...] = w
                weights[int(t.name.split(".")[1])] = w
        noisy.data.flush()
        del noisy
        gpath = os.path.join(tmp, "noisy-Q4_K_M.gguf")
        with llama_side.LlamaWorker(llama_side.ensure_venv(args.llama_venv)) as worker:
            worker.call("quantize", src=f32, dst=gpath, ftype="Q4_K_M", threads=2)
    reader = gguf.GGUFReader(gpath)
    rows = []
    for t in reader.tensors:
        if not t.name.endswith("ffn_down.weight") or t.tensor_type.name != "Q4_K":
            continue
        layer = int(t.name.split(".")[1])
        w = weights[layer] if weights else np.asarray(ckpt.get(f"transformer.layers.{layer}.ffn.proj_2.weight"),
                                                      np.float32)
        theirs = dequantize(t.data, t.tensor_type).reshape(w.shape).astype(np.float32)
        imp = imat[f"blk.{layer}.ffn_down"]
        row = {"layer": layer, "Q4_K bits": 8 * t.n_bytes / w.size}
        row["llama Q4_K"] = (rel(w, theirs), rel(w, theirs, imp))
        for name, dt, use in (("q4k", quant.Q4K, None), ("q4k+im", quant.Q4K, imp), ("q4", quant.Q4, None),
                              ("q4+im", quant.Q4, imp)):
            raw = quant.quantize_packed(w, dt, use)
            if name == "q4k":
                row["q4k bits"] = 8 * len(raw) / w.size
            back = quant.dequantize(raw, dt, *w.shape)
            row[name] = (rel(w, back), rel(w, back, imp))
        rows.append(row)
        print(f"blk.{layer}.ffn_down: " + ", ".join(f"{k} {v[0]:.4f}/{v[1]:.4f}" for k, v in row.items()
                                                     if isinstance(v, tuple)), file=sys.stderr, flush=True)
    names = ["llama Q4_K", "q4k", "q4k+im", "q4", "q4+im"]
    if tmp:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    noise = f", Gaussian noise of {args.noise:g} std added" if args.noise else ""
    lines = [f"{len(rows)} ffn_down matrices [576, 1536]{noise} stored as Q4_K by llama.cpp's Q4_K_M "
             f"(layers {', '.join(str(r['layer']) for r in rows)}); bits/weight: Q4_K "
             f"{rows[0]['Q4_K bits']:.3f}, q4k {rows[0]['q4k bits']:.3f}, q4 4.500", "",
             "| type | relative error, plain (mean over matrices) | importance-weighted (mean) | "
             "weighted vs llama Q4_K (mean ratio; best / worst matrix) |", "|---|---|---|---|"]
    for n in names:
        plain = np.mean([r[n][0] for r in rows])
        wt = np.mean([r[n][1] for r in rows])
        ratio = [r[n][1] / r["llama Q4_K"][1] for r in rows]
        lines.append(f"| {n} | {plain:.4f} | {wt:.4f} | {np.mean(ratio):.3f} ({min(ratio):.3f} / {max(ratio):.3f}) |")
    print("\n".join(lines))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(rows, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
