"""Session: load an .oelm model and run it (tokenize, logits, generate, score).

A thin layer over the C++ core (`openelm_rt._core`): argument checking with clear
errors, the OpenELM Instruct chat format, results. A Session owns a paged KV cache
(`_core.Runtime`) and a continuous-batching engine (`_core.Engine`) on it: `generate`,
`generate_batch` and `chat` submit requests to the engine and step it; text pieces and
stop strings are assembled in the core. Tokenization is native (the core's
SentencePiece-exact tokenizer, built from the vocabulary stored in the model file); all
numeric work happens in C++ with the GIL released. One Session is not safe to use from
several threads at once.
"""

from __future__ import annotations

import numbers
import os
import secrets
from dataclasses import dataclass, field
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core, speculative

FormatError = _core.FormatError
KVBudgetError = _core.KVBudgetError

Prompt = Union[str, Sequence[int]]
Message = Dict[str, str]

CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class GenerationResult:
    """What `Session.generate` returns."""

    text: str  # the generated text only (no prompt); None for a model without a tokenizer
    token_ids: list  # the generated token ids (EOS included when generated)
    finish_reason: str  # "eos", "length", "stop" (a stop string), "context" (context full), "cancelled"
    prompt_token_ids: list = field(repr=False, default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    n_decoded: int = field(repr=False, default=0)
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache (not evaluated)
    # With prompt lookup or an assistant model: {"proposed", "accepted", "steps", ...}; else None.
    speculation: Optional[dict] = None

    @property
    def prefill_tokens_per_s(self) -> float:
        n = len(self.prompt_token_ids) - self.cached_tokens
        return n / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.n_decoded / self.decode_seconds if self.decode_seconds > 0 else 0.0


@dataclass
class ScoreResult:
    """What `Session.score` returns for one (context, continuation) pair."""

    logprobs: list  # log p(continuation[i] | context + continuation[:i]), one float per token
    is_greedy: bool  # every continuation token is the argmax (greedy decoding would produce it)

    @property
    def total(self) -> float:
        """The continuation's log-likelihood: the sum of `logprobs`."""
        return float(sum(self.logprobs))


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
               "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_size(name, value) -> int:
    """Bytes from an int or a string such as "512MiB", "1.5GiB", "2GB" (None: 0, the default)."""
    if value is None:
        return 0
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
            if n >= 1:
                return n
    raise ValueError(f"{name} must be a number of bytes or a size such as '512MiB' or '2GiB', got {value!r}")


def parse_memory_budget(value, model_bytes: int) -> int:
    """Bytes from a size (parse_size) or a percentage of the model file such as "50%"."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            pct = float(value.strip()[:-1])
        except ValueError:
            pct = -1.0
        if not 0 < pct <= 1000:
            raise ValueError(f"memory_budget as a percentage must be in (0%, 1000%] of the model file, got {value!r}")
        return max(1, int(model_bytes * pct / 100))
    return parse_size("memory_budget", value)


def _check_int(name, value, lo=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return value


def _check_float(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if value != value:
        raise ValueError(f"{name} must not be NaN")
    return value


def _check_messages(messages) -> list:
    """Validate a chat: a non-empty list of {"role", "content"} dicts, an optional system
    message first, ending with a user message (the assistant answers it)."""
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                         f"got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty; pass at least one {'role': 'user', 'content': ...} message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        extra = set(m) - {"role", "content"}
        if extra or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must have exactly the keys 'role' and 'content', got {sorted(m)}")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"messages[{i}]['role'] = {m['role']!r}; the roles are {', '.join(CHAT_ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}]['content'] must be a str, got {type(m['content']).__name__}")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"messages[{i}] is a system message; only the first message may be one")
    if messages[-1]["role"] != "user":
        raise ValueError(f"the last message is from {messages[-1]['role']!r}; a chat must end with a user "
                         f"message, which the assistant then answers")
    return list(messages)


class Session:
    """An OpenELM model loaded from an .oelm file, ready to generate and score.

    Args:
        path: the .oelm file written by `openelm-rt-export`, or a Hugging Face OpenELM
            checkpoint directory (config.json, safetensors, tokenizer.model beside them),
            exported on first use into ~/.cache/openelm_rt (`openelm_rt.autoexport`).
        threads: worker threads (default: one per hardware thread).
        max_context: longest sequence (prompt + generated tokens) one sequence holds;
            default: the model's training context (2048 for the released models).
        verify: check every tensor's CRC-32 at load (reads the whole file once).
        backend: "cpu" (default); "cuda", the forward pass on the GPU (a build with the CUDA
            backend and a device: `openelm_rt.cuda_info()` says whether this one has them);
            "auto", CUDA when available and the CPU otherwise; or "ref", the single-threaded
            scalar reference. `threads` is then the host threads around the GPU.
        kv_budget: memory for the KV cache of all sequences at once, in bytes or as a size
            ("512MiB", "2GiB"); default: room for max_batch sequences of max_context, at most
            a quarter of the machine's memory. Pages are only used as sequences fill them.
        kv_dtype: "f32" (default, exact) or "f16" (half the KV memory and bandwidth; keys
            and values rounded to binary16).
        max_batch: sequences generating at once (generate_batch, concurrent streams).
        prefix_cache: finished sequences kept so that a prompt extending one of them (a
            chat's next turn, a shared system prompt) evaluates only its new tokens; 0: off.
        kv_block_size: positions per KV block (a multiple of 16); default 16.
        exact: bf16 weights only. True (default): exact f32 activations (f32 FMAs). False: where
            the CPU has AVX-512 BF16 dot products, the activations entering bf16 matmuls are
            rounded to bf16 (about twice the KL to f32; faster only where `vdpbf16ps` outruns f32
            FMAs: docs/WEIGHT_TYPES.md has both, measured). "ref" and "cuda" are always exact.
        memory_budget: run the model in at most this much memory (bytes, a size such as
            "1.2GiB", or a percentage of the model file such as "50%"): resident weights, the
            KV cache (default under a budget: one sequence of max_context), activations and
            read buffers. What does not fit (feed-forward matrices) is read from the file at
            every forward step by a prefetch thread with O_DIRECT; the logits are the same,
            bit for bit. The plan is in `memory_plan`; a budget below the minimum is a
            ValueError stating the minimum. Default None: every weight resident.
        stream_io: with memory_budget: "direct" (default; buffered reads dropped from the page
            cache where the file system refuses O_DIRECT), "buffered", or "mmap" (benchmark
            baseline: pages of the mapped file dropped after each use).
        prefetch: with memory_budget: read the next layer's weights while this one computes
            (default True; False is the naive baseline, each layer read when needed).
        prefill_chunk: prompt tokens the engine evaluates per step while other sequences are
            generating (their next token waits for that step); default None: the core's
            (`_core.Engine(...).prefill_chunk`, 64); 0: no separate limit (up to the step's
            token budget, 256). Smaller: steadier inter-token latency for running streams,
            later first tokens for new ones. Tokens never depend on it.
    """

    def __init__(self, path, threads=None, max_context=None, verify=False, backend="cpu", kv_budget=None,
                 kv_dtype="f32", max_batch=16, prefix_cache=16, kv_block_size=None, exact=True,
                 memory_budget=None, stream_io="direct", prefetch=True, prefill_chunk=None):
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path}: no such file; pass an .oelm file (`openelm-rt-export CHECKPOINT_DIR -o model.oelm`) "
                f"or a Hugging Face OpenELM checkpoint directory")
        if os.path.isdir(path):  # a checkpoint as published: exported once into the cache
            from .autoexport import resolve_model

            path = resolve_model(path)
        if backend not in ("cpu", "ref", "cuda", "auto"):
            raise ValueError(f"backend must be 'cpu', 'cuda', 'auto' or 'ref', got {backend!r}")
        if backend == "auto":
            backend = "cuda" if _core.cuda_info()["available"] else "cpu"
        if kv_dtype not in ("f32", "f16"):
            raise ValueError(f"kv_dtype must be 'f32' or 'f16', got {kv_dtype!r}")
        if threads is None:
            threads = 1 if backend == "ref" else 0
        else:
            threads = _check_int("threads", threads, lo=1)
        budget = parse_size("kv_budget", kv_budget)
        max_batch = _check_int("max_batch", max_batch, lo=1)
        prefix_cache = _check_int("prefix_cache", prefix_cache, lo=0)
        engine_kw = {} if prefill_chunk is None else {"prefill_chunk": _check_int("prefill_chunk", prefill_chunk, lo=0)}
        block = 0 if kv_block_size is None else _check_int("kv_block_size", kv_block_size, lo=16)
        memory = parse_memory_budget(memory_budget, os.path.getsize(path))
        if stream_io not in ("direct", "buffered", "mmap"):
            raise ValueError(f"stream_io must be 'direct', 'buffered' or 'mmap', got {stream_io!r}")
        self._model = _core.Model(path, bool(verify))
        # exact: the CUDA backend's matmuls always take exact f32 activations.
        self._backend = _core.Backend(backend, threads, "", bool(exact) or backend == "cuda")
        cfg = self._model.config
        self.config = dict(cfg)
        if max_context is None:
            max_context = int(cfg["max_context"])
        max_context = _check_int("max_context", max_context, lo=2)
        self._rt = _core.Runtime(self._model, self._backend, max_context=max_context, kv_budget=budget,
                                 block_size=block, kv_dtype=kv_dtype, prefix_cache=prefix_cache,
                                 max_step_tokens=max(256, max_batch), budget_sequences=max_batch,
                                 memory_budget=memory, stream_io=stream_io, prefetch=bool(prefetch))
        self._engine = _core.Engine(self._rt, max_batch=max_batch, **engine_kw)
        self._max_batch = max_batch
        # Validated by the core at load; None for a file of token ids only (--no-tokenizer).
        self._tok = self._model.tokenizer if self._model.has_tokenizer else None
        self._streams = {}  # request id -> the live stream that receives its events
        self._assistants = {}  # path -> Session opened for assistant_model=PATH
        self._spec_curve = None  # seconds of an n-token step, measured at the first speculation
        # Every generation's tokens, for the n-gram cache of speculative generation.
        self._ngram_history = speculative.NgramHistory()
        self.path = path

    # -- properties ---------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def bos_token_id(self) -> int:
        return int(self.config["bos_token_id"])

    @property
    def eos_token_id(self) -> int:
        return int(self.config["eos_token_id"])

    @property
    def max_context(self) -> int:
        return self._open()._rt.max_context

    def _open(self):
        if self._model is None:
            raise ValueError("this Session is closed; create a new Session to keep working")
        return self

    @property
    def has_tokenizer(self) -> bool:
        """False for a model file exported without a tokenizer (token ids only)."""
        return self._open()._tok is not None

    def _tokenizer(self, what: str):
        tok = self._open()._tok
        if tok is None:
            raise ValueError(f"{self.path} has no tokenizer (it was exported with --no-tokenizer), so "
                             f"{what} is not possible: pass token ids instead of text, or re-export the "
                             f"model with its tokenizer.model")
        return tok

    @property
    def threads(self) -> int:
        return self._backend.threads

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def kernels(self) -> str:
        """The kernel variant in use ("avx512vnni", "avx2", "neon", "ref", ...): the fastest
        this CPU supports unless OPENELM_RT_KERNELS names one."""
        return self._backend.kernels

    @property
    def stats(self) -> dict:
        """Counters since the Session was created: tokens forwarded (rows through the model),
        forward steps, prompt tokens and how many of them the prefix cache supplied, generated
        tokens, preemptions; and the KV cache (budget, blocks free, prefix-cache entries)."""
        rt, eng = self._open()._rt, self._engine.stats()
        return {"tokens_forwarded": rt.tokens_forwarded, "steps": rt.steps,
                "prompt_tokens": eng["prompt_tokens"], "cached_tokens": eng["cached_tokens"],
                "generated_tokens": eng["generated"], "preempted": eng["preempted"],
                "kv_budget": rt.kv_budget, "kv_blocks": rt.kv_blocks, "kv_blocks_free": rt.kv_blocks_free,
                "kv_block_size": rt.kv_block_size, "prefix_cache_entries": rt.prefix_cache_entries}

    @property
    def memory_plan(self):
        """Under memory_budget: the plan (dict: budget, resident and streamed bytes, KV, scratch,
        read buffers, streamed bytes per forward step, minimum; streamed_layers lists each
        layer's streamed matrices; text: the readable summary). None without a budget."""
        return self._open()._rt.memory_plan

    @property
    def stream_stats(self):
        """Counters of the weight stream (bytes read, read requests, syscalls, retries, read
        time, time the forward pass waited, layers streamed); None when nothing streams."""
        return self._open()._rt.stream_stats

    def __repr__(self):
        c = self.config
        return (f"Session({self.path!r}, layers={c['n_layer']}, d_model={c['d_model']}, "
                f"dtype={self._model.weights_dtype}, backend={self.backend!r}, kernels={self.kernels!r}, "
                f"threads={self.threads}, max_context={self.max_context}, "
                f"kv={self._rt.kv_budget_text})")

    # -- tokenizer ------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True) -> list:
        """Token ids of `text`, with BOS first (as OpenELM was trained) unless add_bos=False."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return self._tokenizer("tokenize()").encode(text, bool(add_bos))

    def detokenize(self, ids) -> str:
        """Text of token ids; BOS/EOS and other control tokens produce no text."""
        return self._tokenizer("detokenize()").decode(self._check_ids(ids, "ids", allow_empty=True))

    def chat_token_ids(self, messages: List[Message]) -> list:
        """The prompt token ids of a conversation, in the format OpenELM Instruct was tuned on.

        BOS, then each turn as the text `<|role|>` newline content, followed by the EOS
        token and a newline, then the generation prompt `<|assistant|>` newline (the Zephyr
        format of the alignment-handbook DPO recipe; README, "Chatting with the Instruct
        models"). The tags are plain text. The text between special tokens is tokenized
        segment by segment, each with SentencePiece's dummy prefix, as the Hugging Face
        LLaMA-2 tokenizer used for that tuning splits at special tokens: so every segment
        after an EOS starts with the piece "▁" before its newline. A literal "</s>" inside
        a message stays text; it never becomes the EOS token.
        """
        msgs = _check_messages(messages)
        tok, eos = self._tokenizer("chat"), self.eos_token_id
        ids = [self.bos_token_id]
        for i, m in enumerate(msgs):
            ids += tok.encode(("\n" if i else "") + f"<|{m['role']}|>\n{m['content']}", False)
            ids.append(eos)
        ids += tok.encode("\n<|assistant|>\n", False)
        return ids

    def chat(self, messages: List[Message], **generate_kwargs):
        """The assistant's reply to a conversation (OpenELM Instruct models).

        messages: a list of {"role": "system"|"user"|"assistant", "content": str}; an
        optional system message first, ending with a user message. The prompt is
        `chat_token_ids(messages)`; generate_kwargs are those of `generate` (stream=True
        included) and the result is what `generate` returns. Generation normally ends at
        the EOS token that closes the assistant's turn.
        """
        return self.generate(self.chat_token_ids(messages), **generate_kwargs)

    def _check_ids(self, ids, name, allow_empty=False):
        if isinstance(ids, (str, bytes)):
            raise ValueError(f"{name} must be a sequence of token ids, got {type(ids).__name__}")
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"{name} must be a 1-D array of integers, got {ids.dtype} shape {ids.shape}")
            ids = ids.tolist()
        if isinstance(ids, (list, tuple)) and ids and set(map(type, ids)) == {int} \
                and min(ids) >= 0 and max(ids) < self.vocab_size:
            return list(ids)  # the common case, checked without a Python loop (score_batch's thousands)
        out = []
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise ValueError(f"{name}[{i}] = {t!r} is not an integer token id")
            t = int(t)
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"{name}[{i}] = {t} is outside the vocabulary [0, {self.vocab_size})")
            out.append(t)
        if not out and not allow_empty:
            raise ValueError(f"{name} is empty; pass at least one token id")
        return out

    # -- model ---------------------------------------------------------------------
    def logits(self, token_ids) -> np.ndarray:
        """Logits (float32, shape (len(token_ids), vocab_size)) of a full forward pass.

        Stateless: it evaluates a sequence of its own, freed afterwards.
        """
        ids = self._open()._check_ids(token_ids, "token_ids")
        if len(ids) > self.max_context:
            raise ValueError(f"token_ids has {len(ids)} tokens, more than max_context {self.max_context}")
        seq = self._rt.seq_new()
        try:
            return self._rt.eval([(seq, ids, "all")])
        finally:
            self._rt.seq_free(seq)

    def score(self, context_ids, continuation_ids) -> ScoreResult:
        """Log-probabilities of `continuation_ids` given `context_ids` (token ids, BOS first
        when the model should see it): `.logprobs` has one float per continuation token
        (log-softmax accumulated in float64), `.is_greedy` says whether greedy decoding
        would produce the continuation. See `score_batch` for many pairs."""
        return self.score_batch([(context_ids, continuation_ids)])[0]

    def score_batch(self, pairs) -> List[ScoreResult]:
        """`score` for each (context_ids, continuation_ids) pair, in order. Pairs that share a
        prefix (the context of several choices, few-shot examples) compute it once: the
        requests run in lexicographic order, each forking the KV of what it shares with the
        previous one, several at a time in batched steps. `self.last_score_stats` then says
        how many tokens were forwarded against the pairs' total length."""
        self._open()
        if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
            raise ValueError(f"pairs must be a list of (context_ids, continuation_ids), got {type(pairs).__name__}")
        checked = []
        for i, p in enumerate(pairs):
            if not isinstance(p, (tuple, list)) or len(p) != 2:
                raise ValueError(f"pairs[{i}] must be a (context_ids, continuation_ids) pair, got {p!r}")
            ctx = self._check_ids(p[0], f"pairs[{i}] context_ids", allow_empty=True)
            cont = self._check_ids(p[1], f"pairs[{i}] continuation_ids", allow_empty=True)
            if not ctx:
                raise ValueError(f"pairs[{i}]: the context is empty; it needs at least one token (e.g. BOS, "
                                 f"{self.bos_token_id}) to predict the first continuation token from")
            if not cont:
                raise ValueError(f"pairs[{i}]: the continuation is empty; pass at least one token")
            if len(ctx) + len(cont) - 1 > self.max_context:
                raise ValueError(f"pairs[{i}]: context ({len(ctx)}) + continuation ({len(cont)}) - 1 tokens exceed "
                                 f"max_context {self.max_context}; truncate the context from the left")
            checked.append((ctx, cont))
        if not checked:
            self.last_score_stats = {"pairs": 0, "tokens_requested": 0, "tokens_forwarded": 0, "steps": 0}
            return []
        out, self.last_score_stats = self._rt.score_batch(checked)
        return [ScoreResult(logprobs=lp.tolist(), is_greedy=bool(g)) for lp, g in out]

    # -- generation ------------------------------------------------------------------
    def _sampling(self, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop):
        """Checked request parameters as a dict for _core.Engine.submit."""
        max_new_tokens = _check_int("max_new_tokens", max_new_tokens, lo=0)
        temperature = _check_float("temperature", temperature)
        top_k = _check_int("top_k", top_k)
        top_p = _check_float("top_p", top_p)
        min_p = _check_float("min_p", min_p)
        repetition_penalty = _check_float("repetition_penalty", repetition_penalty)
        # The core's sampler checks these ranges too (for C++ callers); checking here
        # reports the values in Python's notation, as the caller wrote them.
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {min_p}")
        if not repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")
        # Past what the core's integers hold (int32 top_k, int64 max_new_tokens) the meaning is
        # already reached: a top_k of at least the vocabulary keeps every token (as 0 does) and
        # generation stops at the context; so clamp rather than fail in the binding (fuzzing
        # found the TypeError that escaped as a server error, issue 19).
        top_k = min(top_k, 2**31 - 1)
        max_new_tokens = min(max_new_tokens, 2**63 - 1)
        if seed is None:
            seed = secrets.randbits(64)
        seed = _check_int("seed", seed, lo=0)
        if seed >= 2**64:
            raise ValueError(f"seed must be < 2**64, got {seed}")
        return dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=self._stops(stop))

    def _stops(self, stop):
        stops = self._check_stop(stop)
        if stops and self._tok is None:
            self._tokenizer("a stop string")  # raises
        return stops

    def _prompt_ids(self, prompt, name, max_new_tokens):
        ids = self.tokenize(prompt) if isinstance(prompt, str) else self._check_ids(prompt, name)
        if max_new_tokens > 0 and len(ids) >= self.max_context:
            raise ValueError(
                f"{name} has {len(ids)} tokens but max_context is {self.max_context}, leaving no room "
                f"to generate; shorten the prompt or create the Session with a larger max_context")
        if len(ids) > self.max_context:
            raise ValueError(f"{name} has {len(ids)} tokens, more than max_context {self.max_context}")
        return ids

    def generate(self, prompt: Prompt, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, seed=None, stop=None, stream: bool = False, *,
                 prompt_lookup_num_tokens=None, max_matching_ngram_size=2, assistant_model=None,
                 assistant=None, num_assistant_tokens=None, num_assistant_tokens_schedule="constant",
                 assistant_confidence_threshold=0.4, speculation="adaptive", ngram_cache=None,
                 ngram_corpus=None, ngram_num_tokens=None):
        """Generate a continuation of `prompt` (a str, tokenized with BOS, or token ids as is).

        temperature=0 is greedy decoding; otherwise the logits go through
        repetition_penalty, temperature, top_k, top_p and min_p (Hugging Face order and
        semantics) and a token is drawn with a generator seeded by `seed` (random when
        None). Generation ends at EOS, after max_new_tokens, at a `stop` string (str or
        list of str; the text is cut before it), or when the context is full.

        The keys and values of earlier generations stay in the prefix cache: a prompt that
        extends an earlier sequence (a chat's next turn) evaluates only its new tokens
        (`result.cached_tokens` counts the others). The output is the same either way.

        Returns a GenerationResult, or with stream=True a GenerationStream: an iterator
        of text pieces whose `.result` is set once it is exhausted. Streams of one Session
        may be iterated alternately: they run batched. A model without a tokenizer takes
        token ids only and returns `.text` None (no stream, no stop strings).

        Speculative generation (docs/SPECULATIVE.md): `prompt_lookup_num_tokens=N`
        proposes continuations of an earlier occurrence of the last `max_matching_ngram_size`
        tokens (Hugging Face's prompt lookup); `assistant_model` (alias `assistant`: a Session
        or an .oelm path of a model with the same tokenizer) proposes its own continuation,
        up to `num_assistant_tokens` per step, stopping where its confidence falls below
        `assistant_confidence_threshold`. Both may be given (prompt lookup is tried first).
        One target step checks the proposals; the output is the plain generation's (greedy:
        the same tokens; sampling: the same distribution, and with prompt lookup the same
        tokens for a seed). speculation="adaptive" (default) checks as many tokens per step
        as the measured cost of a k-token step and the acceptance so far make worthwhile,
        none when speculation would be slower; "hf" uses Hugging Face's fixed numbers
        (`num_assistant_tokens` default 20, `num_assistant_tokens_schedule` "constant" or
        "heuristic"). `ngram_cache=True` drafts from the counts of the n-grams of this sequence,
        of the Session's earlier generations and of `ngram_corpus` (text, token ids, a list of
        them, or `build_ngram_cache(corpus)`), up to `ngram_num_tokens` per step (llama.cpp's
        lookup decoding); in the adaptive mode it is on whenever speculation is (after prompt
        lookup, before the assistant) unless ngram_cache=False. `result.speculation` reports
        what it did. generate_batch speculates too (not with an assistant).
        """
        self._open()
        if stream and self._tok is None:
            self._tokenizer("streaming text")  # raises
        params = self._sampling(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop)
        spec = self._speculation(prompt_lookup_num_tokens, max_matching_ngram_size, assistant_model, assistant,
                                 num_assistant_tokens, num_assistant_tokens_schedule,
                                 assistant_confidence_threshold, speculation, ngram_cache, ngram_corpus,
                                 ngram_num_tokens)
        ids = self._prompt_ids(prompt, "prompt", params["max_new_tokens"])
        if spec is not None:
            it = speculative.SpeculativeStream(self, ids, params, spec)
        else:
            it = GenerationStream(self, ids, params)
        if stream:
            return it
        return it._drain()

    def _speculation(self, prompt_lookup_num_tokens, max_matching_ngram_size, assistant_model, assistant,
                     num_assistant_tokens, schedule, threshold, mode, ngram_cache=None, ngram_corpus=None,
                     ngram_num_tokens=None):
        """Checked speculation arguments (SpeculationOptions), or None for a plain generation."""
        if assistant is not None and assistant_model is not None:
            raise ValueError("give the assistant as assistant_model= or assistant=, not both")
        assistant = assistant_model if assistant_model is not None else assistant
        if mode not in speculative.MODES:
            raise ValueError(f"speculation must be one of {', '.join(map(repr, speculative.MODES))}, got {mode!r}")
        if prompt_lookup_num_tokens is not None:
            prompt_lookup_num_tokens = _check_int("prompt_lookup_num_tokens", prompt_lookup_num_tokens, lo=0)
        max_matching_ngram_size = _check_int("max_matching_ngram_size", max_matching_ngram_size, lo=1)
        if num_assistant_tokens is not None:
            num_assistant_tokens = _check_int("num_assistant_tokens", num_assistant_tokens, lo=1)
        if schedule not in speculative.SCHEDULES:
            raise ValueError(f"num_assistant_tokens_schedule must be one of "
                             f"{', '.join(map(repr, speculative.SCHEDULES))}, got {schedule!r}")
        threshold = _check_float("assistant_confidence_threshold", threshold)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"assistant_confidence_threshold must be in [0, 1] (0 = off), got {threshold}")
        if ngram_cache is not None and not isinstance(ngram_cache, bool):
            raise ValueError(f"ngram_cache must be True, False or None (on in the adaptive mode whenever "
                             f"speculation is), got {ngram_cache!r}")
        if ngram_num_tokens is not None:
            ngram_num_tokens = _check_int("ngram_num_tokens", ngram_num_tokens, lo=1)
        static = self.build_ngram_cache(ngram_corpus) if ngram_corpus is not None else None
        if ngram_cache is False and static is not None:
            raise ValueError("ngram_corpus is given but ngram_cache=False; drop one of them")
        if ngram_cache is None:  # on when a corpus is given, or beside the other proposers (adaptive mode)
            ngram_cache = static is not None or (mode == "adaptive" and bool(prompt_lookup_num_tokens or assistant))
        if not prompt_lookup_num_tokens and assistant is None and not ngram_cache:
            return None
        if assistant is not None:
            assistant = self._assistant(assistant)
        return speculative.SpeculationOptions(
            ngram_cache=ngram_cache, ngram_num_tokens=ngram_num_tokens, ngram_static=static,
            mode=mode, prompt_lookup_num_tokens=prompt_lookup_num_tokens or None,
            max_matching_ngram_size=max_matching_ngram_size, assistant=assistant,
            num_assistant_tokens=num_assistant_tokens, num_assistant_tokens_schedule=schedule,
            assistant_confidence_threshold=threshold)

    def build_ngram_cache(self, corpus) -> "speculative.NgramCache":
        """An n-gram cache of a corpus for `generate(..., ngram_corpus=...)` (llama.cpp's static
        lookup cache: the tokens that follow each 2-gram): `corpus` is text, token ids, or a
        list of texts or token-id lists. Build it once and pass it to every generation; an
        NgramCache is returned as is."""
        if isinstance(corpus, speculative.NgramCache):
            return corpus
        single = isinstance(corpus, str) or (isinstance(corpus, (list, tuple, np.ndarray)) and len(corpus) > 0
                                             and isinstance(corpus[0], (numbers.Integral, np.integer)))
        parts = [corpus] if single else corpus
        if isinstance(parts, (bytes, dict)) or not isinstance(parts, (Sequence, np.ndarray)):
            raise ValueError(f"ngram_corpus must be text, token ids, a list of texts or token-id lists, or an "
                             f"openelm_rt.NgramCache, got {type(corpus).__name__}")
        cache = speculative.NgramCache()
        for i, p in enumerate(parts):
            if isinstance(p, str):
                ids = self._tokenizer("an ngram_corpus text").encode(p, False)
            else:
                ids = self._check_ids(p, "ngram_corpus" if single else f"ngram_corpus[{i}]", allow_empty=True)
            cache.add(ids)
        return cache

    def _assistant(self, a) -> "Session":
        """The assistant as an open Session (a path is opened once and kept), checked to share
        this model's vocabulary."""
        if isinstance(a, (str, os.PathLike)):
            path = os.fspath(a)
            if path not in self._assistants:
                if not os.path.exists(path):
                    raise FileNotFoundError(f"assistant model {path}: no such file; pass an .oelm file "
                                            f"exported with openelm-rt-export (or an open Session)")
                self._assistants[path] = Session(path, threads=self.threads, max_context=self.max_context,
                                                 max_batch=1, prefix_cache=0)
            a = self._assistants[path]
        if not isinstance(a, Session):
            raise ValueError(f"assistant_model must be a Session or the path of an .oelm file, "
                             f"got {type(a).__name__}")
        a._open()
        if a.vocab_size != self.vocab_size or a.eos_token_id != self.eos_token_id:
            raise ValueError(f"the assistant {a.path} has vocab_size {a.vocab_size} and EOS {a.eos_token_id}, "
                             f"this model {self.vocab_size} and {self.eos_token_id}: an assistant must use the "
                             f"same tokenizer (every OpenELM size does)")
        if a._tok is not None and self._tok is not None and \
                a._model.tokenizer_blob() != self._model.tokenizer_blob():
            raise ValueError(f"the assistant {a.path} stores a different tokenizer from {self.path}; an "
                             f"assistant must use the same tokenizer (every OpenELM size does)")
        return a

    def generate_batch(self, prompts, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                       repetition_penalty=1.0, seed=None, stop=None, stream: bool = False, *,
                       prompt_lookup_num_tokens=None, max_matching_ngram_size=2, ngram_cache=None,
                       ngram_corpus=None, ngram_num_tokens=None, speculation="adaptive", assistant_model=None,
                       assistant=None):
        """`generate` for many prompts at once, batched: one forward pass per step serves every
        sequence (the weights are read once per step instead of once per prompt).

        Each keyword is either one value for all prompts or a list with one value per prompt
        (`stop` per prompt: a list of str-or-list). A seeded prompt gives the same tokens as
        `generate` with the same arguments. Returns a list of GenerationResult in prompt order;
        with stream=True a BatchStream iterating (index, text piece) pairs as they arrive, whose
        `.results` is set once it is exhausted.

        Speculative generation (docs/SPECULATIVE.md): `prompt_lookup_num_tokens`,
        `max_matching_ngram_size`, `ngram_cache`, `ngram_corpus`, `ngram_num_tokens` and
        `speculation` as in `generate` (one value for all prompts): every row proposes its own
        tokens and one batched step checks them all (in the adaptive mode, as many per row as
        the measured step cost and each row's acceptance make worthwhile). The output is the
        plain generation's. An assistant model is not supported here (use `generate`).
        """
        self._open()
        if stream and self._tok is None:
            self._tokenizer("streaming text")  # raises
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise ValueError(f"prompts must be a list of prompts (str or token ids), got {type(prompts).__name__}")
        n = len(prompts)
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                  repetition_penalty=repetition_penalty, seed=seed, stop=stop)
        per = []
        for name, v in kw.items():
            is_list = isinstance(v, (list, tuple)) and not (name == "stop" and all(isinstance(x, str) for x in v))
            if is_list and len(v) != n:
                raise ValueError(f"{name} has {len(v)} values for {n} prompts; give one value, or one per prompt")
            per.append((name, v if is_list else [v] * n))
        if assistant_model is not None or assistant is not None:
            raise ValueError("generate_batch does not take an assistant model yet; use generate() (one prompt at "
                             "a time) with assistant_model=, or prompt_lookup_num_tokens / ngram_cache here")
        spec = self._speculation(prompt_lookup_num_tokens, max_matching_ngram_size, None, None, None, "constant",
                                 0.4, speculation, ngram_cache, ngram_corpus, ngram_num_tokens)
        jobs = []
        for i in range(n):
            args = {name: vals[i] for name, vals in per}
            params = self._sampling(args["max_new_tokens"], args["temperature"], args["top_k"], args["top_p"],
                                    args["min_p"], args["repetition_penalty"], args["seed"], args["stop"])
            jobs.append((self._prompt_ids(prompts[i], f"prompts[{i}]", params["max_new_tokens"]), params))
        if spec is not None:
            it = speculative.SpeculativeBatchStream(self, jobs, spec, self._max_batch)
            if stream:
                return it
            for _ in it:
                pass
            return it.results
        streams = []
        try:
            for ids, params in jobs:
                streams.append(GenerationStream(self, ids, params))
        except BaseException:
            for st in streams:
                st.close()
            raise
        it = BatchStream(self, streams)
        if stream:
            return it
        for _ in it:
            pass
        return it.results

    def _pump(self):
        """One engine step; its events go to their streams."""
        busy = self._engine.step()
        for e in self._engine.take_events():
            st = self._streams.get(e["id"])
            if st is not None:
                st._on_event(e)
        return busy

    @staticmethod
    def _check_stop(stop):
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else list(stop)
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        return stops

    # -- lifetime ------------------------------------------------------------------
    def close(self):
        """Release the model mapping and buffers (also done when the Session is collected).

        Idempotent; any later call on the Session raises ValueError."""
        for st in list(self._streams.values()):
            st._closed = True
        self._streams = {}
        for a in getattr(self, "_assistants", {}).values():
            a.close()
        self._assistants = {}
        self._engine = self._rt = self._backend = self._model = self._tok = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class GenerationStream:
    """Iterator of generated text pieces; `.result` holds the GenerationResult at the end.

    Pieces never end inside an incomplete UTF-8 character or inside a possible stop
    string, and "".join(pieces) == result.text. Iterating steps the Session's engine, which
    also advances the Session's other live streams (they are batched together). A stream
    dropped before its end is cancelled.
    """

    def __init__(self, session: Session, prompt_ids, params):
        self._s = session
        self._prompt = prompt_ids
        self._pending = []  # pieces received, not yet handed out
        self._text = []     # pieces handed out
        self._ids = []
        self._final = None  # the request's last event
        self._closed = False
        self.result = None
        self._id = session._engine.submit(prompt_ids, **params)
        session._streams[self._id] = self

    def _on_event(self, e):
        if e["token"] >= 0:
            self._ids.append(e["token"])
        if e["text"]:
            self._pending.append(e["text"])
        if e["finish"]:
            self._s._streams.pop(self._id, None)
            self._final = e

    def _take(self):
        """The next piece, or None once the generation has ended and every piece was taken."""
        if self._pending:
            piece = self._pending.pop(0)
            self._text.append(piece)
            return piece
        if self._final is not None and self.result is None:
            e = self._final
            if e["finish"] == "error":
                if e["error_kind"] == "model":  # non-finite logits: a corrupt model file
                    raise FormatError(e["error"])
                if e["error_kind"] == "kv_budget":
                    raise KVBudgetError(e["error"])
                raise RuntimeError(e["error"])
            self.result = GenerationResult(
                text="".join(self._text) if self._s._tok is not None else None, token_ids=self._ids,
                finish_reason=e["finish"],
                prompt_token_ids=list(self._prompt), prefill_seconds=e["prefill_seconds"],
                decode_seconds=e["decode_seconds"], n_decoded=e["n_decoded"], cached_tokens=e["n_cached"])
            self._s._ngram_history.record(self.result.prompt_token_ids + self._ids)
        return None

    def _ended(self):
        return self._final is not None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            while not self._pending and self._final is None:
                if self._closed or self._s._engine is None:
                    raise ValueError("this generation was closed (or its Session was); start a new one")
                self._s._pump()
        except BaseException:
            self.close()  # Ctrl-C or an error: this generation ends; the Session stays usable
            raise
        piece = self._take()
        if piece is None:
            raise StopIteration
        return piece

    def _drain(self) -> GenerationResult:
        for _ in self:
            pass
        return self.result

    def close(self):
        """Cancel the generation if it is still running (its KV goes back to the pool)."""
        if self._final is None and not self._closed and self._s._engine is not None:
            self._closed = True
            self._s._engine.cancel(self._id)
            while self._final is None and self._id in self._s._streams:
                self._s._pump()
        self._closed = True

    def __del__(self):
        try:
            if self._final is None and not self._closed and self._s._engine is not None:
                self._s._engine.cancel(self._id)  # the next step frees it
        except Exception:
            pass


class BatchStream:
    """Iterator of (prompt index, text piece) pairs from `Session.generate_batch(stream=True)`,
    in the order they are produced; `.results` (one GenerationResult per prompt, in order) is
    set once it is exhausted."""

    def __init__(self, session: Session, streams):
        self._s = session
        self._streams = streams
        self.results = None

    def __iter__(self):
        return self

    def __next__(self) -> Tuple[int, str]:
        try:
            while True:
                for i, st in enumerate(self._streams):
                    if st._pending:
                        return i, st._take()
                if all(st._ended() for st in self._streams):
                    break
                self._s._pump()
        except BaseException:
            self.close()
            raise
        for st in self._streams:
            st._take()
        self.results = [st.result for st in self._streams]
        raise StopIteration

    def close(self):
        """Cancel every generation of the batch still running."""
        for st in self._streams:
            st.close()
