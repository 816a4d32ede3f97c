"""Speculative generation on this machine: the verify-cost curve, and decode speed with prompt
lookup and with an assistant model against plain greedy decoding, on the trained stand-in
(SmolLM2-135M-Instruct as an OpenELM file, benchmarks/standin.py) or any .oelm files.

    python benchmarks/bench_speculative.py [--dtypes q8 f32] [--threads 2] [--reps 3]
        [--max-new-tokens 96] [--curve-only] [--prompts NAME ...]

1. Cost curve: seconds of a step of k tokens (k = 1..16) over a 1-token step, on a sequence
   holding a 64-token prompt; median of --reps runs, the k interleaved within each run.
2. Decode tokens/s (median of --reps, configurations interleaved within each rep) and the
   acceptance of: plain greedy; prompt lookup (adaptive default, and HF's fixed 10 tokens);
   draft = target (the mechanism's ceiling, acceptance 1: adaptive and HF's 20 tokens; no
   smaller model shares the stand-in's tokenizer here). Prompts are input-grounded (the answer copies from
   the prompt) plus one open-ended prompt, where proposals mostly fail: the adaptive mode must
   then be no slower than plain decoding. Every speculative output is checked to equal the
   plain greedy output token for token.
The first speculative call of a Session measures its cost curve; each Session is warmed up with
one such call before timing, and that one-off measurement (printed) is not in the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import openelm_rt  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. The dog, annoyed, moves to the other side of "
        "the garden and falls asleep under the apple tree, where the fox cannot reach him.")
CODE = ("def moving_average(values, window):\n    result = []\n    for i in range(len(values) - window + 1):\n"
        "        chunk = values[i:i + window]\n        result.append(sum(chunk) / window)\n    return result\n")
PROMPTS = {
    "repeat-with-change": f"Repeat the following text, replacing 'fox' by 'cat':\n\n{TEXT}",
    "code-edit": f"Rename the function to `rolling_mean` and the variable `chunk` to `part`:\n\n{CODE}",
    "summarise": f"Summarise in one sentence, using the text's own words:\n\n{TEXT} {TEXT}",
    "open-ended": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def chat_ids(tok, user):
    """SmolLM2-Instruct's ChatML prompt."""
    text = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    return tok.encode(text).ids


def cost_curve(s, reps, kmax=16):
    rt = s._rt
    seq = rt.seq_new()
    try:
        rt.eval([(seq, [1] * 64, "none")])
        times = {k: [] for k in range(1, kmax + 1)}
        for _ in range(reps):
            for k in range(1, kmax + 1):
                f = rt.seq_fork(seq)
                t0 = time.perf_counter()
                rt.eval([(f, [1] * k, "all")])
                times[k].append(time.perf_counter() - t0)
                rt.seq_free(f)
        med = {k: statistics.median(v) for k, v in times.items()}
        return {k: med[k] / med[1] for k in med}, med[1]
    finally:
        rt.seq_free(seq)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="*", default=["q8"], help="stand-in weight types (default q8)")
    ap.add_argument("--threads", type=int, nargs="*", default=[2])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--curve-only", action="store_true")
    ap.add_argument("--prompts", nargs="*", default=list(PROMPTS), choices=list(PROMPTS))
    args = ap.parse_args(argv)

    import standin
    st = standin.ensure_standin(dtypes=tuple(args.dtypes))
    tok = st.tokenizer()
    models = {dt: st.oelm[dt] for dt in args.dtypes}
    prompts = {name: chat_ids(tok, PROMPTS[name]) for name in args.prompts}

    for threads in args.threads:
        for dt, path in models.items():
            with openelm_rt.Session(path, threads=threads, max_context=2048) as s:
                curve, t1 = cost_curve(s, args.reps)
                print(f"\n== stand-in {dt}, {threads} thread(s): step of k tokens / step of 1 token "
                      f"(1-token step {t1 * 1e3:.1f} ms)")
                print("  " + "  ".join(f"k={k}:{r:.2f}" for k, r in curve.items()))
                if args.curve_only:
                    continue
                t0 = time.perf_counter()
                s.generate(prompts[args.prompts[0]], max_new_tokens=4, prompt_lookup_num_tokens=10)
                print(f"  (the first speculative call measured the Session's cost curve: "
                      f"{time.perf_counter() - t0:.2f} s, with a 4-token generation; decode tok/s below)")
                configs = {
                    "plain": {},
                    "lookup adaptive": dict(prompt_lookup_num_tokens=10),
                    "lookup hf N=10": dict(prompt_lookup_num_tokens=10, speculation="hf"),
                    "draft=target adaptive": dict(assistant_model=s),
                    "draft=target hf 20": dict(assistant_model=s, speculation="hf"),
                }
                for name, ids in prompts.items():
                    rates = {c: [] for c in configs}
                    acc = {}
                    ref = None
                    for _ in range(args.reps):
                        for c, kw in configs.items():
                            r = s.generate(ids, max_new_tokens=args.max_new_tokens, **kw)
                            if ref is None:
                                ref = r.token_ids
                            elif r.token_ids != ref:
                                raise SystemExit(f"MISMATCH: {c} on {name} differs from plain greedy")
                            rates[c].append(r.decode_tokens_per_s)
                            if r.speculation:
                                sp = r.speculation
                                acc[c] = (sp["accepted"], sp["proposed"], sp["steps"])
                    base = statistics.median(rates["plain"])
                    print(f"  {name} ({len(ids)} prompt tokens, {len(ref)} generated):")
                    for c in configs:
                        m = statistics.median(rates[c])
                        extra = ""
                        if c in acc:
                            a, p, n = acc[c]
                            extra = f"  accepted {a}/{p} ({a / p:.0%})" if p else "  no proposals checked"
                            extra += f", {n} steps"
                        print(f"    {c:24s} {m:7.1f} tok/s  x{m / base:.2f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
