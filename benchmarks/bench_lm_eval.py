"""lm-eval end to end with `--model openelm_rt`: wall time and tokens forwarded, prefix reuse on vs off.

Card-shaped synthetic tasks (no download): HellaSwag-like 10-shot (a context, four
~20-word endings, acc_norm), ARC-like 25-shot ("Question: ...\\nAnswer:", four short
answers), MMLU-like 5-shot (four subjects, the first five dev questions as shots, answer
letters A-D), written as lm-eval task configs with local JSONL data, run through
`lm_eval.simple_evaluate` twice: with prefix reuse (the adapter's default) and without it.
Without reuse every request is forwarded whole, as lm-eval's `hf` model does, so its token
count is what `hf` forwards and the ratio is the work saved; the metrics must be identical.

    python benchmarks/bench_lm_eval.py [--model M.oelm] [--docs 100] [--threads 2]

Default model: the random OpenELM-270M of `openelm-rt demo` (built and cached if missing).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ("the of and to in is was for on that with as by at from his her they this which are be have an had "
         "one not but were all their when there been has more who would will she other its into time some what "
         "about so up out them can only new after people first many most then two these may over such well "
         "water because made between very through city during under world large three also state both each "
         "year use part place small while found where number government system could long before right school "
         "river light house play early began became several another group family country around known later "
         "against history during music power field form among story food study paper energy animal plant").split()


def _text(rng, lo, hi):
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi + 1))))


def write_tasks(d, docs, seed=0):
    """Task configs and data in d; returns the task names."""
    rng = np.random.default_rng(seed)

    def jsonl(name, rows):
        with open(os.path.join(d, name), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    def config(name, data, **kw):
        base = {"task": name, "dataset_path": "json", "output_type": "multiple_choice",
                "dataset_kwargs": {"data_files": {k: os.path.join(d, v) for k, v in data.items()}},
                "test_split": "test", "metadata": {"version": 1.0},
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in ("acc", "acc_norm")]}
        with open(os.path.join(d, name + ".yaml"), "w") as f:
            json.dump({**base, **kw}, f)  # JSON is YAML
        return name

    names = []
    hs = lambda n: [{"ctx": _text(rng, 25, 45), "endings": [_text(rng, 12, 28) for _ in range(4)],  # noqa: E731
                     "label": int(rng.integers(4))} for _ in range(n)]
    jsonl("hs_train.jsonl", hs(200))
    jsonl("hs_test.jsonl", hs(docs))
    names.append(config("hellaswag_like", {"train": "hs_train.jsonl", "test": "hs_test.jsonl"},
                        training_split="train", fewshot_split="train", num_fewshot=10,
                        doc_to_text="{{ctx}}", doc_to_target="label", doc_to_choice="endings"))
    arc = lambda n: [{"question": _text(rng, 10, 25), "choices": [_text(rng, 1, 6) for _ in range(4)],  # noqa: E731
                      "label": int(rng.integers(4))} for _ in range(n)]
    jsonl("arc_train.jsonl", arc(200))
    jsonl("arc_test.jsonl", arc(docs))
    names.append(config("arc_like", {"train": "arc_train.jsonl", "test": "arc_test.jsonl"},
                        training_split="train", fewshot_split="train", num_fewshot=25,
                        doc_to_text="Question: {{question}}\nAnswer:", doc_to_target="label",
                        doc_to_choice="choices"))
    subjects = ("anatomy", "astronomy", "virology", "world_religions")[:max(1, min(4, docs))]  # none empty
    for k, subj in enumerate(subjects):
        n = docs // len(subjects) + (1 if k < docs % len(subjects) else 0)
        mm = lambda n: [{"question": _text(rng, 10, 30), "choices": [_text(rng, 1, 8) for _ in range(4)],  # noqa: E731
                         "answer": int(rng.integers(4))} for _ in range(n)]
        jsonl(f"mmlu_{subj}_dev.jsonl", mm(5))
        jsonl(f"mmlu_{subj}_test.jsonl", mm(n))
        names.append(config(
            f"mmlu_like_{subj}", {"dev": f"mmlu_{subj}_dev.jsonl", "test": f"mmlu_{subj}_test.jsonl"},
            fewshot_split="dev", num_fewshot=5, fewshot_config={"sampler": "first_n"},
            description=f"The following are multiple choice questions (with answers) about {subj.replace('_', ' ')}.\n\n",
            doc_to_text="{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                        "D. {{choices[3]}}\nAnswer:",
            doc_to_choice=["A", "B", "C", "D"], doc_to_target="answer"))
    return names


def run(model, names, tasks_dir, threads, reuse):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from openelm_rt.lm_eval import OpenELMLM

    out = {}
    for group, members in (("hellaswag_like", ["hellaswag_like"]), ("arc_like", ["arc_like"]),
                           ("mmlu_like", [n for n in names if n.startswith("mmlu_like")])):
        lm = OpenELMLM(pretrained=model, threads=threads, prefix_reuse=reuse)
        tm = TaskManager(include_path=tasks_dir, include_defaults=False)
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(model=lm, tasks=members, task_manager=tm, bootstrap_iters=0,
                                      verbosity="ERROR")
        wall = time.perf_counter() - t0
        metrics = {t: {k: v for k, v in res["results"][t].items() if k.endswith(",none") and "stderr" not in k}
                   for t in members}
        out[group] = {"wall_s": wall, "requests": lm.stats["loglikelihood_requests"],
                      "tokens_requested": lm.stats["tokens_requested"],
                      "tokens_forwarded": lm.stats["tokens_forwarded"], "metrics": metrics}
        lm.session.close()
        print(f"  {group:15s} reuse={reuse!s:5s} {wall:7.1f} s  {out[group]['requests']} requests  "
              f"{out[group]['tokens_forwarded']} of {out[group]['tokens_requested']} tokens forwarded",
              file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="an .oelm file (default: the demo's random OpenELM-270M, f32)")
    p.add_argument("--docs", type=int, default=100, help="test documents per task (default 100, as the issue)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-off", dest="off", action="store_false", help="skip the run without prefix reuse")
    p.add_argument("--out", default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    model = args.model
    if model is None:
        from openelm_rt.demo import ensure_random_model
        model = ensure_random_model("270M", "f32").path
    with tempfile.TemporaryDirectory() as d:
        os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(d, "hf_datasets"))
        names = write_tasks(d, args.docs)
        print(f"model {model}, {args.docs} docs per task, {args.threads} threads", file=sys.stderr)
        on = run(model, names, d, args.threads, True)
        off = run(model, names, d, args.threads, False) if args.off else None
    print("| task (shots) | requests | tokens forwarded, reuse | per-request (hf) | ratio | wall, reuse | "
          "wall, no reuse | speed-up | metrics equal |")
    print("|---|---|---|---|---|---|---|---|---|")
    shots = {"hellaswag_like": 10, "arc_like": 25, "mmlu_like": 5}
    for g, r in on.items():
        o = off[g] if off else None
        print(f"| {g} ({shots[g]}) | {r['requests']} | {r['tokens_forwarded']} | {r['tokens_requested']} | "
              f"{r['tokens_requested'] / r['tokens_forwarded']:.2f}x | {r['wall_s']:.1f} s | "
              + (f"{o['wall_s']:.1f} s | {o['wall_s'] / r['wall_s']:.2f}x | {o['metrics'] == r['metrics']} |"
                 if o else "- | - | - |"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": model, "docs": args.docs, "threads": args.threads, "reuse": on, "no_reuse": off}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
