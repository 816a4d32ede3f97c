"""Perplexity of a model on a text, and how far a (quantized) model is from a base model's
next-token distributions: KL divergence, top-1 agreement, ΔPPL (what llama-perplexity's
--kl-divergence reports). `openelm-rt perplexity` is the command; `perplexity()` the function.

Windows: the token sequence is cut into non-overlapping windows of `ctx` tokens, each evaluated
from an empty cache; in each window every token but the first is predicted from the ones before
it. With add_bos (the default for text and a model with a tokenizer: OpenELM was trained with
BOS first) each window is BOS + ctx - 1 tokens of the text, and all of those are predicted. A
last, shorter window is evaluated too. Statistics are over all predicted positions, in float64:
perplexity = exp(mean negative log-likelihood); KL(base ‖ model) per position =
Σ p_base (log p_base − log p_model), reported as mean, 99th percentile and max; top-1 agreement =
share of positions whose argmax is the same.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Union

import numpy as np


@dataclass
class PerplexityResult:
    ppl: float                 # exp(mean NLL) of the model
    nll: float                 # mean negative log-likelihood, nats per token
    n_tokens: int              # predicted positions
    n_windows: int
    ctx: int
    base_ppl: Optional[float] = None  # the base model's perplexity on the same positions
    delta_ppl: Optional[float] = None  # ppl - base_ppl
    kl_mean: Optional[float] = None    # KL(base ‖ model), nats
    kl_p99: Optional[float] = None
    kl_max: Optional[float] = None
    top1: Optional[float] = None       # share of positions with the same argmax

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        s = (f"perplexity {self.ppl:.4f} (mean NLL {self.nll:.5f} nats) over {self.n_tokens} tokens "
             f"in {self.n_windows} windows of {self.ctx}")
        if self.kl_mean is not None:
            s += (f"\nbase perplexity {self.base_ppl:.4f}, ΔPPL {self.delta_ppl:+.4f}\n"
                  f"KL(base ‖ model) mean {self.kl_mean:.6f}, p99 {self.kl_p99:.6f}, max {self.kl_max:.6f} nats; "
                  f"top-1 agreement {self.top1:.2%}")
        return s


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def windows(ids: Sequence[int], ctx: int, bos: Optional[int]) -> list:
    """The evaluation windows (module docstring): lists of token ids, and for each the number
    of leading positions whose prediction is not scored (always 1: the first token)."""
    if ctx < 2:
        raise ValueError(f"ctx must be >= 2, got {ctx}")
    step = ctx - 1 if bos is not None else ctx
    out = []
    for start in range(0, len(ids), step):
        chunk = list(ids[start:start + step])
        w = ([bos] if bos is not None else []) + chunk
        if len(w) >= 2:
            out.append(w)
    return out


def score_windows(logits, base_logits, wins, ctx: int, show: bool = False) -> PerplexityResult:
    """The statistics of the module docstring over windows `wins` (lists of ids); logits(ids) and
    base_logits(ids) (or None) return the (len(ids), V) logits of a window. Shared with the
    benchmarks, which pass llama.cpp's logits through it."""
    nll, nll_base, kls, same = [], [], [], 0
    t0 = time.monotonic()
    done = 0
    for i, w in enumerate(wins):
        target = np.asarray(w[1:])
        lp = log_softmax(logits(w))[:-1]                  # predictions of w[1:]
        nll.append(-lp[np.arange(len(target)), target])
        if base_logits is not None:
            lb = log_softmax(base_logits(w))[:-1]
            nll_base.append(-lb[np.arange(len(target)), target])
            kls.append((np.exp(lb) * (lb - lp)).sum(-1))
            same += int((lb.argmax(-1) == lp.argmax(-1)).sum())
        done += len(target)
        if show:
            ppl = math.exp(float(np.concatenate(nll).mean()))
            rate = done / max(time.monotonic() - t0, 1e-9)
            end = "\n" if i + 1 == len(wins) or not sys.stderr.isatty() else ""
            print(f"\rperplexity: window {i + 1}/{len(wins)}, {done} tokens, ppl {ppl:.4f}, "
                  f"{rate:.0f} tokens/s", end=end, file=sys.stderr, flush=True)
    nll = np.concatenate(nll)
    r = PerplexityResult(ppl=math.exp(float(nll.mean())), nll=float(nll.mean()), n_tokens=int(nll.size),
                         n_windows=len(wins), ctx=ctx)
    if base_logits is not None:
        kl, nb = np.concatenate(kls), np.concatenate(nll_base)
        r.base_ppl = math.exp(float(nb.mean()))
        r.delta_ppl = r.ppl - r.base_ppl
        r.kl_mean, r.kl_p99, r.kl_max = float(kl.mean()), float(np.percentile(kl, 99)), float(kl.max())
        r.top1 = same / nll.size
    return r


def _session(model, threads, exact=True):
    from .session import Session

    if isinstance(model, Session):
        return model, False
    return Session(os.fspath(model), threads=threads, exact=exact), True


def _read_ids(path) -> list:
    """Token ids from a file: whitespace- or comma-separated integers, or a .npy array."""
    path = os.fspath(path)
    if path.endswith(".npy"):
        return [int(t) for t in np.load(path).reshape(-1)]
    with open(path, encoding="utf-8") as f:
        raw = f.read().replace(",", " ").split()
    try:
        return [int(t) for t in raw]
    except ValueError:
        raise ValueError(f"{path}: expected token ids (integers separated by spaces, commas or "
                         f"newlines), found {next(t for t in raw if not t.lstrip('-').isdigit())!r}") from None


def perplexity(model, text: Optional[str] = None, ids: Optional[Sequence[int]] = None, ctx: int = 512,
               kl_base=None, threads: Optional[int] = None, add_bos: Optional[bool] = None,
               progress: Union[bool, None] = None, exact: bool = True) -> PerplexityResult:
    """Perplexity of `model` (a path or Session) on `text` or token `ids` (one of the two), and
    with kl_base (path or Session of the reference model, same vocabulary) the KL divergence,
    top-1 agreement and ΔPPL against it. Windows of `ctx` tokens (module docstring).
    add_bos: prepend BOS to each window; default True for text, False for ids. progress: a line
    on stderr per window (None: only when stderr is a terminal). exact: the Session opened for a
    `model` path (not kl_base) multiplies bf16 weights by exact f32 activations; False rounds them
    to bf16 (Session's `exact`), so KL against an exact base measures what the rounding costs."""
    if (text is None) == (ids is None):
        raise ValueError("pass exactly one of text= and ids=")
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 2:
        raise ValueError(f"ctx must be an integer >= 2, got {ctx!r}")
    sess, own = _session(model, threads, exact)
    base, own_base = _session(kl_base, threads) if kl_base is not None else (None, False)
    try:
        if base is not None and base.vocab_size != sess.vocab_size:
            raise ValueError(f"the base model has vocabulary {base.vocab_size}, the model {sess.vocab_size}; "
                             f"KL needs the same vocabulary")
        if text is not None:
            if not isinstance(text, str):
                raise ValueError(f"text must be a str, got {type(text).__name__}")
            ids = sess.tokenize(text, add_bos=False)
            add_bos = True if add_bos is None else add_bos
        else:
            ids = sess._check_ids(ids, "ids")
            add_bos = False if add_bos is None else add_bos
        ctx = min(ctx, sess.max_context)
        wins = windows(ids, ctx, sess.bos_token_id if add_bos else None)
        if not wins:
            raise ValueError(f"the input has {len(ids)} token(s): too few to predict any")
        show = sys.stderr.isatty() if progress is None else bool(progress)
        return score_windows(sess.logits, base.logits if base is not None else None, wins, ctx, show)
    finally:
        if own:
            sess.close()
        if own_base:
            base.close()
