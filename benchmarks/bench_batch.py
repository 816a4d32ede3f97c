"""Many sequences at once: aggregate decode tokens/s at batch 1..16, ours next to llama.cpp's
batched decode on the same weights, the cost of a second chat turn with and without prefix
reuse, and the KV cache's layout choices (block size, f16 keys and values).

    python benchmarks/bench_batch.py --models 270M 1_1B --dtypes q8 q4 --threads 2 --out results/batch

Per model and weight type (random weights in the real shape, cached in ~/.cache/openelm_rt;
llama.cpp gets a GGUF made from the same safetensors, quantized by its own quantizer, as in
bench_llama.py):

1. Batched decode. B sequences each prefilled with --prompt tokens, then --tg steps that
   each evaluate one new token of every sequence with logits for all of them:
   - ours "step": Runtime.eval of the B tokens (the forward pass alone, as llama.cpp's side);
   - ours "engine": the same through the continuous-batching engine (B requests with greedy
     sampling, stop checks and text; what generate_batch and the server do), counted from the
     step after every prompt has been prefilled;
   - llama.cpp: llama_decode of a batch of B tokens, one per sequence (n_seq_max = B, its
     default context: F16 KV cache, flash attention), llama-cpp-python's low-level batch API.
   Interleaved (ours, engine, llama, ... for every B), --settle seconds of idle before each,
   medians of --repeats. The decode bound at batch 1 is the read bandwidth measured in the same
   run ÷ the weight bytes per token; a batch reads the weights once per step, so its bound is B
   times that, until the matrix products' arithmetic (prefill's rate, printed beside) caps it.
2. Second chat turn: a --turn1-token conversation and its 32-token reply, then a next turn of
   --turn2 new tokens: the time to the next turn's first token with the prefix cache (only the
   new tokens are evaluated) and without it (the whole conversation again), and the tokens each
   evaluated.
3. --score: score_batch on card-shaped synthetic requests (an MMLU 5-shot subject: a shared
   few-shot prefix, questions, four one-token choices; HellaSwag 10-shot: a shared prefix,
   contexts, four ~20-token endings): pairs/s and tokens forwarded against the pairs' total
   length (what a per-pair forward pass computes).
4. --kv-layout: decode at batch 8 with a --kv-context-token context for each KV block size in
   --block-sizes and for f16 keys/values, and the f16 cache's largest logit error against f32.

llama-cpp-python runs in its own venv (see bench_llama.py); --no-llama skips it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from openelm_rt import _core
from openelm_rt.demo import default_cache_dir, ensure_random_model

import llama_side
from bench_cpu import time_prefill, weight_bytes_per_token
from bench_llama import Report, log, matmul_flops_per_token


def _prompts(rng, b, n, vocab):
    return [[1] + rng.integers(3, vocab, size=n - 1).tolist() for _ in range(b)]


def ours_step(model, be, b, prompt, tg, rng, kv_dtype="f32", block=0, max_context=None):
    """Aggregate tokens/s of tg batched decode steps of b sequences (forward pass only)."""
    vocab = model.vocab_size
    rt = _core.Runtime(model, be, max_context=max_context or (prompt + tg + 8),
                       kv_budget=b * (prompt + tg + 256) * 131072, block_size=block,
                       kv_dtype=kv_dtype, max_step_tokens=max(256, b))
    seqs = [rt.seq_new() for _ in range(b)]
    rt.eval([(s, p, "none") for s, p in zip(seqs, _prompts(rng, b, prompt, vocab))])
    toks = rng.integers(3, vocab, size=(tg, b)).tolist()
    t0 = time.perf_counter()
    for i in range(tg):
        rt.eval([(s, [t], "last") for s, t in zip(seqs, toks[i])])
    return b * tg / (time.perf_counter() - t0)


def ours_engine(model, be, b, prompt, tg, rng):
    """Aggregate tokens/s of the engine generating tg tokens for each of b requests, counted
    once every prompt is prefilled."""
    rt = _core.Runtime(model, be, max_context=prompt + tg + 8, max_step_tokens=max(256, b), prefix_cache=0,
                       budget_sequences=b)
    eng = _core.Engine(rt, max_batch=b)
    for p in _prompts(rng, b, prompt, model.vocab_size):
        eng.submit(p, max_new_tokens=tg + 1)
    started, t0, n = set(), None, 0
    while not eng.idle:
        eng.step()
        for e in eng.take_events():
            if t0 is not None and e["token"] >= 0:
                n += 1
            started.add(e["id"])
        if t0 is None and len(started) == b:
            t0 = time.perf_counter()
    return n / (time.perf_counter() - t0)


def second_turn(path, threads, turn1, turn2, rng, vocab):
    """Seconds to the next turn's first token, and tokens evaluated, with and without reuse."""
    from openelm_rt import Session
    out = {}
    for reuse in (True, False):
        with Session(path, threads=threads, prefix_cache=16 if reuse else 0) as s:
            p1 = [1] + rng.integers(3, vocab, size=turn1 - 1).tolist()
            r1 = s.generate(p1, max_new_tokens=32)
            p2 = p1 + r1.token_ids + [2] + rng.integers(3, vocab, size=turn2 - 1).tolist()
            before = s.stats["tokens_forwarded"]
            t0 = time.perf_counter()
            r2 = s.generate(p2, max_new_tokens=1)
            out["reuse" if reuse else "no_reuse"] = {"seconds": time.perf_counter() - t0,
                                                     "evaluated": s.stats["tokens_forwarded"] - before,
                                                     "cached": r2.cached_tokens, "prompt": len(p2)}
    return out


def score_tasks(rng, vocab):
    """{name: pairs}: an MMLU-like 5-shot subject and a HellaSwag-like 10-shot task."""
    ids = lambda n: rng.integers(3, vocab, size=n).tolist()  # noqa: E731
    mmlu_prefix = [1] + ids(600)
    mmlu = [(mmlu_prefix + q, [c]) for q in (ids(60) for _ in range(25)) for c in ids(4)]
    hs_prefix = [1] + ids(800)
    hs = [(hs_prefix + c, ids(20)) for c in (ids(40) for _ in range(25)) for _ in range(4)]
    return {"MMLU-like 5-shot (25 questions x 4 choices)": mmlu,
            "HellaSwag-like 10-shot (25 contexts x 4 endings)": hs}


def run_score(preset, args, rep, d, path, threads):
    from openelm_rt import Session
    rng = np.random.default_rng(3)
    with Session(path, threads=threads) as s:
        tasks = score_tasks(rng, s.vocab_size)
        s.score_batch(tasks[next(iter(tasks))][:4])  # warm-up
        rep.add(f"\n### score_batch ({os.path.basename(path)}, {threads} threads)\n")
        rep.add("| task | pairs | seconds | pairs/s | tokens requested | tokens forwarded | saved |")
        rep.add("|---|---|---|---|---|---|---|")
        for name, pairs in tasks.items():
            times = []
            for _ in range(args.repeats):
                time.sleep(args.settle)
                t0 = time.perf_counter()
                s.score_batch(pairs)
                times.append(time.perf_counter() - t0)
            st = s.last_score_stats
            sec = statistics.median(times)
            d.setdefault("score", {})[name] = {"seconds": sec, **st}
            rep.add(f"| {name} | {len(pairs)} | {sec:.2f} | {len(pairs) / sec:.1f} | {st['tokens_requested']} | "
                    f"{st['tokens_forwarded']} | {st['tokens_requested'] / st['tokens_forwarded']:.1f}x |")


def run_model(preset, args, rep, worker):
    d = rep.data["models"][preset] = {}
    m32 = ensure_random_model(preset, "f32", args.cache_dir)
    ours = {dt: ensure_random_model(preset, dt, args.cache_dir).path for dt in args.dtypes}
    ggufs = {}
    if worker:
        ftypes = [llama_side.LLAMA_TYPE[dt] for dt in args.dtypes]
        ggufs = llama_side.ensure_ggufs(worker, m32.checkpoint_dir, m32.tokenizer_path, m32.path, ftypes,
                                        max(args.threads))
    import json
    with open(os.path.join(m32.checkpoint_dir, "config.json"), encoding="utf-8") as f:
        flops = matmul_flops_per_token(json.load(f))
    rep.add(f"\n## OpenELM-{preset} (random weights)\n")
    backends = {t: _core.Backend("cpu", t) for t in args.threads}
    rng = np.random.default_rng(0)
    for dt in args.dtypes:
        model = _core.Model(ours[dt], False)
        wbytes = weight_bytes_per_token(model)
        ft = llama_side.LLAMA_TYPE[dt]
        if worker:
            n_ctx = max(args.batches) * (args.prompt + args.tg + 16)
            worker.call("load", path=ggufs[ft], n_ctx=n_ctx, n_batch=max(512, args.prompt),
                        n_seq=max(args.batches))
        res = {}
        for t, be in backends.items():  # warm-up: page the weights in, start the threads
            ours_step(model, be, 2, 16, 4, rng)
            time_prefill(model, be, 64, rng)
            if worker:
                worker.call("tgb", b=2, prompt=16, n=4, threads=t)
        for r in range(args.repeats):
            for t, be in backends.items():
                rr = res.setdefault(t, {"bw": [], "pp": []})
                rr["bw"].append(be.read_bandwidth(1 << 30, 3))
                time.sleep(args.settle)
                rr["pp"].append(time_prefill(model, be, 512, rng))
                for b in args.batches:
                    cell = rr.setdefault(b, {"step": [], "engine": [], "llama": []})
                    time.sleep(args.settle)
                    cell["step"].append(ours_step(model, be, b, args.prompt, args.tg, rng))
                    time.sleep(args.settle)
                    cell["engine"].append(ours_engine(model, be, b, args.prompt, args.tg, rng))
                    if worker:
                        time.sleep(args.settle)
                        cell["llama"].append(worker.call("tgb", b=b, prompt=args.prompt, n=args.tg, threads=t,
                                                         seed=int(rng.integers(1 << 30)))["tok_s"])
            log(f"{preset} {dt}: repeat {r + 1}/{args.repeats} done")
        med = lambda v: statistics.median(v) if v else None  # noqa: E731
        out = d.setdefault(dt, {})
        for t in args.threads:
            rr = res[t]
            bw, pp = med(rr["bw"]), med(rr["pp"])
            bound1 = bw / wbytes
            rep.add(f"\n### {dt} (llama.cpp {ft}), {t} thread(s): read {bw / 1e9:.1f} GB/s, weights "
                    f"{wbytes / 1e6:.0f} MB/token, batch-1 bound {bound1:.0f} tok/s; prefill pp512 {pp:.0f} tok/s "
                    f"({pp * flops / 1e9:.0f} GFLOP/s)\n")
            rep.add("| batch | ours step tok/s | × our batch 1 | ours engine tok/s | llama.cpp tok/s | "
                    "× llama.cpp | weight GB/s ours | % of min(B × bound, pp512) |")
            rep.add("|---|---|---|---|---|---|---|---|")
            base = med(rr[args.batches[0]]["step"])
            for b in args.batches:
                cell = rr[b]
                o, e, lm = med(cell["step"]), med(cell["engine"]), med(cell["llama"])
                cap = min(b * bound1, pp)
                rep.add(f"| {b} | {o:.1f} | {o / base:.2f} | {e:.1f} | "
                        + (f"{lm:.1f} | {o / lm:.2f} |" if lm else "— | — |")
                        + f" {o / b * wbytes / 1e9:.1f} | {o / cap:.0%} |")
                out[f"t{t}_b{b}"] = {"step": o, "engine": e, "llama": lm, "bound": b * bound1, "pp512": pp}
    if args.turn:
        dt = args.dtypes[0]
        t = max(args.threads)
        runs = [second_turn(ours[dt], t, args.turn1, args.turn2, np.random.default_rng(k), 32000)
                for k in range(args.repeats)]
        rs = {k: {f: statistics.median(r[k][f] for r in runs) for f in runs[0][k]} for k in runs[0]}
        d["second_turn"] = rs
        rep.add(f"\n### Second chat turn ({dt}, {t} threads): a {args.turn1}-token first turn and its 32-token "
                f"reply, then {args.turn2} new tokens; time to the next turn's first token\n")
        rep.add("| | seconds | tokens evaluated | prompt tokens | from the prefix cache |")
        rep.add("|---|---|---|---|---|")
        for k, name in (("reuse", "prefix reuse (default)"), ("no_reuse", "prefix_cache=0")):
            x = rs[k]
            rep.add(f"| {name} | {x['seconds']:.3f} | {x['evaluated']:.0f} | {x['prompt']:.0f} | {x['cached']:.0f} |")
    if args.score:
        run_score(preset, args, rep, d, ours[args.dtypes[0]], max(args.threads))
    if args.kv_layout:
        kv_layout(preset, args, rep, d, ours[args.dtypes[0]], backends[max(args.threads)])


def kv_layout(preset, args, rep, d, path, be):
    model = _core.Model(path, False)
    rng = np.random.default_rng(1)
    ctx = args.kv_context
    cases = [("f32", bs) for bs in args.block_sizes] + [("f16", 16)]
    res = {c: [] for c in cases}
    for r in range(args.repeats):
        for kvd, bs in cases:
            time.sleep(args.settle)
            res[(kvd, bs)].append(ours_step(model, be, 8, ctx, args.tg, rng, kv_dtype=kvd, block=bs))
    # f16 keys and values against f32: the logits of a long prompt, on these weights and on f32 ones
    ids = [1] + rng.integers(3, model.vocab_size, size=ctx - 1).tolist()
    errs = {}
    for name, mpath in ((args.dtypes[0], path), ("f32", ensure_random_model(preset, "f32", args.cache_dir).path)):
        m = _core.Model(mpath, False)
        rt32 = _core.Runtime(m, be, max_context=ctx)
        rt16 = _core.Runtime(m, be, max_context=ctx, kv_dtype="f16")
        l32 = rt32.eval([(rt32.seq_new(), ids, "all")])
        l16 = rt16.eval([(rt16.seq_new(), ids, "all")])
        errs[name] = (float(np.abs(l16 - l32).max() / np.abs(l32).max()), float(np.mean(l16.argmax(1) == l32.argmax(1))))
    d["kv_layout"] = {f"{k}_{b}": statistics.median(v) for (k, b), v in res.items()}
    d["kv_f16_error"] = errs
    rep.add(f"\n### KV layout ({args.dtypes[0]}, batch 8, context {ctx}, {be.threads} threads)\n")
    rep.add("| KV | block size | decode tok/s |")
    rep.add("|---|---|---|")
    for (kvd, bs), v in res.items():
        rep.add(f"| {kvd} | {bs} | {statistics.median(v):.1f} |")
    for name, (err, top1) in errs.items():
        rep.add(f"\nf16 keys/values against f32, {name} weights, over a {ctx}-token prompt: max |Δlogit| / "
                f"max |logit| = {err:.1e}, top-1 agreement {top1:.1%}.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["270M", "1_1B"], choices=("270M", "450M", "1_1B", "3B"))
    p.add_argument("--dtypes", nargs="+", default=["q8", "q4"], choices=("f16", "bf16", "q8", "q4"))
    p.add_argument("--threads", type=int, nargs="+", default=[2])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens of each sequence (default 64)")
    p.add_argument("--tg", type=int, default=32, help="decode steps timed (default 32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--settle", type=float, default=0.5, help="idle seconds before each timed run")
    p.add_argument("--no-llama", action="store_true", help="ours only")
    p.add_argument("--no-turn", dest="turn", action="store_false", help="skip the second-turn test")
    p.add_argument("--turn1", type=int, default=400, help="tokens of the first chat turn (default 400)")
    p.add_argument("--turn2", type=int, default=30, help="new tokens of the second turn (default 30)")
    p.add_argument("--score", action="store_true", help="also time score_batch on card-shaped requests")
    p.add_argument("--kv-layout", action="store_true", help="also time KV block sizes and f16 KV")
    p.add_argument("--block-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--kv-context", type=int, default=512, help="context for --kv-layout (default 512)")
    p.add_argument("--llama-venv", default=os.path.join(default_cache_dir(), "llama-venv"))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default=None, help="write PATH.json and PATH.md")
    args = p.parse_args(argv)
    rep = Report()
    rep.add("# Batched decode: openelm_rt" + ("" if args.no_llama else f" vs llama.cpp ({llama_side.LLAMA_CPP_PYTHON})"))
    load = os.getloadavg()[0]
    rep.add(f"\n{os.cpu_count()} CPUs, load average {load:.1f} at the start; prompt {args.prompt} tokens per "
            f"sequence, {args.tg} decode steps timed, medians of {args.repeats} interleaved repeats.")
    rep.data["setup"] = vars(args)
    t0 = time.time()
    if args.no_llama:
        for preset in args.models:
            run_model(preset, args, rep, None)
    else:
        python = llama_side.ensure_venv(args.llama_venv)
        with llama_side.LlamaWorker(python) as worker:
            for preset in args.models:
                run_model(preset, args, rep, worker)
    rep.data["seconds"] = time.time() - t0
    if args.out:
        rep.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
