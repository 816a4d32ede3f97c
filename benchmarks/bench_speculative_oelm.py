"""Speculative generation on OpenELM-shaped models (the random-weight 270M and 1.1B exports in
~/.cache/openelm_rt, or any .oelm files): the verify-cost curve, the mechanism's ceiling, an
assistant model, and the adaptive default's "never slower" check. Random weights accept almost
no real proposal, so the ceiling uses an oracle: the n-gram corpus holds the plain greedy output
itself (the Session's n-gram history holds it 4 times), so nearly every proposal holds
(acceptance ~1: what draft = target would give if drafting were free).

    python benchmarks/bench_speculative_oelm.py curve --models 270M-q8 1_1B-q8 --threads 1 2
    python benchmarks/bench_speculative_oelm.py decode --target 1_1B-q8 [--assistant 270M-q8]

curve: seconds of a step of k tokens (k = 1..16) over a 1-token step, on a sequence holding a
    64-token prompt; median of --reps runs, the k interleaved within each run.
decode: decode tokens/s (median of --reps, configurations interleaved) of plain greedy; the
    oracle n-gram history (adaptive; and a fixed 10 tokens, HF-style); the assistant (adaptive; HF's 20
    tokens, constant); draft = target (adaptive; HF 20); and the adaptive default with every
    proposer on a prompt where no proposal holds (the "never slower than 2 %" check). Every
    output is checked equal to plain greedy token for token. Models are NAME-DTYPE of the cache
    (270M-q8, 1_1B-f16, ...) or .oelm paths; f16 files are exported from the cached random
    checkpoints on first use.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import openelm_rt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_speculative import cost_curve  # noqa: E402

CACHE = os.path.expanduser(os.environ.get("OPENELM_RT_CACHE", "~/.cache/openelm_rt"))
TOKENIZER = os.path.join(CACHE, "tokenizer-stdlib-32000.model")


def resolve(name: str) -> str:
    """NAME-DTYPE of a cached random model (exported on first use), or a path."""
    if os.path.exists(name):
        return name
    size, dt = name.rsplit("-", 1)
    ck = os.path.join(CACHE, f"random-openelm-{size}")
    pattern = {"f32": "f32", "f16": "f16", "q8": "q8_b32r16i", "q4": "q4_b32r16i"}[dt]
    path = os.path.join(CACHE, f"random-openelm-{size}-{pattern}-tok299a54ad.oelm")
    if not os.path.exists(path):
        from openelm_rt.export import export_checkpoint
        print(f"exporting {ck} as {dt} -> {path}", file=sys.stderr, flush=True)
        export_checkpoint(ck, path, dtype=dt, tokenizer=TOKENIZER)
    return path


def cmd_curve(args):
    print("| model | threads | 1-token step | " + " | ".join(f"k={k}" for k in range(2, 17)) + " |")
    print("|---|---|---|" + "---|" * 15)
    for name in args.models:
        path = resolve(name)
        for threads in args.threads:
            with openelm_rt.Session(path, threads=threads, max_context=256, max_batch=1) as s:
                curve, t1 = cost_curve(s, args.reps)
            print(f"| {name} | {threads} | {t1 * 1e3:.1f} ms | " +
                  " | ".join(f"{curve[k]:.2f}" for k in range(2, 17)) + " |", flush=True)


def cmd_decode(args):
    target = openelm_rt.Session(resolve(args.target), threads=args.threads, max_context=1024)
    assistant = openelm_rt.Session(resolve(args.assistant), threads=args.threads, max_context=1024) \
        if args.assistant else None
    prompt = target.tokenize("The history of the lighthouse begins with the ancient harbours of the Mediterranean, "
                             "where fires burned on hilltops to guide ships home.")
    n = args.max_new_tokens
    ref = target.generate(prompt, max_new_tokens=n)
    # warm-ups: the cost curves of both Sessions are measured once (not in the figures)
    t0 = time.perf_counter()
    target.generate(prompt, max_new_tokens=4, prompt_lookup_num_tokens=10)
    if assistant is not None:
        target.generate(prompt, max_new_tokens=4, assistant_model=assistant)
    print(f"(cost-curve calibration of the Sessions: {time.perf_counter() - t0:.2f} s with two 4-token runs)")
    configs = {
        "plain": {},
        "oracle adaptive": dict(ngram_cache=True),
        "oracle hf N=10": dict(ngram_cache=True, ngram_num_tokens=10, speculation="hf"),
        "draft=target adaptive": dict(assistant_model=target, ngram_cache=False),
        "draft=target hf 20": dict(assistant_model=target, speculation="hf"),
        # no proposal holds on random weights here: the adaptive default must cost nothing
        "default, all proposers": dict(prompt_lookup_num_tokens=10,
                                       **(dict(assistant_model=assistant) if assistant else {})),
    }
    if assistant is not None:
        configs["assistant adaptive"] = dict(assistant_model=assistant, ngram_cache=False)
        configs["assistant hf 20"] = dict(assistant_model=assistant, speculation="hf")
    rates = {c: [] for c in configs}
    acc = {}
    for _ in range(args.reps):
        for c, kw in configs.items():
            # a fresh n-gram history per run: earlier runs of the same prompt must not help
            target._ngram_history = type(target._ngram_history)()
            if c.startswith("oracle"):  # the oracle: the Session has generated this text 4 times
                for _ in range(4):
                    target._ngram_history.record(prompt + ref.token_ids)
            r = target.generate(prompt, max_new_tokens=n, **kw)
            if r.token_ids != ref.token_ids:
                raise SystemExit(f"MISMATCH: {c} differs from plain greedy")
            rates[c].append(r.decode_tokens_per_s)
            if r.speculation:
                sp = r.speculation
                acc[c] = (sp["accepted"], sp["proposed"], sp["steps"])
    base = statistics.median(rates["plain"])
    print(f"target {args.target}, assistant {args.assistant}, {args.threads} threads, {len(prompt)} prompt "
          f"tokens, {n} generated, median of {args.reps}:")
    print("| configuration | decode tok/s | vs plain | accepted/proposed | steps |")
    print("|---|---|---|---|---|")
    for c in configs:
        m = statistics.median(rates[c])
        a, p, st = acc.get(c, (0, 0, len(ref.token_ids)))
        ap = f"{a}/{p} ({a / p:.0%})" if p else "-"
        print(f"| {c} | {m:.1f} | x{m / base:.2f} | {ap} | {st} |", flush=True)
    target.close()
    if assistant is not None:
        assistant.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("curve")
    c.add_argument("--models", nargs="+", default=["270M-q8", "1_1B-q8"])
    c.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    c.add_argument("--reps", type=int, default=3)
    d = sub.add_parser("decode")
    d.add_argument("--target", default="1_1B-q8")
    d.add_argument("--assistant", default=None)
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--reps", type=int, default=3)
    d.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args(argv)
    return cmd_curve(args) if args.cmd == "curve" else cmd_decode(args)


if __name__ == "__main__":
    sys.exit(main())
