"""Speculative generation: prompt lookup and an assistant (draft) model, lossless.

A plain decode step reads all the weights to produce one token. Here a proposer guesses the
next k tokens (an earlier occurrence of the last n-gram, as Hugging Face's prompt lookup, or a
smaller model's greedy continuation), and one target step over the last token plus the k
guesses yields k + 1 rows of logits; each row is sampled exactly as the engine samples it
(same `Sampler`, same history) and guesses are kept while they match. The sequence's KV cache
(and the assistant's) is then truncated to what was accepted. The runtime computes a row the
same way whatever else is in its step (docs/ARCHITECTURE.md), so greedy output, and seeded
sampling with prompt lookup, are the plain generation's tokens, bit for bit. Sampling with an
assistant uses the speculative-sampling rule (accept with probability min(1, p/q), else draw
from norm(max(0, p - q))), which preserves the target's distribution.

On a CPU a k-token step is not free, so by default ("adaptive") the number of tokens checked
per step is chosen from the verify-cost curve measured on this Session and the running
acceptance rate, and is 0 (a plain step) when speculating would not pay. speculation="hf"
reproduces Hugging Face's fixed schedules instead.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from . import _core

MODES = ("adaptive", "hf")
SCHEDULES = ("constant", "heuristic")
# Hugging Face >= 4.45 defaults (GenerationConfig): 20 tokens, constant, 0.4.
HF_NUM_ASSISTANT_TOKENS = 20
# The adaptive mode's cap on tokens checked per step (the cost curve is measured up to it).
ADAPTIVE_MAX_TOKENS = 16
# Points of the measured cost curve (step sizes, in tokens); the rest is interpolated.
_CURVE_POINTS = (1, 2, 3, 5, 9, 17)
# Speculate only when the expected speed-up over a plain step is at least this (noise margin).
_MIN_GAIN = 1.03
# Acceptance statistics decay per observation, so the estimate follows the text.
_DECAY = 0.95
# With an assistant and speculation off, probe with one draft token every this many steps.
_PROBE_EVERY = 16


@dataclass
class SpeculationOptions:
    """Checked speculation arguments of Session.generate."""

    mode: str = "adaptive"
    prompt_lookup_num_tokens: Optional[int] = None
    max_matching_ngram_size: int = 2
    assistant: object = None  # an open Session
    num_assistant_tokens: Optional[int] = None
    num_assistant_tokens_schedule: str = "constant"
    assistant_confidence_threshold: float = 0.4
    ngram_cache: bool = False
    ngram_num_tokens: Optional[int] = None
    ngram_static: object = None  # an NgramCache of the user's corpus, or None


# ------------------------------------------------------------------------------ proposers

class PromptLookup:
    """Hugging Face's PromptLookupCandidateGenerator rule, O(1) per step.

    HF searches the whole sequence for n = min(max_ngram, L - 1) down to 1: the left-most
    earlier occurrence of the last n tokens that has a non-empty continuation gives up to
    `num_tokens` following tokens (never past the end), cut before the first EOS; the first
    n that matches ends the search (an EOS right after the match means no proposal). The
    left-most occurrence is the first one, so keeping the first start position of every
    n-gram as tokens are appended answers the same question without a scan: the match is
    usable exactly when that first position is not the suffix itself.
    """

    def __init__(self, max_ngram: int, eos_token_id: int):
        self.max_ngram = max_ngram
        self.eos = eos_token_id
        self.tokens: List[int] = []
        self._first = [None] + [dict() for _ in range(max_ngram)]  # n -> {n-gram: first start}

    def extend(self, toks):
        t = self.tokens
        for x in toks:
            t.append(x)
            L = len(t)
            for n in range(1, min(self.max_ngram, L) + 1):
                self._first[n].setdefault(tuple(t[L - n:]), L - n)

    def propose(self, num_tokens: int) -> List[int]:
        t = self.tokens
        L = len(t)
        for n in range(min(self.max_ngram, L - 1), 0, -1):
            i = self._first[n][tuple(t[L - n:])]
            if i < L - n:
                out = t[i + n:min(i + n + num_tokens, L)]
                if self.eos in out:
                    out = out[:out.index(self.eos)]
                return out
        return []


class DraftModel:
    """An assistant Session's sequence: proposes greedily (or by sampling its own processed
    distribution when the target samples), and keeps its KV cache in step with the target's
    tokens by truncating to their common prefix."""

    def __init__(self, assistant, params):
        self.s = assistant
        self.rt = assistant._rt
        self.seq = self.rt.seq_new()
        self.kv: List[int] = []  # tokens whose keys and values the draft sequence holds
        self.greedy = params["temperature"] == 0.0
        p = params
        # The draft's own processing: the target's parameters (HF runs the assistant with the
        # target's logits processors); greedy drafts take the argmax of the penalised logits.
        self.sampler = _core.Sampler(p["temperature"], p["top_k"], p["top_p"], p["min_p"],
                                     p["repetition_penalty"], 0)
        self.conf = _core.Sampler(1.0, 0, 1.0, 0.0, p["repetition_penalty"], 0)
        self.step_seconds = None  # EMA of one draft decode step

    def close(self):
        if self.seq is not None and self.s._rt is not None:
            self.rt.seq_free(self.seq)
        self.seq = None

    def prefill(self, tokens):
        """Evaluate all of `tokens` but the last (the prompt's processing, timed as prefill)."""
        if len(tokens) > 1 and not self.kv:
            self.rt.eval([(self.seq, tokens[:-1], "none")])
            self.kv = list(tokens[:-1])

    def sync(self, tokens):
        """Truncate the draft's cache to its common prefix with `tokens` (what the target kept);
        returns the tokens still to feed it (at least the last one, whose logits are needed)."""
        c = 0
        n = min(len(self.kv), len(tokens) - 1)
        while c < n and self.kv[c] == tokens[c]:
            c += 1
        if c < len(self.kv):
            self.rt.seq_truncate(self.seq, c)
            del self.kv[c:]
        return list(tokens[c:])

    def propose(self, tokens, k, threshold, uniform):
        """Up to k draft tokens after `tokens`, and for sampling the distribution each was
        drawn from. Stops early when the draft's probability of its token is below threshold."""
        feed = self.sync(tokens)
        hist = list(tokens)
        out, qs = [], []
        for _ in range(k):
            t0 = time.perf_counter()
            row = self.rt.eval([(self.seq, feed, "last")])[0]
            dt = time.perf_counter() - t0
            if len(feed) <= 2:
                self.step_seconds = dt if self.step_seconds is None else 0.8 * self.step_seconds + 0.2 * dt
            self.kv += feed
            if self.greedy:
                tok = self.sampler.sample(row, hist)
                conf = float(self.conf.probs(row, hist)[tok]) if threshold > 0 else 1.0
                qs.append(None)
            else:
                q = self.sampler.probs(row, hist).astype(np.float64)
                tok = _draw(q, uniform())
                conf = q[tok]
                qs.append(q)
            out.append(tok)
            hist.append(tok)
            feed = [tok]
            if conf < threshold:
                break
        return out, qs


# ------------------------------------------------------------------------------ n-gram cache

# llama.cpp's lookup decoding (common/ngram-cache.{h,cpp}): n-grams of 1 to 4 tokens in the
# context and dynamic caches, 2 in the static (corpus) cache.
NGRAM_MIN, NGRAM_MAX, NGRAM_STATIC = 1, 4, 2
# Its thresholds per n-gram size (index n - 1): the fewest observations of the n-gram and the
# least share (percent) of its most frequent follower for a token to be drafted. "Lax" for the
# context cache (this sequence), "strict" for the dynamic one (earlier generations).
_LAX_SAMPLES, _LAX_PERCENT = (2, 2, 1, 1), (66, 50, 50, 50)
_STRICT_SAMPLES, _STRICT_PERCENT = (4, 3, 2, 2), (75, 66, 66, 66)
# The dynamic cache covers the Session's last this many tokens (prompts and generations).
NGRAM_HISTORY_TOKENS = 1 << 16


class NgramCache:
    """Counts of the tokens that followed each n-gram (ngram_min..ngram_max tokens) in some
    token sequences: llama.cpp's common_ngram_cache. `add` counts a sequence, `remove`
    uncounts it. Build one from a corpus once and pass it as `ngram_corpus=` to reuse it."""

    def __init__(self, ngram_min: int = NGRAM_STATIC, ngram_max: int = NGRAM_STATIC):
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {ngram_min}, {ngram_max}")
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self.counts: Dict[tuple, Dict[int, int]] = {}

    def add(self, ids, start: int = 0, sign: int = 1):
        """Count the follower of every n-gram of `ids` whose follower is at position >= start."""
        c = self.counts
        lo, hi = self.ngram_min, self.ngram_max
        for i in range(max(start, lo), len(ids)):
            tok = ids[i]
            for n in range(lo, min(hi, i) + 1):
                key = tuple(ids[i - n:i])
                part = c.get(key)
                if part is None:
                    if sign < 0:
                        continue
                    part = c[key] = {}
                v = part.get(tok, 0) + sign
                if v > 0:
                    part[tok] = v
                else:
                    part.pop(tok, None)
                    if not part:
                        del c[key]
        return self

    def remove(self, ids):
        return self.add(ids, sign=-1)

    def __len__(self):
        return len(self.counts)


class NgramHistory:
    """The Session's dynamic n-gram cache: every sequence generated on the Session (prompt and
    output) is recorded, the last NGRAM_HISTORY_TOKENS tokens are counted. Recording costs an
    append; the counts are built when a generation first uses them and kept up to date after."""

    def __init__(self, limit: int = NGRAM_HISTORY_TOKENS):
        self.limit = limit
        self.seqs = deque()
        self.total = 0
        self._cache: Optional[NgramCache] = None
        self._ops = []  # (sign, ids) not yet applied to _cache

    def record(self, ids):
        ids = list(ids[-self.limit:])
        if len(ids) < 2:
            return
        self.seqs.append(ids)
        self.total += len(ids)
        if self._cache is not None:
            self._ops.append((1, ids))
        while self.total > self.limit:
            old = self.seqs.popleft()
            self.total -= len(old)
            if self._cache is not None:
                self._ops.append((-1, old))

    def cache(self) -> NgramCache:
        if self._cache is None:
            self._cache = NgramCache(NGRAM_MIN, NGRAM_MAX)
            for ids in self.seqs:
                self._cache.add(ids)
        for sign, ids in self._ops:
            self._cache.add(ids, sign=sign)
        self._ops = []
        return self._cache


def _try_draft(cache: NgramCache, tail, part_static, min_samples, min_percent):
    """llama.cpp's try_draft on a context or dynamic cache: the longest n-gram ending the
    sequence whose most frequent follower (weighted by the static cache's count of it, when the
    static cache knows the 2-gram) passes the thresholds for n. Ties go to the lowest id."""
    for n in range(min(cache.ngram_max, len(tail)), cache.ngram_min - 1, -1):
        part = cache.counts.get(tuple(tail[-n:]))
        if not part:
            continue
        best_tok, best_c, best_s, total = None, 0, 0, 0
        for tok, c in part.items():
            s = 100 * part_static[tok] if part_static and tok in part_static else 1
            if c * s > best_c * best_s or (c * s == best_c * best_s and best_tok is not None and tok < best_tok):
                best_tok, best_c, best_s = tok, c, s
            total += c
        if total < min_samples[n - 1] or 100 * best_c < min_percent[n - 1] * total:
            continue
        return best_tok
    return None


def _try_draft_static(part_static):
    if not part_static:
        return None
    total = sum(part_static.values())
    tok, c = min(part_static.items(), key=lambda kv: (-kv[1], kv[0]))
    if total < _LAX_SAMPLES[NGRAM_STATIC - 1] or 100 * c < _LAX_PERCENT[NGRAM_STATIC - 1] * total:
        return None
    return tok


class NgramLookup:
    """llama.cpp's lookup decoding (common_ngram_cache_draft): drafts one token at a time from
    the n-gram counts of this sequence (the context cache, lax thresholds), then of earlier
    generations on the Session (the dynamic cache, strict thresholds), then of a user corpus
    (the static cache, 2-grams); the static counts also weight the candidates of the other two.
    Stops at the first position none of them is confident about, or after an EOS."""

    def __init__(self, eos_token_id: int, dynamic: Optional[NgramCache], static: Optional[NgramCache]):
        self.eos = eos_token_id
        self.context = NgramCache(NGRAM_MIN, NGRAM_MAX)
        self.dynamic = dynamic if dynamic is not None and dynamic.counts else None
        self.static = static if static is not None and static.counts else None
        self.tokens: List[int] = []

    def extend(self, toks):
        n0 = len(self.tokens)
        self.tokens.extend(toks)
        self.context.add(self.tokens, start=n0)

    def propose(self, num_tokens: int) -> List[int]:
        if len(self.tokens) < NGRAM_STATIC:
            return []
        tail = self.tokens[-NGRAM_MAX:]
        out: List[int] = []
        while len(out) < num_tokens:
            part_static = self.static.counts.get(tuple(tail[-NGRAM_STATIC:])) if self.static else None
            tok = _try_draft(self.context, tail, part_static, _LAX_SAMPLES, _LAX_PERCENT)
            if tok is None and self.dynamic is not None:
                tok = _try_draft(self.dynamic, tail, part_static, _STRICT_SAMPLES, _STRICT_PERCENT)
            if tok is None:
                tok = _try_draft_static(part_static)
            if tok is None:
                break
            out.append(tok)
            if tok == self.eos:
                break
            tail = tail[1:] + [tok] if len(tail) >= NGRAM_MAX else tail + [tok]
        return out


def _draw(w, u):
    """Index drawn from the non-negative weights w with the uniform u in [0, 1)."""
    cum = np.cumsum(w)
    i = int(np.searchsorted(cum, u * cum[-1], side="right"))
    if i >= len(w) or w[i] == 0:  # u in the rounding slack at the top: the last allowed index
        i = int(np.flatnonzero(w)[-1])
    return i


# ------------------------------------------------------------------------------ cost model

def measure_cost_curve(rt, seq, token, reps=2):
    """Seconds of a step of n tokens, for n = 1 .. ADAPTIVE_MAX_TOKENS + 1 (interpolated
    between the measured points _CURVE_POINTS), on a fork of `seq` (its context, as much of it
    as leaves room for the longest step; freed after). The fastest of `reps` runs of each point."""
    points = [n for n in _CURVE_POINTS if n <= rt.max_context]  # a longer step can never happen
    keep = max(0, min(rt.seq_len(seq), rt.max_context - max(points)))
    meas = {}
    for n in points:
        best = math.inf
        for _ in range(reps):
            f = rt.seq_fork(seq, keep)
            try:
                t0 = time.perf_counter()
                rt.eval([(f, [token] * n, "all")])
                best = min(best, time.perf_counter() - t0)
            finally:
                rt.seq_free(f)
        meas[n] = best
    xs = sorted(meas)
    curve = np.interp(np.arange(1, ADAPTIVE_MAX_TOKENS + 2), xs, [meas[x] for x in xs])
    # A longer step never costs less than a shorter one (measurement noise aside).
    return np.maximum.accumulate(curve).tolist()


class Controller:
    """Chooses how many proposed tokens to check in the next step.

    The running acceptance rate a (per proposed token, with decaying counts) gives the
    expected tokens of a step that checks k proposals, E(k) = 1 + a + ... + a^k (a proposal
    counts only if every earlier one was accepted). Its cost is C(k) = t(k + 1) / t(1) from
    the measured curve, plus k draft steps with an assistant. k maximises E(k) / C(k); when
    that is below _MIN_GAIN the step is a plain one (k = 0).
    """

    def __init__(self, curve):
        self.curve = curve  # seconds of a step of n tokens at index n - 1
        self.acc = 1.0      # decayed counts: accepted proposals, rejections (prior a = 0.5)
        self.rej = 1.0

    def observe(self, accepted, rejected):
        self.acc = self.acc * _DECAY + accepted
        self.rej = self.rej * _DECAY + (1 if rejected else 0)

    @property
    def rate(self):
        return self.acc / (self.acc + self.rej)

    def can_pay(self, kmax, draft_step_seconds):
        """Whether checking proposals could ever beat a plain step, even if all were accepted
        (an assistant as slow as the target cannot)."""
        acc, rej = self.acc, self.rej
        self.acc, self.rej = 1.0, 0.0
        try:
            return self.choose(kmax, draft_step_seconds) > 0
        finally:
            self.acc, self.rej = acc, rej

    def choose(self, kmax, draft_step_seconds=0.0):
        a, t1 = self.rate, self.curve[0]
        best_k, best = 0, 1.0
        e = 1.0
        for k in range(1, min(kmax, len(self.curve) - 1) + 1):
            e += a ** k
            g = e / ((self.curve[k] + k * draft_step_seconds) / t1)
            if g > best:
                best_k, best = k, g
        return best_k if best >= _MIN_GAIN else 0


# ------------------------------------------------------------------------------ the generation

class _GeneratorStream:
    """An iterator over a generator function's output that closes it on an error or close()."""

    _gen = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._gen is None:
            raise StopIteration
        try:
            return next(self._gen)
        except StopIteration:
            self._gen = None
            raise
        except BaseException:
            self.close()
            raise

    def close(self):
        """End the generation early (its KV caches go back to the pool)."""
        if self._gen is not None:
            self._gen.close()
            self._gen = None


class SpeculativeStream(_GeneratorStream):
    """Iterator of text pieces of a speculative generation; `.result` is set at the end.
    The pieces, stop strings and finish reasons are the engine's (the same TextStream)."""

    def __init__(self, session, prompt_ids, params, opts: SpeculationOptions):
        self._s = session
        self.result = None
        self._gen = _generate(session, prompt_ids, params, opts, self)

    def _drain(self):
        for _ in self:
            pass
        return self.result


def _generate(s, prompt, params, opts: SpeculationOptions, out: SpeculativeStream):
    from .session import GenerationResult

    rt = s._rt
    eos = s.eos_token_id
    max_ctx = rt.max_context
    max_new = params["max_new_tokens"]
    sampler = _core.Sampler(params["temperature"], params["top_k"], params["top_p"], params["min_p"],
                            params["repetition_penalty"], params["seed"])
    greedy = params["temperature"] == 0.0
    text = _core.TextStream(s._tok, prompt, params["stop"]) if s._tok is not None else None
    tokens = list(prompt)
    stats = {"mode": opts.mode, "proposed": 0, "accepted": 0, "steps": 0, "verify_steps": 0}
    # Proposers that cost (almost) nothing, in the order they are tried: each is
    # [name, proposer, most tokens per step, its Controller (adaptive mode)].
    free = []
    if opts.prompt_lookup_num_tokens:
        lookup = PromptLookup(opts.max_matching_ngram_size, eos)
        free.append(["prompt_lookup", lookup, opts.prompt_lookup_num_tokens, None])
    if opts.ngram_cache:
        ngram = NgramLookup(eos, s._ngram_history.cache(), opts.ngram_static)
        free.append(["ngram_cache", ngram, opts.ngram_num_tokens or ADAPTIVE_MAX_TOKENS, None])
    for f in free:
        f[1].extend(tokens)
    by = {f[0]: {"proposed": 0, "accepted": 0} for f in free}
    draft = DraftModel(opts.assistant, params) if opts.assistant is not None else None
    if draft is not None:
        by["assistant"] = {"proposed": 0, "accepted": 0}
    n_assist = opts.num_assistant_tokens
    if n_assist is None:
        n_assist = HF_NUM_ASSISTANT_TOKENS if opts.mode == "hf" else ADAPTIVE_MAX_TOKENS
    ctl = None
    since_probe = 0
    seq = rt.seq_new()
    n_gen = 0
    finish = None
    pending_text, parts = [], []  # text pieces not yet handed out, handed out
    t_start = time.perf_counter()
    prefill_s = decode_s = calib_s = 0.0

    def emit(tok):
        """Append a generated token; returns the finish reason or None (the engine's rule)."""
        nonlocal n_gen
        tokens.append(tok)
        n_gen += 1
        for f in free:
            f[1].extend([tok])
        stopped = False
        if text is not None:
            piece, stopped = text.push(tok)
            if piece:
                pending_text.append(piece)
        if stopped:
            return "stop"
        if tok == eos:
            return "eos"
        if n_gen >= max_new:
            return "length"
        if len(tokens) >= max_ctx:
            return "context"
        return None

    try:
        if max_new > 0:
            row = rt.eval([(seq, tokens, "last")])[0]
            finish = emit(sampler.sample(row, tokens))
            prefill_s = time.perf_counter() - t_start
            if opts.mode == "adaptive" and finish is None:
                t0 = time.perf_counter()
                if s._spec_curve is None:
                    s._spec_curve = measure_cost_curve(rt, seq, tokens[-1])
                ctl = Controller(s._spec_curve)
                for f in free:
                    f[3] = Controller(s._spec_curve)
                if draft is not None:
                    a = draft.s
                    if a._spec_curve is None:
                        a._spec_curve = measure_cost_curve(draft.rt, draft.seq, tokens[-1])
                    draft.step_seconds = a._spec_curve[0]
                    if not ctl.can_pay(min(n_assist, ADAPTIVE_MAX_TOKENS), draft.step_seconds):
                        draft.close()  # as slow as the target: it can never pay for itself
                        draft = None
                calib_s = time.perf_counter() - t0
            if draft is not None and finish is None:
                t0 = time.perf_counter()
                draft.prefill(tokens)
                prefill_s += time.perf_counter() - t0
        else:
            finish = "length"
        t_decode = time.perf_counter()
        while finish is None:
            yield from _take(pending_text, parts)
            # What may be proposed: the verify step needs room in the context for its k + 1
            # rows, and more than max_new_tokens - generated - 1 proposals could never be used.
            kmax = min(max_new - n_gen - 1, max_ctx - len(tokens) - 1)
            props, qs, src = [], None, None
            shadow = None  # a free proposal not checked (its first token is scored later), its source
            for f in free if kmax > 0 else ():
                props = f[1].propose(min(f[2], kmax))
                if not props:
                    continue
                if f[3] is not None:
                    k = f[3].choose(len(props))
                    if k == 0:
                        shadow, props = (props[0], f), []
                        break
                    props = props[:k]
                src = f
                break
            if kmax > 0 and not props and shadow is None and draft is not None:
                k = min(n_assist, kmax, draft.s.max_context - len(tokens) + 1)
                if ctl is not None and k > 0:
                    kc = ctl.choose(k, draft.step_seconds)
                    since_probe += 1
                    if kc == 0 and since_probe >= _PROBE_EVERY:
                        kc = 1
                    k = kc
                    if k > 0:
                        since_probe = 0
                if k > 0:
                    u = sampler.uniform if not greedy else None
                    props, qs = draft.propose(tokens, k, opts.assistant_confidence_threshold, u)
                    src = "assistant"
            if qs is not None and greedy:
                qs = None
            rows = rt.eval([(seq, [tokens[-1]] + props, "all")])
            base = len(tokens)  # KV holds base - 1 tokens before the step, base + len(props) after
            stats["steps"] += 1
            if props:
                stats["verify_steps"] += 1
                stats["proposed"] += len(props)
            accepted = 0
            for i in range(len(props) + 1):
                if qs is not None and i < len(props):
                    tok, ok = _verify_sampled(sampler, rows[i], tokens, props[i], qs[i])
                else:
                    tok = sampler.sample(rows[i], tokens)
                    ok = i < len(props) and tok == props[i]
                if ok:
                    accepted += 1
                finish = emit(tok)
                if finish is not None or not ok:
                    break
            stats["accepted"] += accepted
            if props:
                name = "assistant" if src == "assistant" else src[0]
                by[name]["proposed"] += len(props)
                by[name]["accepted"] += accepted
                c = ctl if src == "assistant" else src[3]
                if c is not None:
                    c.observe(accepted, accepted < len(props))
                if src == "assistant" and opts.mode == "hf" and opts.num_assistant_tokens_schedule == "heuristic":
                    # HF's heuristic schedule: +2 after a fully accepted step, else -1, at least 1.
                    n_assist = n_assist + 2 if accepted == len(props) else max(1, n_assist - 1)
            elif shadow is not None:
                tok0, f = shadow
                f[3].observe(1 if tokens[base] == tok0 else 0, tokens[base] != tok0)
            if finish is None:
                rt.seq_truncate(seq, len(tokens) - 1)
        decode_s = time.perf_counter() - t_decode
        if text is not None and finish != "stop":
            piece, stopped = text.finish()
            if piece:
                pending_text.append(piece)
            if stopped:
                finish = "stop"
        yield from _take(pending_text, parts)
    finally:
        if s._rt is not None:
            rt.seq_free(seq)
        if draft is not None:
            draft.close()
    stats["calibration_seconds"] = calib_s
    stats["sources"] = by
    out.result = GenerationResult(
        text="".join(parts) if s._tok is not None else None, token_ids=tokens[len(prompt):],
        finish_reason=finish, prompt_token_ids=list(prompt), prefill_seconds=prefill_s,
        decode_seconds=decode_s, n_decoded=max(0, n_gen - 1), cached_tokens=0, speculation=stats)
    s._ngram_history.record(tokens)


def _take(pending, parts):
    while pending:
        parts.append(pending.pop(0))
        yield parts[-1]


def _verify_sampled(sampler, row, history, x, q):
    """Speculative sampling at one position: the draft drew x from q; keep it with probability
    min(1, p(x) / q(x)), else draw from norm(max(0, p - q)). Returns (token, kept)."""
    p = sampler.probs(row, history).astype(np.float64)
    u = sampler.uniform()
    if q[x] > 0 and u * q[x] < p[x]:
        return x, True
    r = np.maximum(p - q, 0.0)
    if r.sum() <= 0:  # p == q to rounding: x would have been kept; draw from p
        r = p
    return _draw(r, sampler.uniform()), False


# ------------------------------------------------------------------------------ batched generation

def _extend_curve(curve, n):
    """The cost curve (seconds of a step of i + 1 tokens at index i) extended to n entries:
    past its end, linearly with the marginal cost of its last measured stretch."""
    if len(curve) >= n:
        return curve
    slope = max(0.0, (curve[-1] - curve[_CURVE_POINTS[-2] - 1]) / (len(curve) - _CURVE_POINTS[-2]))
    return list(curve) + [curve[-1] + slope * i for i in range(1, n - len(curve) + 1)]


def allocate(rates, avail, curve):
    """How many proposed tokens each row of a batched step checks (adaptive mode).

    Row i with per-token acceptance rate a_i gains a_i^j expected tokens from its j-th proposal
    (counted only if every earlier one holds), so for a step of T tokens in all the best choice
    is the T - B largest of these terms (B rows, avail[i] proposals each); the step costs
    t(T) from the measured curve. Returns the k_i of the T maximising expected tokens per
    second, or all zeros when that is not _MIN_GAIN times a plain step's B / t(B)."""
    B = len(rates)
    terms = sorted(((rates[i] ** j, i) for i in range(B) for j in range(1, avail[i] + 1)), reverse=True)
    curve = _extend_curve(curve, B + len(terms))
    base = B / curve[B - 1]
    best_n, best, e = 0, base, float(B)
    for n, (g, _) in enumerate(terms, 1):
        e += g
        r = e / curve[B + n - 1]
        if r > best:
            best_n, best = n, r
    k = [0] * B
    if best >= _MIN_GAIN * base:
        for _, i in terms[:best_n]:
            k[i] += 1
    return k


class _Row:
    """One sequence of a speculative batch: its tokens, sampler, text and proposers."""

    def __init__(self, s, index, prompt, params, opts: SpeculationOptions, dynamic):
        self.index = index
        self.prompt = list(prompt)
        self.tokens = list(prompt)
        self.params = params
        self.max_new = params["max_new_tokens"]
        self.sampler = _core.Sampler(params["temperature"], params["top_k"], params["top_p"], params["min_p"],
                                     params["repetition_penalty"], params["seed"])
        self.text = _core.TextStream(s._tok, prompt, params["stop"]) if s._tok is not None else None
        self.eos = s.eos_token_id
        self.max_ctx = s._rt.max_context
        self.free = []
        if opts.prompt_lookup_num_tokens:
            self.free.append(["prompt_lookup", PromptLookup(opts.max_matching_ngram_size, self.eos),
                              opts.prompt_lookup_num_tokens, None])
        if opts.ngram_cache:
            self.free.append(["ngram_cache", NgramLookup(self.eos, dynamic, opts.ngram_static),
                              opts.ngram_num_tokens or ADAPTIVE_MAX_TOKENS, None])
        for f in self.free:
            f[1].extend(self.tokens)
        self.stats = {"mode": opts.mode, "proposed": 0, "accepted": 0, "steps": 0, "verify_steps": 0,
                      "calibration_seconds": 0.0, "sources": {f[0]: {"proposed": 0, "accepted": 0} for f in self.free}}
        self.seq = None
        self.n_gen = 0
        self.finish = None
        self.pending, self.parts = [], []
        self.props, self.src, self.shadow = [], None, None
        self.prefill_s = self.decode_s = 0.0

    def emit(self, tok):
        """Append a generated token; returns the finish reason or None (the engine's rule)."""
        self.tokens.append(tok)
        self.n_gen += 1
        for f in self.free:
            f[1].extend([tok])
        stopped = False
        if self.text is not None:
            piece, stopped = self.text.push(tok)
            if piece:
                self.pending.append(piece)
        if stopped:
            return "stop"
        if tok == self.eos:
            return "eos"
        if self.n_gen >= self.max_new:
            return "length"
        if len(self.tokens) >= self.max_ctx:
            return "context"
        return None

    def propose(self):
        """This step's candidate proposals (the first free proposer that has any), uncut."""
        kmax = min(self.max_new - self.n_gen - 1, self.max_ctx - len(self.tokens) - 1)
        self.props, self.src, self.shadow = [], None, None
        for f in self.free if kmax > 0 else ():
            p = f[1].propose(min(f[2], kmax))
            if p:
                self.props, self.src = p, f
                return

    def verify(self, rows):
        """Sample the step's rows as plain generation would; keep proposals while they match."""
        props = self.props
        self.stats["steps"] += 1
        base = len(self.tokens)
        accepted = 0
        for i in range(len(props) + 1):
            tok = self.sampler.sample(rows[i], self.tokens)
            ok = i < len(props) and tok == props[i]
            accepted += ok
            self.finish = self.emit(tok)
            if self.finish is not None or not ok:
                break
        if props:
            self.stats["verify_steps"] += 1
            self.stats["proposed"] += len(props)
            self.stats["accepted"] += accepted
            src = self.stats["sources"][self.src[0]]
            src["proposed"] += len(props)
            src["accepted"] += accepted
            if self.src[3] is not None:
                self.src[3].observe(accepted, accepted < len(props))
        elif self.shadow is not None:
            tok0, f = self.shadow
            f[3].observe(1 if self.tokens[base] == tok0 else 0, self.tokens[base] != tok0)

    def take(self):
        while self.pending:
            self.parts.append(self.pending.pop(0))
            yield self.index, self.parts[-1]


class SpeculativeBatchStream(_GeneratorStream):
    """Iterator of (prompt index, text piece) pairs of a speculative generate_batch; `.results`
    (one GenerationResult per prompt, in order) is set once it is exhausted."""

    def __init__(self, session, jobs, opts: SpeculationOptions, max_batch: int):
        self._s = session
        self.results = None
        self._gen = _generate_batch(session, jobs, opts, max_batch, self)


def _generate_batch(s, jobs, opts: SpeculationOptions, max_batch, out):
    """Up to max_batch sequences at once; each step is one Runtime.eval over every live row,
    a row contributing its last token and the proposals it checks (or its prompt, when it is
    admitted), so the weights are read once for all of them. Rows finish independently and
    waiting prompts take their place."""
    from .session import GenerationResult

    rt = s._rt
    dynamic = s._ngram_history.cache() if opts.ngram_cache else None
    rows = [_Row(s, i, ids, params, opts, dynamic) for i, (ids, params) in enumerate(jobs)]
    waiting = [r for r in rows if r.max_new > 0]
    for r in rows:
        if r.max_new == 0:
            r.finish = "length"
    live: List[_Row] = []
    adaptive = opts.mode == "adaptive"
    curve = None
    try:
        while waiting or live:
            while waiting and len(live) < max_batch:
                r = waiting.pop(0)
                r.seq = rt.seq_new()
                live.append(r)
            new = [r for r in live if r.n_gen == 0]
            old = [r for r in live if r.n_gen > 0]
            for r in old:
                r.propose()
            if adaptive and old:
                if curve is None:
                    t0 = time.perf_counter()
                    if s._spec_curve is None:
                        s._spec_curve = measure_cost_curve(rt, old[0].seq, old[0].tokens[-1])
                    curve = s._spec_curve
                    for r in rows:
                        for f in r.free:
                            f[3] = Controller(curve)
                    dt = time.perf_counter() - t0
                    for r in old:
                        r.stats["calibration_seconds"] = dt
                k = allocate([r.src[3].rate if r.props else 0.0 for r in old],
                             [len(r.props) for r in old], curve)
                for r, ki in zip(old, k):
                    if r.props and ki == 0:
                        r.shadow, r.props = (r.props[0], r.src), []
                    else:
                        r.props = r.props[:ki]
            entries = [(r.seq, r.tokens, "last") for r in new] + \
                      [(r.seq, [r.tokens[-1]] + r.props, "all") for r in old]
            t0 = time.perf_counter()
            logits = rt.eval(entries)
            dt = time.perf_counter() - t0
            at = 0
            for r in new:
                r.prefill_s = dt
                r.finish = r.emit(r.sampler.sample(logits[at], r.tokens))
                at += 1
            for r in old:
                n = len(r.props) + 1
                r.decode_s += dt
                r.verify(logits[at:at + n])
                at += n
                if r.finish is None:
                    rt.seq_truncate(r.seq, len(r.tokens) - 1)
            for r in live:
                if r.finish is not None and r.text is not None and r.finish != "stop":
                    piece, stopped = r.text.finish()
                    if piece:
                        r.pending.append(piece)
                    if stopped:
                        r.finish = "stop"
                yield from r.take()
            for r in [r for r in live if r.finish is not None]:
                rt.seq_free(r.seq)
                r.seq = None
                live.remove(r)
    finally:
        if s._rt is not None:
            for r in live:
                if r.seq is not None:
                    rt.seq_free(r.seq)
    results = []
    for r in rows:
        s._ngram_history.record(r.tokens)
        results.append(GenerationResult(
            text="".join(r.parts) if s._tok is not None else None, token_ids=r.tokens[len(r.prompt):],
            finish_reason=r.finish, prompt_token_ids=list(r.prompt), prefill_seconds=r.prefill_s,
            decode_seconds=r.decode_s, n_decoded=max(0, r.n_gen - 1), cached_tokens=0, speculation=r.stats))
    out.results = results
