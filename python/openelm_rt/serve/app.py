"""The OpenAI-compatible HTTP server: a FastAPI app over one AsyncEngine (one model per process).

Endpoints: GET /v1/models, POST /v1/completions and /v1/chat/completions (streamed as SSE or
not), GET /health (503 while the model loads), POST /tokenize and /detokenize, GET /metrics
(Prometheus). Chat prompts use the OpenELM Instruct format (`Session.chat_token_ids`), never
another template. A client that disconnects cancels its sequences at once; a full queue
answers 503 with Retry-After. `openelm-rt serve` runs it under uvicorn (`serve.main`).
"""
from __future__ import annotations

import asyncio
import functools
import json
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Histogram, generate_latest, CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..session import Session
from .engine import AsyncEngine

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_N = 64          # choices per request
MAX_LOGPROBS = 20   # top log-probabilities per token
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat: the rest of the context


# ---------------------------------------------------------------------------------------------- options
@dataclass
class ServeOptions:
    """What `openelm-rt serve` configures (see its --help)."""
    model: Optional[str] = None          # .oelm path (loaded in the background; /health is 503 until then)
    model_name: Optional[str] = None     # the id /v1/models reports (default: the file's stem)
    api_key: Optional[str] = None        # required as `Authorization: Bearer KEY` when set
    max_batch: int = 16                  # sequences generating at once
    max_queue: int = 64                  # sequences waiting beyond those; more get 503 + Retry-After
    threads: Optional[int] = None
    max_context: Optional[int] = None
    kv_budget: Optional[str] = None
    kv_dtype: str = "f32"
    prefix_cache: int = 16
    prefill_chunk: Optional[int] = None  # prompt tokens per step while others decode (None: the engine's, 64)
    keepalive_s: float = 10.0            # SSE comment sent while a stream is silent this long
    session_kwargs: Dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- errors
class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, type_: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.type = type_ or {401: "authentication_error", 404: "not_found_error",
                               503: "service_unavailable"}.get(status, "invalid_request_error" if status < 500
                                                               else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


# ---------------------------------------------------------------------------------------------- requests
class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields are ignored, as OpenAI clients expect


class StreamOptions(_Loose):
    include_usage: Optional[bool] = None


class _Sampling(_Loose):
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Optional[int] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[Dict[str, float]] = None
    user: Optional[str] = None
    # extensions (vLLM / llama-server names)
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    logprobs: Optional[int] = None
    echo: Optional[bool] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class ChatMessage(_Loose):
    role: str
    content: Optional[Union[str, List[Dict[str, Any]]]] = None
    name: Optional[str] = None


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessage]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[List[Any]] = None
    tool_choice: Optional[Any] = None
    functions: Optional[List[Any]] = None
    function_call: Optional[Any] = None
    response_format: Optional[Dict[str, Any]] = None


class TokenizeRequest(_Loose):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[List[ChatMessage]] = None
    add_special_tokens: Optional[bool] = None


class DetokenizeRequest(_Loose):
    model: Optional[str] = None
    tokens: List[int]


# ---------------------------------------------------------------------------------------------- metrics
OVERHEAD_STAGES = ("admit", "first_token", "token", "ttft", "response")
OVERHEAD_BUCKETS = (25e-6, 50e-6, 100e-6, 200e-6, 350e-6, 500e-6, 750e-6, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 7.5e-3,
                    0.01, 0.025, 0.05, 0.1, 0.25, 1)
TIMING_KEY = "openelm_rt.timing"  # the ASGI scope's per-request timing dict (set by the app's Guard)


class Metrics:
    """Prometheus metrics of one server: engine counters read at scrape time, latency histograms."""

    def __init__(self, app_state):
        self.registry = CollectorRegistry()
        self._state = app_state
        self.registry.register(self)
        lat = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("openelm_time_to_first_token_seconds", "Time from submission to the first token",
                              buckets=lat, registry=self.registry)
        self.itl = Histogram("openelm_inter_token_latency_seconds", "Time between two tokens of a sequence",
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.5, 5),
                             registry=self.registry)
        self.e2e = Histogram("openelm_request_duration_seconds", "Time from submission to the last token",
                             buckets=lat, registry=self.registry)
        self.finished = {}  # reason -> count
        # What the server itself adds to a request's latency (its own timestamps, not the
        # difference of two end-to-end runs): see `Metrics.OVERHEAD_STAGES`.
        ovh = Histogram("openelm_server_overhead_seconds",
                        "Latency the server adds, by stage: admit = request received -> its sequences submitted "
                        "to the engine; first_token / token = the engine emitted a token -> its SSE chunk handed "
                        "to the transport; ttft = admit + first_token of the same request; response = a "
                        "non-streamed request's last token -> its JSON response handed to the transport",
                        labelnames=["stage"], buckets=OVERHEAD_BUCKETS, registry=self.registry)
        self.overhead = {stage: ovh.labels(stage) for stage in OVERHEAD_STAGES}

    def on_token(self, req, seconds, first):
        (self.ttft if first else self.itl).observe(seconds)

    def on_sent(self, tm: dict, t_emit: float, now: float):
        """A body message of a request went to the transport; tm (its timing dict) says which token
        it carried (tm['stage']: first / token / response) and when the request was admitted."""
        d = now - t_emit
        stage = tm["stage"]
        self.overhead[stage].observe(d)
        if stage == "first_token" and "admit" in tm:
            self.overhead["ttft"].observe(tm["admit"] + d)

    def on_finish(self, req, event):
        self.e2e.observe(time.perf_counter() - req.t_submit)
        self.finished[event["finish"]] = self.finished.get(event["finish"], 0) + 1

    def collect(self):
        eng = self._state.engine
        s = eng.stats() if eng is not None else {}
        g = GaugeMetricFamily("openelm_requests_running", "Sequences generating now")
        g.add_metric([], s.get("running", 0))
        yield g
        g = GaugeMetricFamily("openelm_requests_waiting", "Sequences queued for a slot")
        g.add_metric([], s.get("waiting", 0))
        yield g
        for name, key, doc in (
                ("openelm_prompt_tokens", "prompt_tokens", "Prompt tokens of admitted sequences"),
                ("openelm_prompt_tokens_cached", "cached_tokens", "Prompt tokens served from the prefix cache"),
                ("openelm_generation_tokens", "generated", "Generated tokens"),
                ("openelm_requests_cancelled", "cancelled", "Sequences cancelled (client gone, or shutdown)"),
                ("openelm_preemptions", "preempted", "Sequences preempted when the KV budget ran short"),
                ("openelm_engine_steps", "steps", "Forward passes"),
                ("openelm_engine_decode_rows", "decode_rows", "Decode rows over all forward passes")):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], s.get(key, 0))
            yield c
        g = GaugeMetricFamily("openelm_mean_batch_size", "Decoding sequences per forward pass, mean since start")
        g.add_metric([], s.get("decode_rows", 0) / s["steps"] if s.get("steps") else 0.0)
        yield g
        c = CounterMetricFamily("openelm_requests_finished", "Sequences finished, by reason", labels=["reason"])
        for reason, n in sorted(self.finished.items()):
            c.add_metric([reason], n)
        yield c


# ---------------------------------------------------------------------------------------------- helpers
def _now() -> int:
    return int(time.time())


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass
class Job:
    """One choice: which prompt, its engine request, what it has produced."""
    index: int
    prompt_ids: List[int]
    req: Any = None
    text: List[str] = field(default_factory=list)
    tokens: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    tops: List[list] = field(default_factory=list)
    prompt_lp: Any = None
    prompt_top: Any = None
    final: Optional[dict] = None


class Server:
    """State of one app: options, the engine once loaded, metrics."""

    def __init__(self, options: ServeOptions, session: Optional[Session] = None):
        self.opt = options
        self.session = session
        self.engine: Optional[AsyncEngine] = None
        self.load_error: Optional[str] = None
        self.metrics = Metrics(self)
        self.model_name = options.model_name or self._default_name()
        self.created = _now()

    def _default_name(self) -> str:
        import os
        path = self.opt.model or (self.session.path if self.session is not None else "openelm")
        return os.path.splitext(os.path.basename(path))[0]

    # -- lifetime ---------------------------------------------------------------------------
    async def startup(self):
        loop = asyncio.get_running_loop()
        if self.session is not None:
            self._start_engine(loop)
            return

        def load():  # in the background: /health says 503 until the engine runs
            try:
                o = self.opt
                s = Session(o.model, threads=o.threads, max_context=o.max_context, kv_budget=o.kv_budget,
                            kv_dtype=o.kv_dtype, max_batch=o.max_batch, prefix_cache=o.prefix_cache,
                            prefill_chunk=o.prefill_chunk, **o.session_kwargs)
            except Exception as e:  # reported by /health and every request
                self.load_error = f"{type(e).__name__}: {e}"
                return
            self.session = s
            loop.call_soon_threadsafe(self._start_engine, loop)

        threading.Thread(target=load, name="openelm-rt-load", daemon=True).start()

    def _start_engine(self, loop):
        eng = AsyncEngine(self.session, on_token=self.metrics.on_token, on_finish=self.metrics.on_finish)
        eng.start(loop)
        self.engine = eng

    async def shutdown(self):
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def ready(self) -> AsyncEngine:
        if self.engine is None:
            if self.load_error:
                raise APIError(500, f"the model failed to load: {self.load_error}")
            raise APIError(503, "the model is still loading; retry shortly", headers={"Retry-After": "1"})
        return self.engine

    # -- token strings ----------------------------------------------------------------------
    @functools.lru_cache(maxsize=65536)
    def token_bytes(self, tid: int) -> bytes:
        tok = self.session._tok
        piece = tok.piece(tid)
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode()

    def token_str(self, tid: int) -> str:
        return self.token_bytes(tid).decode("utf-8", errors="backslashreplace")

    # -- request checks ---------------------------------------------------------------------
    def sampling(self, r: _Sampling, max_tokens: Optional[int], n_prompt_max: int, default_max: Optional[int],
                 max_tokens_name: str) -> dict:
        s = self.session
        if r.presence_penalty or r.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported; use repetition_penalty "
                                "(Hugging Face semantics, 1 = off) instead",
                           param="presence_penalty" if r.presence_penalty else "frequency_penalty")
        if r.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        ctx = s.max_context
        if max_tokens is None:
            room = ctx - n_prompt_max
            max_tokens = room if default_max is None else min(default_max, room)
            max_tokens = max(max_tokens, 0)
        elif max_tokens < 0:
            raise APIError(400, f"{max_tokens_name} must be >= 0, got {max_tokens}", param=max_tokens_name)
        elif n_prompt_max + max_tokens > ctx:
            raise APIError(400, f"the prompt ({n_prompt_max} tokens) + {max_tokens_name} ({max_tokens}) = "
                                f"{n_prompt_max + max_tokens} tokens exceed the model's context of {ctx}; shorten "
                                f"the prompt or lower {max_tokens_name}", param=max_tokens_name)
        if n_prompt_max >= ctx and max_tokens > 0:
            raise APIError(400, f"the prompt has {n_prompt_max} tokens, filling the model's context of {ctx}; "
                                f"shorten the prompt", param="messages" if max_tokens_name != "max_tokens" else "prompt")
        stop = r.stop
        if isinstance(stop, str):
            stop = [stop]
        stop = [x for x in (stop or [])]
        if any(not x for x in stop):
            raise APIError(400, "stop strings must be non-empty", param="stop")
        seed = r.seed
        if seed is not None:
            seed %= 2 ** 64
        try:
            p = s._sampling(max_tokens, 1.0 if r.temperature is None else r.temperature,
                            0 if r.top_k is None else r.top_k, 1.0 if r.top_p is None else r.top_p,
                            0.0 if r.min_p is None else r.min_p,
                            1.0 if r.repetition_penalty is None else r.repetition_penalty, seed, stop)
        except ValueError as e:
            raise APIError(400, str(e))
        n = 1 if r.n is None else r.n
        if not 1 <= n <= MAX_N:
            raise APIError(400, f"n must be in [1, {MAX_N}], got {n}", param="n")
        p["n"] = n
        return p

    def admit(self, n_sequences: int):
        eng = self.ready()
        limit = self.opt.max_batch + self.opt.max_queue
        if eng.in_flight + n_sequences > limit:
            raise APIError(503, f"the server is busy: {eng.in_flight} sequences are running or queued (at most "
                                f"{limit}); retry later", headers={"Retry-After": "1"})
        return eng

    def chat_ids(self, messages: List[ChatMessage]) -> List[int]:
        msgs = []
        for i, m in enumerate(messages):
            role = "system" if m.role == "developer" else m.role
            if role not in ("system", "user", "assistant"):
                raise APIError(400, f"messages[{i}].role {m.role!r} is not supported; the OpenELM Instruct format "
                                    f"has the roles system (or developer), user and assistant", param=f"messages[{i}]")
            c = m.content
            if c is None:
                c = ""
            elif isinstance(c, list):
                parts = []
                for j, part in enumerate(c):
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise APIError(400, f"messages[{i}].content[{j}] has type {part.get('type')!r}; only text "
                                            f"parts ({{'type': 'text', 'text': ...}}) are supported",
                                       param=f"messages[{i}].content")
                    parts.append(part["text"])
                c = "\n".join(parts)
            msgs.append({"role": role, "content": c})
        try:
            return self.session.chat_token_ids(msgs)
        except ValueError as e:
            raise APIError(400, str(e), param="messages")


# ---------------------------------------------------------------------------------------------- running jobs
def _timing(request: Request) -> dict:
    """The request's timing dict: 'recv' (perf_counter when the app got it), then 'admit' (seconds
    to submission); a token's 'emit' time and 'stage' are set just before its bytes are sent."""
    return request.scope.get(TIMING_KEY) or {}


async def _submit(server: Server, jobs: List[Job], p: dict, logprobs: int, echo_lp: bool,
                  request: Request) -> AsyncEngine:
    eng = server.admit(len(jobs))
    queue: asyncio.Queue = asyncio.Queue()
    seed = p["seed"]
    try:
        for k, j in enumerate(jobs):
            j.req = eng.submit(j.prompt_ids, temperature=p["temperature"], top_k=p["top_k"], top_p=p["top_p"],
                               min_p=p["min_p"], repetition_penalty=p["repetition_penalty"],
                               seed=(seed + k) % 2 ** 64, max_new_tokens=p["max_new_tokens"], stop=p["stop"],
                               logprobs=logprobs, prompt_logprobs=echo_lp)
            j.req.queue = queue
    except ValueError as e:
        _cancel(eng, jobs)
        raise APIError(400, str(e))
    tm = _timing(request)
    if "recv" in tm:
        tm["admit"] = time.perf_counter() - tm["recv"]
        server.metrics.overhead["admit"].observe(tm["admit"])
    return eng


def _cancel(eng: AsyncEngine, jobs: List[Job]):
    for j in jobs:
        if j.req is not None:
            eng.cancel(j.req)


_timeout = getattr(asyncio, "timeout", None)  # Python >= 3.11


async def _events(jobs: List[Job], keepalive_s: Optional[float]):
    """(job, event) as they arrive over all jobs, None after keepalive_s of silence, until all end."""
    by_id = {j.req.id: j for j in jobs}
    queue = jobs[0].req.queue
    left = len(jobs)
    while left:
        if not queue.empty():  # the engine's events come in batches: no wait, no timer
            e = queue.get_nowait()
        elif not keepalive_s:
            e = await queue.get()
        else:
            try:
                if _timeout is not None:  # a timer, not a task per event as wait_for makes before 3.12
                    async with _timeout(keepalive_s):
                        e = await queue.get()
                else:
                    e = await asyncio.wait_for(queue.get(), keepalive_s)
            except asyncio.TimeoutError:
                yield None, None
                continue
        j = by_id[e["id"]]
        if "prompt_logprobs" in e:
            j.prompt_lp = e["prompt_logprobs"]
            j.prompt_top = e.get("prompt_top")
        if e["token"] >= 0:
            j.tokens.append(e["token"])
            j.logprobs.append(e.get("logprob", 0.0))  # absent when not asked for (or exactly 0)
            j.tops.append(e.get("top", []))
        j.text.append(e["text"])
        if e["finish"]:
            j.final = e
            left -= 1
        yield j, e


async def _watch_disconnect(request: Request, eng: AsyncEngine, jobs: List[Job]):
    """Cancels the jobs as soon as the client goes (uvicorn reports it through receive())."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            _cancel(eng, jobs)
            return


def _usage(jobs: List[Job], prompts: List[List[int]]) -> dict:
    finals = [j.final for j in jobs if j.final is not None]
    cached = max((f["n_cached"] for f in finals), default=0)
    comp = sum(f["n_generated"] for f in finals)
    prompt = sum(len(p) for p in prompts)
    return {"prompt_tokens": prompt, "completion_tokens": comp, "total_tokens": prompt + comp,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _finish(j: Job) -> Optional[str]:
    if j.final is None:
        return None
    if j.final["finish"] == "error":
        raise APIError(500, f"generation failed: {j.final.get('error') or 'unknown error'}")
    return _FINISH.get(j.final["finish"], j.final["finish"])


# ---------------------------------------------------------------------------------------------- the app
def create_app(options: Optional[ServeOptions] = None, session: Optional[Session] = None) -> FastAPI:
    """The FastAPI app. Give either options.model (a path, loaded in the background on startup) or
    an open `session` (the app starts its engine thread; the caller keeps ownership)."""
    options = options or ServeOptions()
    if session is None and not options.model:
        raise ValueError("create_app needs options.model (an .oelm path) or a Session")
    server = Server(options, session)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        await server.startup()
        yield
        await server.shutdown()

    app = FastAPI(title="openelm_rt", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible API for OpenELM models on the openelm_rt engine")
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):  # 404 unknown path, 405 wrong method
        return _error_response(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                        headers=getattr(e, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body') or 'body'}: {er.get('msg')}"
                        for er in errs[:5])
        return _error_response(APIError(400, f"invalid request: {msg}", param=loc or None))

    # -- a bearer key; a 4 MB body cap (pure ASGI: applies before the body is read) -----------
    open_paths = {"/health", "/metrics"}
    overhead_metrics = server.metrics  # (not "metrics": the /metrics endpoint below takes that name)

    class Guard:
        def __init__(self, app_):
            self.app = app_

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            tm = scope[TIMING_KEY] = {"recv": time.perf_counter()}
            raw_send = send

            async def send(msg):  # noqa: F811 -- times the bodies that carry a token (server overhead)
                await raw_send(msg)
                if "emit" in tm and msg["type"] == "http.response.body":
                    overhead_metrics.on_sent(tm, tm.pop("emit"), time.perf_counter())
            headers = dict(scope.get("headers") or [])
            if options.api_key and scope["path"] not in open_paths:
                got = headers.get(b"authorization", b"").decode("latin-1")
                want = "Bearer " + options.api_key
                if not secrets.compare_digest(got.encode(), want.encode()):
                    resp = _error_response(APIError(401, "missing or wrong API key: send the header "
                                                         "'Authorization: Bearer KEY' with the server's --api-key"))
                    return await resp(scope, receive, send)
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
                resp = _error_response(APIError(413, f"the request body has {int(length)} bytes; the limit is "
                                                     f"{MAX_BODY_BYTES}"))
                return await resp(scope, receive, send)
            seen = 0

            async def capped():
                nonlocal seen
                msg = await receive()
                if msg["type"] == "http.request":
                    seen += len(msg.get("body", b""))
                    if seen > MAX_BODY_BYTES:
                        raise APIError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes")
                return msg
            return await self.app(scope, capped, send)

    app.add_middleware(Guard)

    # -- plain endpoints -------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if server.engine is None:
            if server.load_error:
                return JSONResponse({"status": "error", "error": server.load_error}, status_code=500)
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        data = [{"id": server.model_name, "object": "model", "created": server.created, "owned_by": "openelm_rt"}]
        if server.engine is not None:
            data[0]["max_model_len"] = server.session.max_context
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        server.ready()
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt (text) or messages (a chat)", param="prompt")
        if body.messages is not None:
            ids = server.chat_ids(body.messages)
        else:
            try:
                ids = server.session.tokenize(body.prompt, add_bos=body.add_special_tokens is not False)
            except ValueError as e:
                raise APIError(400, str(e), param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": server.session.max_context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        server.ready()
        try:
            return {"prompt": server.session.detokenize(body.tokens)}
        except ValueError as e:
            raise APIError(400, str(e), param="tokens")

    # -- completions -----------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        server.ready()
        if body.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported (use n)", param="best_of")
        if body.suffix:
            raise APIError(400, "suffix (insertion) is not supported", param="suffix")
        s = server.session
        pr = body.prompt
        if isinstance(pr, str) or (isinstance(pr, list) and pr and isinstance(pr[0], int)):
            pr = [pr]
        if not pr:
            raise APIError(400, "prompt is empty", param="prompt")
        prompts, texts = [], []
        for i, x in enumerate(pr):
            try:
                if isinstance(x, str):
                    ids = s.tokenize(x)
                    texts.append(x)
                else:
                    ids = s._check_ids(x, f"prompt[{i}]")
                    texts.append(None)
            except ValueError as e:
                raise APIError(400, str(e), param="prompt")
            prompts.append(ids)
        k = body.logprobs
        if k is not None and not 0 <= k <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be in [0, {MAX_LOGPROBS}], got {k}", param="logprobs")
        echo = bool(body.echo)
        p = server.sampling(body, body.max_tokens, max(len(x) for x in prompts), DEFAULT_COMPLETION_MAX_TOKENS,
                            "max_tokens")
        jobs = [Job(index=i * p["n"] + c, prompt_ids=ids) for i, ids in enumerate(prompts) for c in range(p["n"])]
        eng = await _submit(server, jobs, p, -1 if k is None else k, echo and k is not None, request)
        rid, created = "cmpl-" + uuid.uuid4().hex, _now()

        def echo_text(j):
            t = texts[j.index // p["n"]]
            return s.detokenize(j.prompt_ids) if t is None else t

        def lp_block(j, with_prompt):
            toks, lps, tops = [], [], []
            if with_prompt:
                ids = j.prompt_ids
                toks += ids
                lps += [None] + [float(x) for x in (j.prompt_lp if j.prompt_lp is not None else [])]
                pt = j.prompt_top or [[] for _ in ids[1:]]
                tops += [None] + [{server.token_str(t): lp for t, lp in row} for row in pt]
            toks += j.tokens
            lps += [float(x) for x in j.logprobs]
            tops += [{server.token_str(t): lp for t, lp in row} for row in j.tops]
            strs = [server.token_str(t) for t in toks]
            offs, o = [], 0
            for st in strs:
                offs.append(o)
                o += len(st)
            return {"tokens": strs, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _stream(request, eng, jobs, server, lambda j, e, first: {
                "id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                "choices": [{"index": j.index,
                             "text": (echo_text(j) if echo and first else "") + e["text"],
                             "logprobs": None, "finish_reason": _finish(j)}]},
                lambda usage: {"id": rid, "object": "text_completion", "created": created,
                               "model": server.model_name, "choices": [], "usage": usage},
                include_usage, prompts, role_chunk=None)
        await _collect(request, eng, jobs)
        _mark_response(request, jobs)
        choices = []
        for j in sorted(jobs, key=lambda j: j.index):
            choices.append({"index": j.index, "text": (echo_text(j) if echo else "") + "".join(j.text),
                            "logprobs": lp_block(j, echo) if k is not None else None,
                            "finish_reason": _finish(j)})
        return {"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                "choices": choices, "usage": _usage(jobs, [j.prompt_ids for j in jobs[::p["n"]]])}

    # -- chat ------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        server.ready()
        if body.tools or body.functions or body.tool_choice not in (None, "none"):
            raise APIError(400, "tools / function calling are not supported by this server", param="tools")
        if body.response_format and body.response_format.get("type") not in (None, "text"):
            raise APIError(400, f"response_format {body.response_format.get('type')!r} is not supported; "
                                f"only 'text'", param="response_format")
        if not body.messages:
            raise APIError(400, "messages is empty; send at least one user message", param="messages")
        ids = server.chat_ids(body.messages)
        k = None
        if body.logprobs:
            k = 0 if body.top_logprobs is None else body.top_logprobs
            if not 0 <= k <= MAX_LOGPROBS:
                raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {k}", param="top_logprobs")
        elif body.top_logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        mt, name = body.max_completion_tokens, "max_completion_tokens"
        if mt is None:
            mt, name = body.max_tokens, "max_tokens"
        p = server.sampling(body, mt, len(ids), None, name)
        jobs = [Job(index=c, prompt_ids=ids) for c in range(p["n"])]
        eng = await _submit(server, jobs, p, -1 if k is None else k, False, request)
        rid, created = "chatcmpl-" + uuid.uuid4().hex, _now()

        def lp_entry(t, lp, top):
            b = server.token_bytes(t)
            return {"token": server.token_str(t), "logprob": lp, "bytes": list(b),
                    "top_logprobs": [{"token": server.token_str(u), "logprob": v,
                                      "bytes": list(server.token_bytes(u))} for u, v in top]}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(j, e, first):
                delta = {"content": e["text"]} if e["text"] else {}
                c = {"index": j.index, "delta": delta, "logprobs": None, "finish_reason": _finish(j)}
                if k is not None and e["token"] >= 0 and j.logprobs:
                    c["logprobs"] = {"content": [lp_entry(e["token"], j.logprobs[-1], j.tops[-1])]}
                return {"id": rid, "object": "chat.completion.chunk", "created": created,
                        "model": server.model_name, "choices": [c]}

            def role(j):
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_name,
                        "choices": [{"index": j.index, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]}
            return _stream(request, eng, jobs, server, chunk,
                           lambda usage: {"id": rid, "object": "chat.completion.chunk", "created": created,
                                          "model": server.model_name, "choices": [], "usage": usage},
                           include_usage, [ids], role_chunk=role)
        await _collect(request, eng, jobs)
        _mark_response(request, jobs)
        choices = []
        for j in jobs:
            c = {"index": j.index, "message": {"role": "assistant", "content": "".join(j.text)},
                 "logprobs": None, "finish_reason": _finish(j)}
            if k is not None:
                c["logprobs"] = {"content": [lp_entry(t, lp, top) for t, lp, top in zip(j.tokens, j.logprobs, j.tops)]}
            choices.append(c)
        return {"id": rid, "object": "chat.completion", "created": created, "model": server.model_name,
                "choices": choices, "usage": _usage(jobs, [ids])}

    return app


def _mark_response(request: Request, jobs: List[Job]):
    """The response about to be sent carries the request's last token (timed by the Guard)."""
    tm = _timing(request)
    if "recv" in tm:
        tm["emit"], tm["stage"] = max(j.final["t"] for j in jobs), "response"


async def _collect(request: Request, eng: AsyncEngine, jobs: List[Job]):
    """Waits for every job to finish; a client that leaves meanwhile cancels them."""
    watch = asyncio.create_task(_watch_disconnect(request, eng, jobs))
    try:
        async for _ in _events(jobs, None):
            pass
    except BaseException:
        _cancel(eng, jobs)
        raise
    finally:
        watch.cancel()


def _stream(request: Request, eng: AsyncEngine, jobs: List[Job], server: Server, chunk, usage_chunk,
            include_usage: bool, prompts, role_chunk) -> StreamingResponse:
    tm = _timing(request)
    timed = "recv" in tm

    async def gen():
        watch = asyncio.create_task(_watch_disconnect(request, eng, jobs))
        first_token = True
        try:
            if role_chunk is not None:
                for j in jobs:
                    yield _sse(role_chunk(j))
            started = set()
            async for j, e in _events(jobs, server.opt.keepalive_s):
                if j is None:
                    yield b": keep-alive\n\n"
                    continue
                if e["finish"] == "error":
                    yield _sse({"error": {"message": f"generation failed: {e.get('error') or 'unknown error'}",
                                          "type": "server_error", "param": None, "code": 500}})
                    _cancel(eng, jobs)
                    yield b"data: [DONE]\n\n"
                    return
                if e["finish"] == "cancelled":
                    continue
                first = j.index not in started
                started.add(j.index)
                if e["text"] or j.final is not None or first:
                    data = _sse(chunk(j, e, first))
                    if timed and e["token"] >= 0:  # the Guard times its handing to the transport
                        tm["emit"], tm["stage"] = e["t"], "first_token" if first_token else "token"
                        first_token = False
                    yield data
            if include_usage:
                u = _usage(jobs, prompts)
                yield _sse(usage_chunk(u))
            yield b"data: [DONE]\n\n"
        finally:
            watch.cancel()
            _cancel(eng, jobs)  # a client gone mid-stream (the generator is closed): free the sequences

    return StreamingResponse(gen(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _version() -> str:
    from .. import __version__
    return __version__
