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
from dataclasses import dataclass
from typing import List, Optional

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
    keep = max(0, min(rt.seq_len(seq), rt.max_context - max(_CURVE_POINTS)))
    meas = {}
    for n in _CURVE_POINTS:
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

class SpeculativeStream:
    """Iterator of text pieces of a speculative generation; `.result` is set at the end.
    The pieces, stop strings and finish reasons are the engine's (the same TextStream)."""

    def __init__(self, session, prompt_ids, params, opts: SpeculationOptions):
        self._s = session
        self._gen = _generate(session, prompt_ids, params, opts, self)
        self.result = None

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

    def _drain(self):
        for _ in self:
            pass
        return self.result

    def close(self):
        """End the generation early (its KV cache goes back to the pool)."""
        if self._gen is not None:
            self._gen.close()
            self._gen = None


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
    lookup = None
    if opts.prompt_lookup_num_tokens:
        lookup = PromptLookup(opts.max_matching_ngram_size, eos)
        lookup.extend(tokens)
    draft = DraftModel(opts.assistant, params) if opts.assistant is not None else None
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
        if lookup is not None:
            lookup.extend([tok])
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
            props, qs, from_draft = [], None, False
            shadow = None  # a prompt-lookup proposal not checked (its first token is scored later)
            if kmax > 0 and lookup is not None:
                n = opts.prompt_lookup_num_tokens
                props = lookup.propose(min(n, kmax))
                if props and ctl is not None:
                    k = ctl.choose(len(props))
                    if k == 0:
                        shadow, props = props[0], []
                    else:
                        props = props[:k]
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
                    from_draft = True
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
                if ctl is not None:
                    ctl.observe(accepted, accepted < len(props))
                if from_draft and opts.mode == "hf" and opts.num_assistant_tokens_schedule == "heuristic":
                    # HF's heuristic schedule: +2 after a fully accepted step, else -1, at least 1.
                    n_assist = n_assist + 2 if accepted == len(props) else max(1, n_assist - 1)
            elif shadow is not None and ctl is not None:
                ctl.observe(1 if tokens[base] == shadow else 0, tokens[base] != shadow)
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
    out.result = GenerationResult(
        text="".join(parts) if s._tok is not None else None, token_ids=tokens[len(prompt):],
        finish_reason=finish, prompt_token_ids=list(prompt), prefill_seconds=prefill_s,
        decode_seconds=decode_s, n_decoded=max(0, n_gen - 1), cached_tokens=0, speculation=stats)


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
