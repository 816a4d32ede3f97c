"""The OpenAI-compatible server under a bounded concurrent load on loopback: requests/s, output
tokens/s, time to first token and inter-token latency (p50/p99) at each concurrency, next to the
engine alone (the same requests through Session, no HTTP) to show what the server adds.

    python benchmarks/bench_serve.py --preset 270M --dtype q8 --threads 2 --concurrency 1 4 8 16

The model is random weights in the real shape (cached in ~/.cache/openelm_rt, as the other
benchmarks), or --model M.oelm. The server runs as `openelm-rt serve` in a subprocess on
127.0.0.1; the client (httpx, SSE parsed by hand) sends --requests streamed /v1/completions
requests at each concurrency: token-id prompts of --prompt-tokens (random, distinct, so the
prefix cache does not help), --output-tokens each (greedy; a random model rarely emits EOS, and
the output tokens are counted from the usage chunk). TTFT is from sending the request to the
first text chunk; inter-token latency is the gap between consecutive chunks (one per token, except
where a byte-fallback character spans tokens). "engine" rows: the same load on the Session's
engine in this process, stepped by the benchmark itself (no HTTP, no threads): what the server
adds is the difference.

llama.cpp's llama-server is not compared here: it is not built on this machine (the issue's
comparison needs it built from the llama-cpp-python sdist's vendored source).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_prompts(n, length, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, vocab, size=length - 1).tolist() for _ in range(n)]


async def http_load(base, prompts, out_tokens, concurrency):
    import httpx

    sem = asyncio.Semaphore(concurrency)
    ttft, gaps, ntok, errors = [], [], [], []
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as c:
        async def one(p):
            async with sem:
                body = {"prompt": p, "max_tokens": out_tokens, "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True}}
                t0 = time.perf_counter()
                last, n = None, 0
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        errors.append(r.status_code)
                        return
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        d = json.loads(line[6:])
                        if d.get("usage"):
                            n = d["usage"]["completion_tokens"]
                        if d.get("choices") and d["choices"][0]["text"]:
                            now = time.perf_counter()
                            if last is None:
                                ttft.append(now - t0)
                            else:
                                gaps.append(now - last)
                            last = now
                ntok.append(n)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        wall = time.perf_counter() - t0
    return {"wall": wall, "ttft": ttft, "gaps": gaps, "ntok": ntok, "errors": errors}


def engine_load(session, prompts, out_tokens, concurrency):
    """The same requests on the Session's engine in this process, no HTTP: `concurrency` in flight,
    a new one submitted as soon as one finishes (as the server's clients do)."""
    eng = session._engine
    ttft, gaps, ntok = [], [], []
    pending, active = list(prompts), {}
    t_all = time.perf_counter()
    while pending or active:
        while pending and len(active) < concurrency:
            rid = eng.submit(pending.pop(0), max_new_tokens=out_tokens, temperature=0.0)
            active[rid] = [time.perf_counter(), None, 0]  # submitted, last text, tokens
        eng.step()
        now = time.perf_counter()
        for e in eng.take_events():
            a = active[e["id"]]
            if e["text"]:
                (ttft if a[1] is None else gaps).append(now - (a[0] if a[1] is None else a[1]))
                a[1] = now
            a[2] += e["token"] >= 0
            if e["finish"]:
                ntok.append(a[2])
                del active[e["id"]]
    return {"wall": time.perf_counter() - t_all, "ttft": ttft, "gaps": gaps, "ntok": ntok, "errors": []}


def row(name, c, r, n_req):
    toks = sum(r["ntok"])
    return {"side": name, "concurrency": c, "requests": n_req, "errors": len(r["errors"]),
            "req_per_s": n_req / r["wall"], "out_tok_per_s": toks / r["wall"],
            "ttft_p50_ms": 1000 * pct(r["ttft"], 50), "ttft_p99_ms": 1000 * pct(r["ttft"], 99),
            "itl_p50_ms": 1000 * pct(r["gaps"], 50), "itl_p99_ms": 1000 * pct(r["gaps"], 99),
            "out_tokens": toks}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="an .oelm file (default: random weights of --preset)")
    p.add_argument("--preset", default="270M")
    p.add_argument("--dtype", default="q8")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--no-engine", action="store_true", help="skip the engine-alone rows")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)

    from openelm_rt import Session
    from openelm_rt.serve import wait_ready

    path = args.model
    if path is None:
        from openelm_rt.demo import ensure_random_model
        path = ensure_random_model(args.preset, args.dtype, args.cache_dir).path
    from openelm_rt import _core
    vocab = int(_core.Model(path, False).config["vocab_size"])
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "openelm_rt", "serve", path, "--port", str(port), "--threads", str(args.threads),
           "--max-batch", str(args.max_batch), "--max-queue", str(max(args.concurrency) * 2),
           "--log-level", "warning"]
    srv = subprocess.Popen(cmd)
    rows = []
    try:
        wait_ready(base, timeout=300, process=srv)
        # warm-up (page in the weights)
        asyncio.run(http_load(base, make_prompts(2, args.prompt_tokens, vocab, seed=999), 8, 2))
        for c in args.concurrency:
            prompts = make_prompts(args.requests, args.prompt_tokens, vocab, seed=c)
            r = asyncio.run(http_load(base, prompts, args.output_tokens, c))
            rows.append(row("server", c, r, args.requests))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        srv.terminate()
        srv.wait(timeout=30)
    if not args.no_engine:
        with Session(path, threads=args.threads, max_batch=args.max_batch) as s:
            engine_load(s, make_prompts(2, args.prompt_tokens, vocab, seed=999), 8, 2)
            for c in args.concurrency:
                prompts = make_prompts(args.requests, args.prompt_tokens, vocab, seed=100 + c)
                r = engine_load(s, prompts, args.output_tokens, c)
                rows.append(row("engine", c, r, args.requests))
                print(json.dumps(rows[-1]), flush=True)

    print(f"\nmodel {os.path.basename(path)}, {args.threads} threads, max_batch {args.max_batch}, "
          f"{args.requests} requests per level, prompt {args.prompt_tokens} tokens, output {args.output_tokens}")
    print("| side | concurrency | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["side"])):
        print(f"| {r['side']} | {r['concurrency']} | {r['req_per_s']:.2f} | {r['out_tok_per_s']:.1f} | "
              f"{r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | {r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} | "
              f"{r['errors']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
