"""CPU speed of openelm_rt on random-weight OpenELM models in the real shapes.

Prints prefill (ppN) and decode (tgN) tokens/s per thread count, next to the decode
ceiling that memory bandwidth allows (weight bytes read per token / read bandwidth,
measured in the same run). Runs are interleaved across thread counts and repeated;
medians are reported, because this machine's bandwidth drifts from minute to minute.

    python benchmarks/bench_cpu.py --preset 270M --dtype f32 --threads 1 2

The side-by-side with llama.cpp (llama-cpp-python) on the same weights, and quality
against f32, is bench_llama.py, which reuses the timing functions here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from openelm_rt import _core
from openelm_rt.demo import ensure_random_model


def weight_bytes_per_token(model) -> int:
    """Bytes a decode step must stream from memory: every matrix once (the tied
    embedding is read in full as the LM head), norms; not the tokenizer."""
    return sum(model.tensor(n).nbytes for n in model.tensor_names() if n != "tokenizer.model")


def time_prefill(model, backend, n_tokens, rng) -> float:
    ids = rng.integers(3, model.vocab_size, size=n_tokens).tolist()
    ctx = _core.Context(model, n_tokens, backend)
    t0 = time.perf_counter()
    ctx.eval(ids, False)
    return n_tokens / (time.perf_counter() - t0)


def time_decode(model, backend, n_tokens, rng) -> float:
    """Like llama-bench tg: n_tokens single-token evaluations after a one-token prompt."""
    ids = rng.integers(3, model.vocab_size, size=n_tokens + 1).tolist()
    ctx = _core.Context(model, n_tokens + 1, backend)
    ctx.eval(ids[:1], False)
    t0 = time.perf_counter()
    for t in ids[1:]:
        ctx.eval([t], False)
    return n_tokens / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="270M", choices=("tiny", "270M", "450M", "1_1B", "3B"))
    p.add_argument("--dtype", default="f32", choices=("f32", "f16", "bf16", "q8", "q4"))
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--pp", type=int, nargs="+", default=[128, 512], help="prefill lengths")
    p.add_argument("--tg", type=int, default=128, help="decode length")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--tokenizer", default=None)
    args = p.parse_args(argv)

    m = ensure_random_model(args.preset, args.dtype, args.cache_dir, args.tokenizer)
    model = _core.Model(m.path, False)
    wbytes = weight_bytes_per_token(model)
    backends = {t: _core.Backend("cpu", t) for t in args.threads}
    rng = np.random.default_rng(0)
    res = {t: {"bw": [], "tg": [], **{f"pp{n}": [] for n in args.pp}} for t in args.threads}
    for rep in range(args.repeats):
        for t, be in backends.items():  # interleaved: each repeat visits every thread count
            res[t]["bw"].append(be.read_bandwidth(1 << 30, 3))
            for n in args.pp:
                res[t][f"pp{n}"].append(time_prefill(model, be, n, rng))
            res[t]["tg"].append(time_decode(model, be, args.tg, rng))
        print(f"  repeat {rep + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    print(f"\nOpenELM-{args.preset} (random weights), {args.dtype}, {wbytes / 1e6:.1f} MB of weights per token, "
          f"kernels '{next(iter(backends.values())).kernels}', medians of {args.repeats}")
    cols = [f"pp{n}" for n in args.pp]
    print("| threads | " + " | ".join(f"prefill {c} tok/s" for c in cols) +
          f" | decode tg{args.tg} tok/s | read GB/s | decode bound tok/s | decode / bound |")
    print("|---|" + "---|" * (len(cols) + 4))
    for t in args.threads:
        r = {k: statistics.median(v) for k, v in res[t].items()}
        bound = r["bw"] / wbytes
        print(f"| {t} | " + " | ".join(f"{r[c]:.1f}" for c in cols) +
              f" | {r['tg']:.1f} | {r['bw'] / 1e9:.1f} | {bound:.1f} | {r['tg'] / bound:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
