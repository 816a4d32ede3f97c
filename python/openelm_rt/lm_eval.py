"""lm-evaluation-harness adapter: `lm_eval --model openelm_rt` (or `openelm-rt-eval`).

`OpenELMLM` implements lm-eval's TemplateLM over a `Session`, reproducing the rules of
lm-eval's `hf` model (0.4.13) so that the numbers are comparable with the OpenELM model
card's (`--model hf ... add_bos_token=True`): the continuation is tokenized in context,
BOS first, left truncation to `max_length`, `is_greedy` at every continuation position,
rolling log-likelihood windows from `lm_eval.utils`. What differs is the work done: all
log-likelihood requests go to `Session.score_batch` at once, which sorts them so that
neighbours share prefixes (the few-shot examples, a question's context for all its
choices), computes each shared prefix once, and takes the log-softmax only at continuation
positions; generation runs batched in the Session's engine with native stop strings.

Needs the optional extra: `pip install 'openelm_rt[eval]'`. Importing this module
registers the model name "openelm_rt" with lm-eval (after lm-eval's own models, so that
they stay visible in the same process).
"""

from __future__ import annotations

import os
import re
import sys

try:
    import lm_eval.models  # noqa: F401  (first: registering before it hides the built-in models)
    from lm_eval import utils as _lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"openelm_rt.lm_eval needs lm-evaluation-harness ({e}); install it with "
                      f"`pip install 'openelm_rt[eval]'`") from e

from tqdm import tqdm

from .session import Session

__all__ = ["OpenELMLM", "run_card", "CARD_RUNS", "main"]

# The Llama-2 tokenizer's special tokens: Hugging Face's tokenizer (what the `hf` model
# uses) splits a text at them and gives each its id, so a literal "</s>" in a prompt is
# the EOS token there; every text segment between them gets SentencePiece's dummy prefix.
_SPECIAL_TOKENS = ("<s>", "</s>", "<unk>")
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in _SPECIAL_TOKENS) + ")")

# Generation keywords a task may set (lm-eval's normalized names) and what they map to.
_GEN_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "min_p",
             "repetition_penalty")

# How many log-likelihood requests go to score_batch at a time: results reach lm-eval's
# cache and the progress bar after each chunk; one shared prefix is recomputed per chunk.
_SCORE_CHUNK = 512
_GEN_CHUNK = 64


def _as_bool(name, v):
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0"):
        return v.lower() in ("true", "1")
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise ValueError(f"{name} must be True or False, got {v!r}")


@register_model("openelm_rt")
class OpenELMLM(TemplateLM):
    """lm-eval model over an openelm_rt Session.

    Args (all also as `--model_args key=value,...`):
        pretrained: an .oelm file, a Hugging Face OpenELM checkpoint directory (exported
            once into the cache, see `openelm_rt.autoexport`), or an open `Session`.
        threads: worker threads (default: all cores).
        max_length: the longest input, L (default: the model's context, 2048 for OpenELM);
            longer requests are truncated from the left as `hf` does.
        add_bos_token: BOS first (default True, as the model card's recipe passes).
        rolling_bos: "hf" (default) reproduces lm-eval 0.4.13's `hf`, whose rolling
            log-likelihood encodes the document with BOS and so also scores log p(BOS | BOS)
            in the first window; "clean" scores the document's own tokens only.
        prefix_reuse: share prefixes across requests (default True); False scores each
            request on its own (same results; for checking and timing).
        dtype: weight type of the on-the-fly export of a checkpoint directory ("auto" keeps
            the checkpoint's; f32, f16, bf16, q8_0, q4_0).
        tokenizer: a tokenizer.model (or a directory holding one) for the on-the-fly export;
            the model card's `tokenizer=meta-llama/Llama-2-7b-hf` is accepted and means the
            tokenizer stored in the model (OpenELM's is Llama-2's).
        max_gen_toks: default most tokens to generate (256, as `hf`).
        kv_budget, kv_dtype, exact: passed to the Session (exact: default True, exact f32
            activations for bf16 weights; exact=False rounds them to bf16 for bf16 dot products).
        seed: base seed for sampled generation (do_sample=True tasks).
        batch_size, max_batch_size, device, trust_remote_code: accepted for the CLI's and the
            card's command lines; the runtime schedules its own batches on the CPU.
    """

    def __init__(self, pretrained=None, threads=None, max_length=None, add_bos_token=True, rolling_bos="hf",
                 prefix_reuse=True, dtype="auto", tokenizer=None, max_gen_toks=256, kv_budget=None,
                 kv_dtype="f32", exact=True, seed=1234, batch_size=None, max_batch_size=None, device=None,
                 trust_remote_code=None, **unknown):
        super().__init__()
        if unknown:
            known = ("pretrained, threads, max_length, add_bos_token, rolling_bos, prefix_reuse, dtype, tokenizer, "
                     "max_gen_toks, kv_budget, kv_dtype, exact, seed, batch_size, max_batch_size, device")
            raise ValueError(f"openelm_rt: unknown model argument(s) {', '.join(sorted(unknown))}; "
                             f"the arguments are: {known}")
        if pretrained is None:
            raise ValueError("openelm_rt: pass pretrained=PATH (an .oelm file or an OpenELM checkpoint directory), "
                             "e.g. --model_args pretrained=openelm-270m.oelm")
        if rolling_bos not in ("hf", "clean"):
            raise ValueError(f"rolling_bos must be 'hf' (lm-eval's hf model: the document is encoded with BOS and "
                             f"log p(BOS|BOS) is scored) or 'clean', got {rolling_bos!r}")
        self.add_bos_token = _as_bool("add_bos_token", add_bos_token)
        self.prefix_reuse = _as_bool("prefix_reuse", prefix_reuse)
        self.rolling_bos = rolling_bos
        self._seed = int(seed)
        self.max_gen_toks = int(max_gen_toks)
        if self.max_gen_toks < 1:
            raise ValueError(f"max_gen_toks must be >= 1, got {max_gen_toks}")
        self.batch_size_hint = batch_size
        if isinstance(pretrained, Session):
            self.session = pretrained
            self._owns_session = False
        else:
            path = os.fspath(pretrained)
            if os.path.isdir(path):
                from .autoexport import resolve_model

                path = resolve_model(path, dtype=dtype, tokenizer=tokenizer)
            elif tokenizer is not None and os.path.exists(os.fspath(tokenizer)):
                raise ValueError(f"tokenizer={tokenizer}: {path} is an .oelm file, which carries its own tokenizer; "
                                 f"tokenizer= applies to a checkpoint directory's export")
            elif dtype != "auto":
                raise ValueError(f"dtype={dtype} applies to a checkpoint directory's export; {path} is already "
                                 f"an .oelm file (export it again with openelm-rt-export --dtype to change it)")
            self.session = Session(path, threads=None if threads is None else int(threads),
                                   max_context=None if max_length is None else int(max_length),
                                   kv_budget=kv_budget, kv_dtype=kv_dtype, exact=_as_bool("exact", exact))
            self._owns_session = True
        self._init_tokenizer()
        self._max_length = self.session.max_context if max_length is None else int(max_length)
        if not 2 <= self._max_length <= self.session.max_context:
            raise ValueError(f"max_length {self._max_length} must be in [2, {self.session.max_context}] "
                             f"(the Session's context)")
        # Work done since construction, for benchmarks and tests (tokens: as score_batch counts them).
        self.stats = {"loglikelihood_requests": 0, "tokens_requested": 0, "tokens_forwarded": 0,
                      "generate_requests": 0}

    def _init_tokenizer(self):
        """The text tokenizer: the one stored in the .oelm (a subclass with its own tok_encode and
        tok_decode may replace this, e.g. for a model exported without a SentencePiece tokenizer)."""
        if not self.session.has_tokenizer:
            raise ValueError(f"{self.session.path} has no tokenizer; lm-eval passes text. Export the model with "
                             f"its tokenizer.model")
        self._tok = self.session._tokenizer("lm-eval")
        self._special_ids = {"<s>": self._tok.bos_id, "</s>": self._tok.eos_id, "<unk>": self._tok.unk_id}

    # -- TemplateLM's tokenization surface --------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.session.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.session.bos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return "openelm_rt:" + os.path.basename(self.session.path)

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs) -> list:
        """`hf`'s tok_encode: BOS first per add_special_tokens (default: add_bos_token), none when
        the string itself starts with "<s>"; special-token texts become their ids."""
        add = self.add_bos_token if add_special_tokens is None else bool(add_special_tokens)
        if add_special_tokens is None and string.startswith("<s>"):
            add = False
        ids = [self.session.bos_token_id] if add else []
        for part in _SPECIAL_RE.split(string):
            if not part:
                continue
            if part in self._special_ids:
                ids.append(self._special_ids[part])
            else:
                ids += self._tok.encode(part, False)
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens, skip_special_tokens=True) -> str:
        if isinstance(tokens, int):
            tokens = [tokens]
        if not skip_special_tokens:
            inv = {v: k for k, v in self._special_ids.items()}
            out, run = [], []
            for t in tokens:
                if t in inv:
                    out.append(self.session.detokenize(run) + inv[t])
                    run = []
                else:
                    run.append(t)
            return "".join(out) + self.session.detokenize(run)
        return self.session.detokenize(list(tokens))

    # -- scoring ------------------------------------------------------------------
    def _truncated_pair(self, ctx, cont):
        """`hf`'s input window: (ctx + cont)[-(L+1):][:-1] feeds the model and the last
        len(cont) positions are scored; as a (context, continuation) pair for score_batch."""
        if not cont:
            raise ValueError("a continuation encodes to no tokens; lm-eval's hf model rejects this too")
        if len(cont) > self.max_length:
            raise ValueError(f"a continuation has {len(cont)} tokens, more than max_length {self.max_length}; "
                             f"lm-eval's hf model cannot score it either (raise max_length)")
        whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
        return whole[:len(whole) - len(cont)], list(cont)

    def _score_pairs(self, pairs, pbar=None, on_chunk=None):
        """(sum of logprobs, is_greedy) for each (ctx, cont) pair, in order; with prefix reuse,
        the pairs go to score_batch in lexicographic order, a chunk at a time."""
        n = len(pairs)
        out = [None] * n
        if self.prefix_reuse:
            order = sorted(range(n), key=lambda i: pairs[i][0] + pairs[i][1])
            chunks = [order[i:i + _SCORE_CHUNK] for i in range(0, n, _SCORE_CHUNK)]
        else:
            chunks = [[i] for i in range(n)]
        for idx in chunks:
            res = self.session.score_batch([pairs[i] for i in idx])
            st = self.session.last_score_stats
            self.stats["tokens_requested"] += st["tokens_requested"]
            self.stats["tokens_forwarded"] += st["tokens_forwarded"]
            for i, r in zip(idx, res):
                out[i] = (r.total, r.is_greedy)
            if on_chunk is not None:
                on_chunk(idx, out)
            if pbar is not None:
                pbar.update(len(idx))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        pairs = [self._truncated_pair(ctx, cont) for _, ctx, cont in requests]
        self.stats["loglikelihood_requests"] += len(pairs)

        def cache(idx, out):
            for i in idx:
                key = requests[i][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, out[i])

        pbar = tqdm(total=len(pairs), disable=disable_tqdm, desc="Running loglikelihood requests")
        try:
            return self._score_pairs(pairs, pbar, cache)
        finally:
            pbar.close()

    def _rolling_windows(self, string):
        if self.rolling_bos == "hf":
            tokens = self.tok_encode(string)
        else:
            tokens = self.tok_encode(string, add_special_tokens=False)
        return list(map(_lm_utils.make_disjoint_window,
                        _lm_utils.get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id,
                                                            max_seq_len=self.max_length, context_len=1)))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        strings = [req.args[0] for req in requests]
        windows, owner = [], []
        for k, s in enumerate(strings):
            for w in self._rolling_windows(s):
                windows.append(self._truncated_pair(*w))
                owner.append(k)
        totals = [0.0] * len(strings)
        left = [0] * len(strings)
        for k in owner:
            left[k] += 1
        done = [False] * len(strings)

        def cache(idx, out):
            for i in idx:
                k = owner[i]
                totals[k] += out[i][0]
                left[k] -= 1
            for i in idx:
                k = owner[i]
                if left[k] == 0 and not done[k]:
                    done[k] = True
                    self.cache_hook.add_partial("loglikelihood_rolling", (strings[k],), totals[k])

        pbar = tqdm(total=len(windows), disable=disable_tqdm, desc="Running loglikelihood_rolling windows")
        try:
            self._score_pairs(windows, pbar, cache)
        finally:
            pbar.close()
        for k in range(len(strings)):
            if not done[k]:  # a document with no tokens: nothing to score
                self.cache_hook.add_partial("loglikelihood_rolling", (strings[k],), totals[k])
        return totals

    # -- generation -----------------------------------------------------------------
    def _gen_params(self, gen_kwargs):
        if not isinstance(gen_kwargs, dict):
            raise ValueError(f"generation kwargs must be a dict, got {type(gen_kwargs).__name__}")
        kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        unknown = sorted(set(kw) - set(_GEN_KEYS))
        if unknown:
            raise ValueError(f"openelm_rt: generation kwargs {unknown} are not supported; supported: "
                             f"{', '.join(_GEN_KEYS)}")
        until = handle_stop_sequences(kw.pop("until", None), eos=self.tok_decode(self.eot_token_id,
                                                                                   skip_special_tokens=False))
        max_gen = int(kw.pop("max_gen_toks"))
        max_ctx = self.max_length - max_gen
        if max_ctx <= 0:
            raise ValueError(f"max_gen_toks {max_gen} must be less than max_length {self.max_length}")
        sample = bool(kw.get("do_sample"))
        params = dict(max_new_tokens=max_gen, temperature=float(kw.get("temperature", 0.0)) if sample else 0.0,
                      top_p=float(kw.get("top_p", 1.0) if kw.get("top_p") is not None else 1.0),
                      top_k=int(kw.get("top_k") or 0), min_p=float(kw.get("min_p") or 0.0),
                      repetition_penalty=float(kw.get("repetition_penalty") or 1.0))
        return until, max_ctx, params

    def generate_until(self, requests, disable_tqdm: bool = False):
        args = [req.args for req in requests]
        self.stats["generate_requests"] += len(args)
        out = [None] * len(args)
        groups = {}
        for i, (ctx, gk) in enumerate(args):
            groups.setdefault(repr(sorted(gk.items())) if isinstance(gk, dict) else repr(gk), []).append(i)
        pbar = tqdm(total=len(args), disable=disable_tqdm, desc="Running generate_until requests")
        try:
            for idx in groups.values():
                until, max_ctx, params = self._gen_params(args[idx[0]][1])
                # Longest first, as hf does, so a run's tail is not one long prompt alone.
                idx = sorted(idx, key=lambda i: -len(args[i][0]))
                for c in range(0, len(idx), _GEN_CHUNK):
                    part = idx[c:c + _GEN_CHUNK]
                    prompts = [self.tok_encode(args[i][0], left_truncate_len=max_ctx) for i in part]
                    seeds = [self._seed + i for i in part] if params["temperature"] > 0 else None
                    res = self.session.generate_batch(prompts, stop=[list(until) for _ in part], seed=seeds,
                                                      **params)
                    for i, r in zip(part, res):
                        ids = r.token_ids
                        text = self.tok_decode(ids)
                        out[i] = postprocess_generated_text(text, until, None)
                        self.cache_hook.add_partial("generate_until", args[i], out[i])
                    pbar.update(len(part))
        finally:
            pbar.close()
        return out

    def __del__(self):
        try:
            if getattr(self, "_owns_session", False):
                self.session.close()
        except Exception:
            pass


# The OpenELM model card's lm-eval invocations, in the card's order: (num_fewshot, tasks).
# (The card's "Evaluate OpenELM" script: shot=0 ..., shot=5 mmlu,winogrande, shot=25
# arc_challenge,crows_pairs_english, shot=10 hellaswag.)
CARD_RUNS = (
    (0, ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "race", "winogrande", "sciq", "truthfulqa_mc2")),
    (5, ("mmlu", "winogrande")),
    (25, ("arc_challenge", "crows_pairs_english")),
    (10, ("hellaswag",)),
)

# The table's columns: lm-eval's metric keys (crows_pairs reports pct_stereotype, not acc).
_CARD_METRICS = (("acc", "acc,none"), ("acc_norm", "acc_norm,none"), ("pct_stereotype", "pct_stereotype,none"))


def run_card(lm, runs=CARD_RUNS, task_manager=None, limit=None, out=sys.stdout, **evaluate_kwargs):
    """The model card's evaluations with one model: each run of `runs` through
    lm_eval.simple_evaluate, then a table (task, shots, acc, acc_norm, pct_stereotype; in
    percent) of the tasks the runs name (a group such as mmlu: its aggregate) on `out`.
    Returns {(task, shots): lm-eval's result dict of that task}, subtasks included. The
    datasets must be in the Hugging Face cache (or reachable)."""
    import lm_eval as _lm_eval

    table, rows = {}, []
    for k, (shots, tasks) in enumerate(runs):
        print(f"[openelm-rt] card run {k + 1}/{len(runs)}: {shots}-shot {', '.join(tasks)}", file=sys.stderr,
              flush=True)
        res = _lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=shots, task_manager=task_manager,
                                       limit=limit, **evaluate_kwargs)
        found = {**res["results"], **res.get("groups", {})}  # a group's aggregate may be in either
        for task, r in found.items():
            table[(task, shots)] = r
        named = [t for t in tasks if t in found]
        rows += [(t, shots) for t in (named if len(named) == len(tasks) else found)]
    print("| task | shots | " + " | ".join(name for name, _ in _CARD_METRICS) + " |", file=out)
    print("|---|---|" + "---|" * len(_CARD_METRICS), file=out)
    for task, shots in rows:
        r = table[(task, shots)]
        cells = [f"{100 * r[m]:.2f}" if isinstance(r.get(m), float) else "-" for _, m in _CARD_METRICS]
        print(f"| {task} | {shots} | " + " | ".join(cells) + " |", file=out)
    return table


def _card_main(argv) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="openelm-rt eval --card",
                                description="The OpenELM model card's evaluation: " + "; ".join(
                                    f"{s}-shot {','.join(t)}" for s, t in CARD_RUNS) + ". Prints a table.")
    p.add_argument("--card", action="store_true", required=True)
    p.add_argument("--model_args", required=True, help="as for --model openelm_rt, e.g. pretrained=M.oelm")
    p.add_argument("--limit", type=float, default=None, help="documents per task (lm-eval's --limit)")
    p.add_argument("--output_path", default=None, help="also write the table and all results here as JSON")
    p.add_argument("--use_cache", default=None, help="lm-eval's request cache (a path prefix)")
    args = p.parse_args(argv)
    lm = OpenELMLM.create_from_arg_string(args.model_args)
    table = run_card(lm, limit=args.limit, use_cache=args.use_cache)
    if args.output_path:
        import json

        os.makedirs(args.output_path, exist_ok=True)
        with open(os.path.join(args.output_path, "card_results.json"), "w") as f:
            json.dump([{"task": t, "shots": s, "results": r} for (t, s), r in table.items()], f, indent=1,
                      default=str)
    return 0


def main(argv=None) -> int:
    """`openelm-rt-eval`: lm-eval's whole CLI with the openelm_rt model registered; `--model
    openelm_rt` is the default. `--card` runs the model card's evaluations (run_card)."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--card" in argv:
        return _card_main(argv)
    if argv and argv[0] in ("run", "ls", "validate"):
        sub, rest = argv[:1], argv[1:]
    else:
        sub, rest = [], argv
    if (not sub or sub == ["run"]) and not any(a == "--model" or a.startswith("--model=") for a in rest) \
            and not any(a in ("-h", "--help") for a in rest):
        rest = ["--model", "openelm_rt"] + rest
    old = sys.argv
    sys.argv = ["openelm-rt-eval"] + sub + rest
    try:
        cli_evaluate()
    finally:
        sys.argv = old
    return 0

