"""Scale-out on Ray: the same OpenAI-compatible app as Ray Serve replicas, and Ray Data batch jobs.

Serving (one engine per replica; Ray Serve's proxy spreads requests over the replicas and adds
replicas as ongoing requests grow):

    from ray import serve
    from openelm_rt.serve.ray import deployment
    serve.run(deployment("model.oelm", threads=2, min_replicas=1, max_replicas=4), route_prefix="/")
    # or from a shell:  serve run openelm_rt.serve.ray:app model=model.oelm threads=2

Offline generation and scoring (one Session per actor, `map_batches`):

    import ray
    from openelm_rt.serve.ray import generate_dataset, score_dataset
    ds = ray.data.from_items([{"prompt": p} for p in prompts])
    out = generate_dataset(ds, "model.oelm", concurrency=4, threads=2, max_new_tokens=64, temperature=0)
    out.take_all()  # each row gains "generated_text", "finish_reason", "generated_tokens"

Needs the optional extra `pip install "openelm_rt[ray]"`. Commands for one machine and a
cluster: docs/SERVING.md.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
from ray import serve

from ..session import Session
from .app import ServeOptions, create_app


class _Replica:
    """One Ray Serve replica: a Session (loaded before the replica reports ready) and the app."""

    def __init__(self, options: ServeOptions):
        self._options = options
        o = options
        self._session = Session(o.model, threads=o.threads, max_context=o.max_context, kv_budget=o.kv_budget,
                                kv_dtype=o.kv_dtype, max_batch=o.max_batch, prefix_cache=o.prefix_cache,
                                prefill_chunk=o.prefill_chunk, **o.session_kwargs)

    def __serve_build_asgi_app__(self):
        return create_app(self._options, session=self._session)


OpenELMServer = serve.ingress()(_Replica)


def deployment(model: str, *, threads: int = 2, num_replicas: Optional[int] = None, min_replicas: int = 1,
               max_replicas: int = 1, target_ongoing_requests: Optional[float] = None, name: str = "openelm",
               **options: Any):
    """A bound Ray Serve application serving `model` (an .oelm path readable on every node).

    Each replica reserves `threads` CPUs (its engine's worker threads). With num_replicas set,
    that many replicas; otherwise Ray Serve autoscales between min_replicas and max_replicas on
    ongoing requests per replica (target: the replica's batch size, by default). Other keywords
    are ServeOptions fields (max_batch, max_queue, api_key, kv_budget, model_name, ...)."""
    opts = ServeOptions(model=model, threads=threads, **options)
    max_ongoing = opts.max_batch + opts.max_queue
    cfg: Dict[str, Any] = dict(name=name, ray_actor_options={"num_cpus": threads},
                               max_ongoing_requests=max_ongoing)
    if num_replicas is not None:
        cfg["num_replicas"] = num_replicas
    else:
        cfg["autoscaling_config"] = {"min_replicas": min_replicas, "max_replicas": max_replicas,
                                     "target_ongoing_requests": target_ongoing_requests or opts.max_batch}
    return serve.deployment(OpenELMServer, **cfg).bind(opts)


def app(args: Dict[str, str]):
    """Builder for `serve run openelm_rt.serve.ray:app model=M.oelm [threads=2] [num_replicas=2]
    [max_replicas=4] [max_batch=16] [api_key=...]`."""
    if "model" not in args:
        raise ValueError("pass the model: serve run openelm_rt.serve.ray:app model=/path/model.oelm")
    kw: Dict[str, Any] = {}
    for k, v in args.items():
        if k in ("threads", "num_replicas", "min_replicas", "max_replicas", "max_batch", "max_queue",
                 "prefix_cache", "max_context", "prefill_chunk"):
            kw[k] = int(v)
        elif k == "target_ongoing_requests":
            kw[k] = float(v)
        elif k != "model":
            kw[k] = v
    return deployment(args["model"], **kw)


# ---------------------------------------------------------------------------------------------- Ray Data
class Generator:
    """A `map_batches` callable: one Session per actor; a batch's "prompt" column (text, or token
    id lists) goes through `Session.generate_batch` (batched on the engine)."""

    def __init__(self, model: str, threads: int = 1, max_batch: int = 16, **generate_kwargs):
        self.session = Session(model, threads=threads, max_batch=max_batch)
        self.kwargs = generate_kwargs

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        prompts = [p if isinstance(p, str) else [int(t) for t in p] for p in batch["prompt"]]
        res = self.session.generate_batch(prompts, **self.kwargs)
        out = dict(batch)
        out["generated_text"] = np.array([r.text for r in res], dtype=object)
        out["finish_reason"] = np.array([r.finish_reason for r in res], dtype=object)
        out["generated_tokens"] = np.array([len(r.token_ids) for r in res], dtype=np.int64)
        return out


class Scorer:
    """A `map_batches` callable: log p(continuation | context) for "context" / "continuation"
    columns (text, tokenized with BOS for the context; or token id lists), via Session.score_batch."""

    def __init__(self, model: str, threads: int = 1):
        self.session = Session(model, threads=threads)

    def _ids(self, x, bos):
        return self.session.tokenize(x, add_bos=bos) if isinstance(x, str) else [int(t) for t in x]

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        pairs = [(self._ids(c, True), self._ids(k, False)) for c, k in zip(batch["context"], batch["continuation"])]
        res = self.session.score_batch(pairs)
        out = dict(batch)
        out["logprob"] = np.array([r.total for r in res], dtype=np.float64)
        out["is_greedy"] = np.array([r.is_greedy for r in res], dtype=bool)
        return out


def generate_dataset(ds, model: str, *, concurrency: int = 1, threads: int = 1, batch_size: int = 16,
                     **generate_kwargs):
    """`ds` (a ray.data.Dataset with a "prompt" column) with the generations added; `concurrency`
    actors, each with a Session of `threads` threads, reserving that many CPUs."""
    return ds.map_batches(Generator, fn_constructor_kwargs=dict(model=model, threads=threads, max_batch=batch_size,
                                                                **generate_kwargs),
                          batch_size=batch_size, concurrency=concurrency, num_cpus=threads, batch_format="numpy")


def score_dataset(ds, model: str, *, concurrency: int = 1, threads: int = 1, batch_size: int = 64):
    """`ds` with "context" and "continuation" columns, plus "logprob" and "is_greedy"."""
    return ds.map_batches(Scorer, fn_constructor_kwargs=dict(model=model, threads=threads), batch_size=batch_size,
                          concurrency=concurrency, num_cpus=threads, batch_format="numpy")
