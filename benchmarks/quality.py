"""Quality of reduced-precision weights against f32 on the same weights (used by bench_llama.py).

Two kinds of numbers:
* next-token distributions from the real runtimes (ours and llama.cpp): KL(f32 || type), mean
  and max over positions, and top-1 agreement, each runtime against its own f32 run;
* relative error of each layer's output (the residual stream after layer i, all positions),
  ||x_type - x_f32|| / ||x_f32||, from a NumPy forward pass (tests/oracle.py's primitives,
  matrix products in float32) run once with the f32 weights and once with each side's
  dequantized weights. That row measures weight quantization only: no runtime is involved,
  so llama.cpp's F16 activations / KV cache and our kernels' arithmetic do not enter it.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import oracle  # noqa: E402  (tests/oracle.py: the independent NumPy OpenELM)

from openelm_rt.tokenizer_train import CORPUS_PATH  # noqa: E402


def quality_ids(sp, n_seq: int, n_tok: int) -> list[list[int]]:
    """n_seq sequences of BOS + (n_tok - 1) token ids of real text (the shipped corpus),
    taken from evenly spaced places in it."""
    ids = sp.encode(CORPUS_PATH.read_text(encoding="utf-8"))
    span = n_tok - 1
    if len(ids) < n_seq * span:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than {n_seq} x {span}")
    step = (len(ids) - span) // max(1, n_seq - 1) if n_seq > 1 else 0
    return [[sp.bos_id()] + ids[k * step:k * step + span] for k in range(n_seq)]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def spread(logits: np.ndarray) -> dict:
    """How peaked the reference distributions are: mean entropy (nats), mean top-1 probability,
    logit standard deviation over the vocabulary."""
    lp = _log_softmax(logits.reshape(-1, logits.shape[-1]))
    p = np.exp(lp)
    return {"entropy": float(-(p * lp).sum(-1).mean()), "top1_prob": float(p.max(-1).mean()),
            "logit_std": float(logits.reshape(-1, logits.shape[-1]).std(-1).mean())}


def next_token_stats(ref: np.ndarray, got: np.ndarray) -> dict:
    """KL(ref || got) per position (mean, max) and top-1 agreement of two (…, V) logit arrays."""
    V = ref.shape[-1]
    lp, lq = _log_softmax(ref.reshape(-1, V)), _log_softmax(got.reshape(-1, V))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    top1 = (lp.argmax(-1) == lq.argmax(-1)).mean()
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1": float(top1)}


def _mm(h: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.asarray(h, np.float32) @ np.asarray(w, np.float32).T


def layer_states(cfg: dict, get, ids: list[list[int]]):
    """Yields the residual stream (S, T, D) after each layer; get(hf_name) -> float32 array.

    Same math as oracle.hidden_states, but all sequences at once and with float32 matrix
    products (a 1.1B model in float64 would take minutes per weight type)."""
    hd = int(cfg["head_dim"])
    theta = float(cfg["rope_freq_constant"])
    eps = oracle.norm_eps(cfg)
    x = get("transformer.token_embeddings.weight")[np.asarray(ids)].astype(np.float64)  # (S, T, D)
    S, T, D = x.shape
    pos = np.arange(T)
    for i in range(int(cfg["num_transformer_layers"])):
        p = f"transformer.layers.{i}."
        nq, nkv = int(cfg["num_query_heads"][i]), int(cfg["num_kv_heads"][i])
        h = oracle.rms_norm(x, get(p + "attn_norm.weight"), eps)
        qkv = _mm(h.reshape(S * T, D), get(p + "attn.qkv_proj.weight")).reshape(S, T, nq + 2 * nkv, hd)
        qk = cfg.get("normalize_qk_projections", True)
        qn = get(p + "attn.q_norm.weight") if qk else None
        kn = get(p + "attn.k_norm.weight") if qk else None
        o = np.empty((S, T, nq * hd))
        for s in range(S):
            heads = qkv[s].transpose(1, 0, 2)  # (heads, T, hd)
            q, k = heads[:nq], heads[nq:nq + nkv]
            if qk:
                q, k = oracle.rms_norm(q, qn, eps), oracle.rms_norm(k, kn, eps)
            q, k = oracle.rope(q, pos, theta), oracle.rope(k, pos, theta)
            o[s] = oracle.attention_core(q, k, heads[nq + nkv:]).transpose(1, 0, 2).reshape(T, nq * hd)
        x = x + _mm(o.reshape(S * T, -1), get(p + "attn.out_proj.weight")).reshape(S, T, D)
        h = oracle.rms_norm(x, get(p + "ffn_norm.weight"), eps)
        y = _mm(h.reshape(S * T, D), get(p + "ffn.proj_1.weight"))
        F = y.shape[1] // 2
        x = x + _mm(oracle.silu(y[:, :F].astype(np.float64)) * y[:, F:], get(p + "ffn.proj_2.weight")
                    ).reshape(S, T, D)
        yield x


def layer_errors(cfg: dict, ref_states: list, get, ids) -> list[float]:
    """Relative Frobenius error of each layer's output against the f32 states."""
    out = []
    for ref, x in zip(ref_states, layer_states(cfg, get, ids)):
        out.append(float(np.linalg.norm(x - ref) / np.linalg.norm(ref)))
    return out
