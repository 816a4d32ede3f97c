"""Where inter-token latency comes from: the engine's steps under a closed-loop load, timed one by
one and sorted by kind -- decode-only (every row a generating sequence's next token), mixed
(decode rows plus a chunk of some new request's prompt) and prefill-only -- for each value of
the engine's prefill_chunk (prompt tokens per step while sequences decode; 0 = up to the whole
step budget, the scheduling before the option existed).

    python benchmarks/bench_engine_steps.py --preset 270M --dtype q8 --threads 2 --concurrency 8 \\
        --prefill-chunk 0 16 32 64

For each chunk value: step time p50/p99 (ms) and count of each kind, the mixed / decode-only
ratio of medians, and what the requests saw (in-process, no HTTP): TTFT p50/p99, inter-token
latency p50/p99 and output tokens/s. Requests are token-id prompts of --prompt-tokens (random,
no prefix-cache reuse, so every chunk value prefills the same prompts), --output-tokens each, greedy, `concurrency` in flight (a new
one submitted as soon as one finishes). Each chunk value also checks that the tokens equal
those of the first value's run (the scheduling never changes a greedy token).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_serve import make_prompts, pct  # noqa: E402


def run(core, rt, prompts, out_tokens, concurrency, max_batch, chunk):
    eng = core.Engine(rt, max_batch=max_batch, prefill_chunk=chunk)
    steps = {"decode": [], "mixed": [], "prefill": []}
    ttft, gaps, tokens = [], [], {}
    pending, active = list(enumerate(prompts)), {}
    prev = eng.stats()
    t_all = time.perf_counter()
    while pending or active:
        while pending and len(active) < concurrency:
            k, p = pending.pop(0)
            rid = eng.submit(p, max_new_tokens=out_tokens, temperature=0.0, reuse_prefix=False)
            active[rid] = [time.perf_counter(), None, k]
            tokens[k] = []
        t0 = time.perf_counter()
        eng.step()
        now = time.perf_counter()
        st = eng.stats()
        d_rows, d_tok = st["decode_rows"] - prev["decode_rows"], st["step_tokens"] - prev["step_tokens"]
        if st["steps"] > prev["steps"]:
            kind = "decode" if d_tok == d_rows else ("mixed" if d_rows else "prefill")
            steps[kind].append(now - t0)
        prev = st
        for e in eng.take_events():
            a = active[e["id"]]
            if e["token"] >= 0:
                (ttft if a[1] is None else gaps).append(now - (a[0] if a[1] is None else a[1]))
                a[1] = now
                tokens[a[2]].append(e["token"])
            if e["finish"]:
                del active[e["id"]]
    wall = time.perf_counter() - t_all
    n_out = sum(len(t) for t in tokens.values())
    row = {"prefill_chunk": chunk, "concurrency": concurrency, "out_tok_per_s": n_out / wall,
           "ttft_p50_ms": 1000 * pct(ttft, 50), "ttft_p99_ms": 1000 * pct(ttft, 99),
           "itl_p50_ms": 1000 * pct(gaps, 50), "itl_p99_ms": 1000 * pct(gaps, 99)}
    for kind, xs in steps.items():
        row[f"{kind}_steps"] = len(xs)
        row[f"{kind}_p50_ms"] = 1000 * pct(xs, 50)
        row[f"{kind}_p99_ms"] = 1000 * pct(xs, 99)
    row["mixed_over_decode"] = row["mixed_p50_ms"] / row["decode_p50_ms"] if steps["decode"] else float("nan")
    return row, [tokens[k] for k in range(len(prompts))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="an .oelm file (default: random weights of --preset)")
    p.add_argument("--preset", default="270M")
    p.add_argument("--dtype", default="q8")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--concurrency", type=int, nargs="+", default=[8])
    p.add_argument("--prefill-chunk", type=int, nargs="+", default=[0, 16, 32, 64])
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from openelm_rt import Session, _core

    path = args.model
    if path is None:
        from openelm_rt.demo import ensure_random_model
        path = ensure_random_model(args.preset, args.dtype, args.cache_dir).path
    rows = []
    with Session(path, threads=args.threads, max_batch=args.max_batch) as s:
        vocab = int(s.config["vocab_size"])
        run(_core, s._rt, make_prompts(2, args.prompt_tokens, vocab, seed=999), 4, 2, args.max_batch, 0)  # warm-up
        for c in args.concurrency:
            prompts = make_prompts(args.requests, args.prompt_tokens, vocab, seed=7 + c)
            ref = None
            for chunk in args.prefill_chunk:
                row, toks = run(_core, s._rt, prompts, args.output_tokens, c, args.max_batch, chunk)
                if ref is None:
                    ref = toks
                row["same_tokens"] = toks == ref
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\nmodel {os.path.basename(path)}, {args.threads} threads, max_batch {args.max_batch}, {args.requests} "
          f"requests, prompt {args.prompt_tokens} tokens, output {args.output_tokens}; step times in ms (p50 / p99, count)")
    print("| concurrency | prefill_chunk | decode-only step | mixed step | prefill-only step | mixed/decode | "
          "TTFT p50 / p99 | ITL p50 / p99 | output tok/s | same tokens |")
    print("|---:|---:|---|---|---|---:|---|---|---:|---|")
    for r in rows:
        step = lambda k: f"{r[k + '_p50_ms']:.1f} / {r[k + '_p99_ms']:.1f} ({r[k + '_steps']})"  # noqa: E731
        print(f"| {r['concurrency']} | {r['prefill_chunk']} | {step('decode')} | {step('mixed')} | {step('prefill')} | "
              f"{r['mixed_over_decode']:.1f}x | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
              f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {r['out_tok_per_s']:.1f} | {r['same_tokens']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
