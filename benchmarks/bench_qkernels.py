"""The matrix kernels alone, on a random OpenELM model's own matrices: how fast each weight type
streams in decode (one token: GB/s of weights read) and computes in prefill (many tokens: tok/s),
next to the machine's read bandwidth. No attention, norms or thread hand-offs between layers, so
it separates "the kernel is slow" from "the forward pass around it is".

    python benchmarks/bench_qkernels.py --preset 270M --dtypes q4 q4k --threads 1 2

Decode: every layer matrix of the file (not the head), one token each, in file order (the order
a forward pass reads them, so nothing stays in cache between passes of a model larger than the
caches). Prefill: the first --prefill-layers layers' matrices against --prefill-tokens tokens.
Types run interleaved, --repeats times; the best and the median are printed. Each call goes
through Backend.kernel_matmul (the runtime's threaded matmul driver and activation quantization),
so a few microseconds of Python per matrix are included.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from openelm_rt import _core, export
from openelm_rt.demo import ensure_random_model

DTYPES = ("f16", "bf16", "q8", "q6", "q5", "q4", "q4k")


def layer_matrices(path: str) -> list:
    """(raw bytes, dtype, N, K, layer) of every 2-D layer weight of the file, in file order."""
    f = export.read_oelm(path)
    out = []
    for t in f.metadata["tensors"]:
        if t["name"].startswith("blk.") and len(t["shape"]) == 2:
            raw = np.ascontiguousarray(np.asarray(f.tensor(t["name"])).reshape(-1).view(np.uint8))
            out.append((raw, t["dtype"], int(t["shape"][0]), int(t["shape"][1]), int(t["name"].split(".")[1])))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="270M", choices=("270M", "450M", "1_1B", "3B"))
    p.add_argument("--dtypes", nargs="+", default=["q4", "q4k"], choices=DTYPES)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prefill-layers", type=int, default=4)
    p.add_argument("--prefill-tokens", type=int, default=256)
    p.add_argument("--logit-scale", type=float, default=1.0, help="which cached random model (bench_llama's)")
    p.add_argument("--cache-dir", default=None)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.prefill_layers < 1 or args.prefill_tokens < 2:
        p.error("--repeats and --prefill-layers must be >= 1, --prefill-tokens >= 2")

    sets = {dt: layer_matrices(ensure_random_model(args.preset, dt, args.cache_dir,
                                                   logit_scale=args.logit_scale).path)
            for dt in args.dtypes}
    rng = np.random.default_rng(0)
    Ks = {m[3] for mats in sets.values() for m in mats}
    x = {K: rng.standard_normal((args.prefill_tokens, K)).astype(np.float32) for K in Ks}
    print(f"# matrix kernels, random OpenELM-{args.preset}: decode = all layer matrices x 1 token; "
          f"prefill = {args.prefill_layers} layers x {args.prefill_tokens} tokens; best / median of {args.repeats}")
    print("| threads | type | layer bytes | read GB/s | decode GB/s | % of read | prefill tok/s |")
    print("|---|---|---|---|---|---|---|")
    for th in args.threads:
        be = _core.Backend("cpu", th)
        bw = be.read_bandwidth(1 << 30, 3)
        dec = {dt: [] for dt in sets}
        pre = {dt: [] for dt in sets}
        for _ in range(args.repeats):
            for dt, mats in sets.items():
                nbytes = sum(m[0].nbytes for m in mats)
                t0 = time.perf_counter()
                for raw, wdt, N, K, _ in mats:
                    be.kernel_matmul(raw, wdt, N, K, x[K][:1])
                dec[dt].append(nbytes / (time.perf_counter() - t0) / 1e9)
                t0 = time.perf_counter()
                for raw, wdt, N, K, layer in mats:
                    if layer < args.prefill_layers:
                        be.kernel_matmul(raw, wdt, N, K, x[K])
                pre[dt].append(args.prefill_tokens / (time.perf_counter() - t0))
        for dt, mats in sets.items():
            nbytes = sum(m[0].nbytes for m in mats)
            d, q = dec[dt], pre[dt]
            print(f"| {th} | {dt} | {nbytes / 1e6:.1f} MB | {bw / 1e9:.1f} | {max(d):.2f} / {statistics.median(d):.2f} | "
                  f"{max(d) * 1e9 / bw:.0%} / {statistics.median(d) * 1e9 / bw:.0%} | "
                  f"{max(q):.0f} / {statistics.median(q):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
