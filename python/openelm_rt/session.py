"""Session: load an .oelm model and run it (tokenize, logits, generate).

A thin layer over the C++ core (`openelm_rt._core`): argument checking with clear
errors, the OpenELM Instruct chat format, text assembly for streaming and stop strings.
Tokenization is native (the core's SentencePiece-exact tokenizer, built from the
vocabulary stored in the model file); all numeric work happens in C++ with the GIL
released. One Session is not safe to use from several threads at once.
"""

from __future__ import annotations

import numbers
import os
import secrets
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence, Union

import numpy as np

from . import _core

FormatError = _core.FormatError

Prompt = Union[str, Sequence[int]]
Message = Dict[str, str]

CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class GenerationResult:
    """What `Session.generate` returns."""

    text: str  # the generated text only (no prompt)
    token_ids: list  # the generated token ids (EOS included when generated)
    finish_reason: str  # "eos", "length", "stop" (a stop string) or "context" (context full)
    prompt_token_ids: list = field(repr=False, default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    n_decoded: int = field(repr=False, default=0)

    @property
    def prefill_tokens_per_s(self) -> float:
        n = len(self.prompt_token_ids)
        return n / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.n_decoded / self.decode_seconds if self.decode_seconds > 0 else 0.0


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
    """An OpenELM model loaded from an .oelm file, ready to generate.

    Args:
        path: the .oelm file written by `openelm-rt-export`.
        threads: worker threads (default: one per hardware thread).
        max_context: longest sequence (prompt + generated tokens) this session holds;
            default: the model's training context (2048 for the released models).
        verify: check every tensor's CRC-32 at load (reads the whole file once).
        backend: "cpu" (default) or "ref", the single-threaded scalar reference.
    """

    def __init__(self, path, threads=None, max_context=None, verify=False, backend="cpu"):
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path}: no such file; export a model with "
                f"`openelm-rt-export CHECKPOINT_DIR -o model.oelm` first")
        if backend not in ("cpu", "ref"):
            raise ValueError(f"backend must be 'cpu' or 'ref', got {backend!r}")
        if threads is None:
            threads = 1 if backend == "ref" else 0
        else:
            threads = _check_int("threads", threads, lo=1)
        self._model = _core.Model(path, bool(verify))
        self._backend = _core.Backend(backend, threads)
        cfg = self._model.config
        self.config = dict(cfg)
        if max_context is None:
            max_context = int(cfg["max_context"])
        max_context = _check_int("max_context", max_context, lo=2)
        self._ctx = _core.Context(self._model, max_context, self._backend)
        self._tok = self._model.tokenizer  # validated by the core at load
        self.path = path
        self._active = None  # the generation currently using self._ctx

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
        return self._open()._ctx.max_context

    def _open(self):
        if self._model is None:
            raise ValueError("this Session is closed; create a new Session to keep working")
        return self

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

    def __repr__(self):
        c = self.config
        return (f"Session({self.path!r}, layers={c['n_layer']}, d_model={c['d_model']}, "
                f"dtype={self._model.weights_dtype}, backend={self.backend!r}, kernels={self.kernels!r}, "
                f"threads={self.threads}, "
                f"max_context={self.max_context})")

    # -- tokenizer ------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True) -> list:
        """Token ids of `text`, with BOS first (as OpenELM was trained) unless add_bos=False."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return self._open()._tok.encode(text, bool(add_bos))

    def detokenize(self, ids) -> str:
        """Text of token ids; BOS/EOS and other control tokens produce no text."""
        return self._open()._tok.decode(self._check_ids(ids, "ids", allow_empty=True))

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
        tok, eos = self._open()._tok, self.eos_token_id
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

        Stateless: it uses its own KV cache and leaves the session's untouched.
        """
        ids = self._open()._check_ids(token_ids, "token_ids")
        if len(ids) > self.max_context:
            raise ValueError(f"token_ids has {len(ids)} tokens, more than max_context {self.max_context}")
        ctx = _core.Context(self._model, len(ids), self._backend)
        return ctx.eval(ids, True)

    def generate(self, prompt: Prompt, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, seed=None, stop=None, stream: bool = False):
        """Generate a continuation of `prompt` (a str, tokenized with BOS, or token ids as is).

        temperature=0 is greedy decoding; otherwise the logits go through
        repetition_penalty, temperature, top_k, top_p and min_p (Hugging Face order and
        semantics) and a token is drawn with a generator seeded by `seed` (random when
        None). Generation ends at EOS, after max_new_tokens, at a `stop` string (str or
        list of str; the text is cut before it), or when the context is full.

        Returns a GenerationResult, or with stream=True a GenerationStream: an iterator
        of text pieces whose `.result` is set once it is exhausted.
        """
        self._open()
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
        if seed is None:
            seed = secrets.randbits(64)
        seed = _check_int("seed", seed, lo=0)
        if seed >= 2**64:
            raise ValueError(f"seed must be < 2**64, got {seed}")
        stops = self._check_stop(stop)
        if isinstance(prompt, str):
            ids = self.tokenize(prompt)
        else:
            ids = self._check_ids(prompt, "prompt")
        if max_new_tokens > 0 and len(ids) >= self.max_context:
            raise ValueError(
                f"prompt has {len(ids)} tokens but max_context is {self.max_context}, leaving no room "
                f"to generate; shorten the prompt or create the Session with a larger max_context")
        gen = _core.Generator(self._ctx, temperature, top_k, top_p, min_p, repetition_penalty,
                              seed, max_new_tokens)
        it = GenerationStream(self, gen, ids, stops)
        if stream:
            return it
        for _ in it:
            pass
        return it.result

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
        self._active = None
        self._ctx = self._backend = self._model = self._tok = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class GenerationStream:
    """Iterator of generated text pieces; `.result` holds the GenerationResult at the end.

    Pieces never end inside an incomplete UTF-8 character or inside a possible stop
    string, and "".join(pieces) == result.text.
    """

    def __init__(self, session: Session, gen, prompt_ids, stops):
        self._s = session
        self._gen = gen
        self._prompt = prompt_ids
        self._stops = stops
        self.result = None
        session._active = self
        gen.start(prompt_ids)  # prefill happens here, so errors surface at the call
        self._pieces = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def _find_stop(self, text, start):
        """Index of the first stop string in text[start:] (start clamped to 0), or -1."""
        found = [i for i in (text.find(s, max(0, start)) for s in self._stops) if i >= 0]
        return min(found, default=-1)

    def _run(self):
        gen, stops = self._gen, self._stops
        # The native incremental decoder, after the prompt: the new text then follows the
        # prompt's (keeping its leading space unless the prompt has no text) and never
        # ends inside a UTF-8 character. Bytes the prompt leaves unfinished stay its own.
        dec = _core.StreamDecoder(self._s._tok)
        for t in self._prompt:
            dec.push(t)
        dec.flush()
        new_ids = []
        text = ""
        emitted = 0
        finish = None
        holdback = max((len(s) for s in stops), default=1) - 1
        while True:
            if self._s._active is not self:
                raise RuntimeError("this generation was superseded by a newer generate() call on the "
                                   "same Session; finish iterating a stream before starting another")
            tok = gen.next()
            if tok < 0:
                break
            new_ids.append(tok)
            text += dec.push(tok)
            cut = self._find_stop(text, emitted - holdback)
            if cut >= 0:
                text, finish = text[:cut], "stop"
                break
            safe = len(text) - holdback
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        if finish is None:
            finish = gen.finish_reason
            text += dec.flush()
            cut = self._find_stop(text, emitted - holdback)  # the flushed bytes (U+FFFD) may end one
            if cut >= 0:
                text, finish = text[:cut], "stop"
        if len(text) > emitted:
            yield text[emitted:]
        self.result = GenerationResult(
            text=text, token_ids=new_ids, finish_reason=finish, prompt_token_ids=list(self._prompt),
            prefill_seconds=gen.prefill_seconds, decode_seconds=gen.decode_seconds,
            n_decoded=gen.n_decoded)
        if self._s._active is self:
            self._s._active = None
