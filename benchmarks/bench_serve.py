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
engine in this process, stepped by the benchmark itself (no HTTP, no threads).

Server overhead, measured directly: the server times its own path in the histogram
openelm_server_overhead_seconds of /metrics (admit: request received -> submitted to the engine;
first_token / token: the engine emitted a token -> its SSE chunk handed to the transport; ttft:
admit + first_token). The benchmark scrapes it before and after each level and prints, per
concurrency (all repetitions together), the count, mean, p50 and p99 of each stage (quantiles
interpolated within the buckets, as Prometheus' histogram_quantile) and the exact share of
observations within the targets (ttft <= 5 ms, token <= 1 ms: both are bucket bounds).

    python benchmarks/bench_serve.py --preset 270M --dtype q8 --threads 2 --concurrency 1 8 --no-engine

With --llama-server PATH (or `auto`: built once from the llama.cpp vendored in the
llama-cpp-python sdist, see llama_side.ensure_llama_server), llama.cpp's llama-server runs next to
ours on the same weights (the GGUF of the same random checkpoint, quantized by llama.cpp to the
same bits: q8 -> Q8_0, q4 -> Q4_0), on 127.0.0.1, with `--parallel` = our --max-batch and
`--cont-batching`, the same threads, and the same requests: /v1/completions with the same
token-id prompts (llama-server has no OpenELM chat template, so chat is not compared). For each
of --reps repetitions and each concurrency the two servers take the same load one after the other
(the order alternating), and the table gives the medians over the repetitions and the ratios
ours / llama-server.

    python benchmarks/bench_serve.py --preset 270M --dtype q8 --concurrency 1 8 16 --llama-server auto \
        --requests 16 --output-tokens 32 --reps 3 --no-engine
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
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=concurrency + 4,
                                                                                      max_keepalive_connections=0)) as c:
        # a new connection per request: llama-server (cpp-httplib) closes idle kept-alive
        # connections, which raced with a reused one ("Server disconnected"); same for both sides
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


# ---------------------------------------------------------------------------------------------- overhead
OVERHEAD = "openelm_server_overhead_seconds"
TARGETS = {"ttft": 0.005, "token": 0.001}  # the issue's: <= 5 ms on TTFT, <= 1 ms per token


def scrape_overhead(text):
    """{stage: {"count", "sum", "buckets": [(upper bound, cumulative count), ...]}} of the server's
    overhead histogram in a /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != OVERHEAD:
            continue
        for smp in fam.samples:
            h = out.setdefault(smp.labels["stage"], {"count": 0.0, "sum": 0.0, "buckets": []})
            if smp.name.endswith("_bucket"):
                h["buckets"].append((float(smp.labels["le"]), smp.value))
            elif smp.name.endswith("_count"):
                h["count"] = smp.value
            elif smp.name.endswith("_sum"):
                h["sum"] = smp.value
    for h in out.values():
        h["buckets"].sort()
    return out


def overhead_delta(after, before, acc=None):
    """after - before, added into acc (the same shape) when given."""
    acc = acc if acc is not None else {}
    for stage, a in after.items():
        b = before.get(stage, {"count": 0.0, "sum": 0.0, "buckets": [(le, 0.0) for le, _ in a["buckets"]]})
        h = acc.setdefault(stage, {"count": 0.0, "sum": 0.0, "buckets": [(le, 0.0) for le, _ in a["buckets"]]})
        h["count"] += a["count"] - b["count"]
        h["sum"] += a["sum"] - b["sum"]
        h["buckets"] = [(le, n + x - y) for (le, n), (_, x), (_, y) in zip(h["buckets"], a["buckets"], b["buckets"])]
    return acc


def hist_quantile(buckets, q):
    """Prometheus' histogram_quantile: linear within the bucket holding the q-th observation
    (the largest finite bound when it falls in +Inf); nan without observations."""
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return float("nan")
    rank, lo, below = q * total, 0.0, 0.0
    for le, n in buckets:
        if n >= rank:
            if le == float("inf"):
                return lo
            return lo + (le - lo) * ((rank - below) / (n - below) if n > below else 1.0)
        lo, below = le, n
    return lo


def share_within(buckets, bound):
    """The fraction of observations <= bound (exact when bound is a bucket's upper bound)."""
    total = buckets[-1][1] if buckets else 0
    for le, n in buckets:
        if le >= bound - 1e-12:
            return n / total if total else float("nan")
    return 1.0


def overhead_rows(ovh_by_c):
    rows = []
    for c, h in sorted(ovh_by_c.items()):
        for stage in ("admit", "first_token", "ttft", "token", "response"):
            x = h.get(stage)
            if not x or x["count"] <= 0:
                continue
            r = {"side": "overhead", "concurrency": c, "stage": stage, "count": int(x["count"]),
                 "mean_ms": 1000 * x["sum"] / x["count"], "p50_ms": 1000 * hist_quantile(x["buckets"], 0.5),
                 "p99_ms": 1000 * hist_quantile(x["buckets"], 0.99)}
            if stage in TARGETS:
                r["target_ms"] = 1000 * TARGETS[stage]
                r["within_target"] = share_within(x["buckets"], TARGETS[stage])
            rows.append(r)
    return rows


def row(name, c, r, n_req):
    toks = sum(r["ntok"])
    return {"side": name, "concurrency": c, "requests": n_req, "errors": len(r["errors"]),
            "req_per_s": n_req / r["wall"], "out_tok_per_s": toks / r["wall"],
            "ttft_p50_ms": 1000 * pct(r["ttft"], 50), "ttft_p99_ms": 1000 * pct(r["ttft"], 99),
            "itl_p50_ms": 1000 * pct(r["gaps"], 50), "itl_p99_ms": 1000 * pct(r["gaps"], 99),
            "out_tokens": toks}


METRICS = ("req_per_s", "out_tok_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
           "out_tokens", "errors")


def median_row(rows):
    """One row with the median of each metric over repetitions."""
    out = dict(rows[0])
    for k in METRICS:
        out[k] = float(np.median([r[k] for r in rows]))
    out["reps"] = len(rows)
    return out


def llama_gguf(args) -> str:
    """The GGUF llama-server loads: --gguf, or the one of the same random weights as our model
    (made by llama_side.ensure_ggufs in the llama-cpp-python venv when missing)."""
    if args.gguf:
        return args.gguf
    if args.model:
        raise SystemExit("--llama-server with --model needs --gguf (the same weights as a GGUF)")
    import llama_side
    from openelm_rt.demo import ensure_random_model

    ftype = llama_side.LLAMA_TYPE.get(args.dtype)
    if ftype is None:
        raise SystemExit(f"no llama.cpp file type matches --dtype {args.dtype}; use one of "
                         f"{sorted(llama_side.LLAMA_TYPE)}")
    m32 = ensure_random_model(args.preset, "f32", args.cache_dir)
    path = llama_side.gguf_path(m32.path, ftype)
    if not os.path.exists(path):
        python = llama_side.ensure_venv(args.llama_venv)
        with llama_side.LlamaWorker(python) as w:
            path = llama_side.ensure_ggufs(w, m32.checkpoint_dir, m32.tokenizer_path, m32.path, [ftype],
                                           args.threads)[ftype]
    return path


def start_llama_server(binary, gguf, args):
    port = free_port()
    ctx = args.max_batch * (args.prompt_tokens + args.output_tokens + 64)  # per slot: ctx / parallel
    cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads),
           "-tb", str(args.threads), "--parallel", str(args.max_batch), "--cont-batching", "-c", str(ctx),
           "--no-webui"]
    print("[bench] " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(args.llama_log, "w"))
    return proc, f"http://127.0.0.1:{port}"


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
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="the engine's prompt tokens per step while others decode (default: the server's)")
    p.add_argument("--no-engine", action="store_true", help="skip the engine-alone rows")
    p.add_argument("--engine-concurrency", type=int, nargs="+", default=None,
                   help="concurrency levels of the engine-alone rows (default: those of --concurrency)")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    p.add_argument("--llama-server", default=None, metavar="PATH|auto",
                   help="compare with llama.cpp's llama-server: its binary, or 'auto' to build it once "
                        "(llama_side.ensure_llama_server; minutes)")
    p.add_argument("--gguf", default=None, help="the GGUF llama-server loads (default: the same random weights)")
    p.add_argument("--llama-venv", default=os.path.expanduser("~/.cache/openelm_rt/llama-venv"),
                   help="llama-cpp-python venv used to make the GGUF when it is missing")
    p.add_argument("--llama-log", default=os.devnull, help="where llama-server's log goes")
    p.add_argument("--reps", type=int, default=1,
                   help="repetitions of every level (servers interleaved); the table shows medians")
    args = p.parse_args(argv)

    import httpx

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
           "--log-level", "warning"] + ([] if args.prefill_chunk is None else ["--prefill-chunk", str(args.prefill_chunk)])
    llama = None
    if args.llama_server:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import llama_side

        binary = llama_side.ensure_llama_server(args.llama_server, args.cache_dir)
        llama = start_llama_server(binary, llama_gguf(args), args)
    srv = subprocess.Popen(cmd)
    bases = {"server": base}
    runs = {}  # (side, concurrency) -> rows of the repetitions
    ovh = {}   # concurrency -> the server's overhead histograms over its runs at that level
    try:
        wait_ready(base, timeout=300, process=srv)
        if llama:
            wait_ready(llama[1], timeout=300, process=llama[0])
            bases["llama-server"] = llama[1]
        for b in bases.values():  # warm-up (page in the weights)
            asyncio.run(http_load(b, make_prompts(2, args.prompt_tokens, vocab, seed=999), 8, 2))
        for rep in range(args.reps):
            for c in args.concurrency:
                # fresh prompts every repetition (no prefix-cache hits), the same for both sides
                prompts = make_prompts(args.requests, args.prompt_tokens, vocab, seed=1000 * rep + c)
                order = list(bases) if rep % 2 == 0 else list(bases)[::-1]
                for side in order:
                    if side == "server":
                        before = scrape_overhead(httpx.get(base + "/metrics").text)
                    r = asyncio.run(http_load(bases[side], prompts, args.output_tokens, c))
                    if side == "server":
                        overhead_delta(scrape_overhead(httpx.get(base + "/metrics").text), before,
                                       ovh.setdefault(c, {}))
                    runs.setdefault((side, c), []).append(row(side, c, r, args.requests))
                    print(json.dumps({"rep": rep, **runs[(side, c)][-1]}), flush=True)
    finally:
        for proc in [srv] + ([llama[0]] if llama else []):
            proc.terminate()
            proc.wait(timeout=30)
    rows = [median_row(v) for v in runs.values()]
    if not args.no_engine:
        with Session(path, threads=args.threads, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk) as s:
            engine_load(s, make_prompts(2, args.prompt_tokens, vocab, seed=999), 8, 2)
            for c in args.engine_concurrency or args.concurrency:
                prompts = make_prompts(args.requests, args.prompt_tokens, vocab, seed=100 + c)
                r = engine_load(s, prompts, args.output_tokens, c)
                rows.append(row("engine", c, r, args.requests))
                print(json.dumps(rows[-1]), flush=True)

    print(f"\nmodel {os.path.basename(path)}, {args.threads} threads, max_batch {args.max_batch}, "
          f"{args.requests} requests per level, prompt {args.prompt_tokens} tokens, output {args.output_tokens}"
          + (f", medians of {args.reps} interleaved repetitions" if args.reps > 1 else ""))
    print("| side | concurrency | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | "
          "out tokens | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["side"])):
        print(f"| {r['side']} | {r['concurrency']} | {r['req_per_s']:.2f} | {r['out_tok_per_s']:.1f} | "
              f"{r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | {r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} | "
              f"{r['out_tokens']:.0f} | {r['errors']:.0f} |")
    orows = overhead_rows(ovh)
    print("\nserver overhead, from its own timestamps (openelm_server_overhead_seconds; all repetitions; "
          "p50/p99 interpolated within buckets; 'within' = exact share <= the target)")
    print("| concurrency | stage | count | mean ms | p50 ms | p99 ms | target | within |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in orows:
        tgt = f"<= {r['target_ms']:g} ms" if "target_ms" in r else ""
        within = f"{100 * r['within_target']:.1f} %" if "within_target" in r else ""
        print(f"| {r['concurrency']} | {r['stage']} | {r['count']} | {r['mean_ms']:.3f} | {r['p50_ms']:.3f} | "
              f"{r['p99_ms']:.3f} | {tgt} | {within} |")
    rows += orows
    if llama:
        by = {(r["side"], r["concurrency"]): r for r in rows if r["side"] != "overhead"}
        print("\nours / llama-server (output tok/s: higher is better for us; latencies: lower is)")
        print("| concurrency | output tok/s | TTFT p50 | ITL p50 | ITL p99 |")
        print("|---:|---:|---:|---:|---:|")
        for c in args.concurrency:
            a, b = by[("server", c)], by[("llama-server", c)]
            ratio = {k: a[k] / b[k] if b[k] else float("nan")
                     for k in ("out_tok_per_s", "ttft_p50_ms", "itl_p50_ms", "itl_p99_ms")}
            for k, v in ratio.items():
                rows.append({"side": "ratio", "concurrency": c, "metric": k, "ours_over_llama": v})
            print(f"| {c} | {ratio['out_tok_per_s']:.2f}x | {ratio['ttft_p50_ms']:.2f}x | "
                  f"{ratio['itl_p50_ms']:.2f}x | {ratio['itl_p99_ms']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
