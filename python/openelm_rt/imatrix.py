"""Activation statistics for importance-weighted quantization (llama.cpp's "imatrix").

`compute_imatrix(checkpoint_dir, ids)` runs the checkpoint forward in float32 NumPy on calibration
token ids (windows of `ctx` tokens, each from an empty cache, as `openelm-rt perplexity` cuts
them) and returns, for every weight matrix of the .oelm file, the mean over all tokens of the
square of each of its input features: imp[k] = E[x_k^2], where x is the vector the matrix
multiplies (y = x · Wᵀ). For the tied embedding that is the LM head's input (the final
normalised hidden state). The quantizer (quant.py) then chooses each block's scale to minimise
sum_k imp[k] (w_k - d q_k)^2 (times llama.cpp's per-weight factor, quant.py), which is the
expected squared error of the product y = x · w for activations with those second moments,
instead of the error of the weights alone.

Why a NumPy forward and not the runtime's: the runtime has no hook for the inputs of its
matrices, the pass runs once per export on a few thousand tokens, and it reads the checkpoint's
own (unquantized) weights; tests/test_imatrix.py holds its logits against the runtime's.

Saved as .npz (one float64 array per tensor name, plus `_tokens`, the count of calibration
tokens) by `openelm-rt-export --imatrix-out`, read back by `--imatrix`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .checkpoint import HFCheckpoint
from .hf_config import ExportError, parse_config
from .perplexity import windows
from .safetensors_io import bf16_to_f32

TOKENS_KEY = "_tokens"


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope_tables(T: int, hd: int, theta: float):
    inv = 1.0 / theta ** (np.arange(hd // 2, dtype=np.float64) * 2.0 / hd)
    ang = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE on (..., T, hd)."""
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


class _Stats:
    def __init__(self):
        self.sum: dict[str, np.ndarray] = {}

    def add(self, name: str, x: np.ndarray) -> None:
        """x (..., K): accumulates the sum over tokens of x_k^2 in float64."""
        x = x.reshape(-1, x.shape[-1]).astype(np.float64)
        self.sum[name] = self.sum.get(name, 0.0) + np.einsum("nk,nk->k", x, x)


def compute_imatrix(src_dir, ids: Sequence[int], ctx: int = 512, add_bos: bool = False,
                    batch: int = 4, progress: Optional[Callable[[str], None]] = None,
                    return_logits: bool = False):
    """{.oelm matrix name: float64 [K] = mean over calibration tokens of x_k^2}, plus
    TOKENS_KEY: the token count (module docstring). ids: calibration token ids, cut into windows
    of ctx (with add_bos, BOS first in each). batch: windows computed together. With
    return_logits, also the float32 logits of every window (a list; for the tests)."""
    src = Path(src_dir)
    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    spec = parse_config(cfg)
    ids = [int(t) for t in ids]
    if any(t < 0 or t >= spec.vocab_size for t in ids):
        bad = next(t for t in ids if t < 0 or t >= spec.vocab_size)
        raise ExportError(f"calibration token id {bad} is outside the vocabulary [0, {spec.vocab_size})")
    wins = windows(ids, ctx, spec.bos_token_id if add_bos else None)
    if not wins:
        raise ExportError(f"calibration needs at least 2 tokens, got {len(ids)}")
    stats = _Stats()
    all_logits = []
    n_tok = 0
    hd, D, eps = spec.head_dim, spec.d_model, spec.norm_eps
    with HFCheckpoint(src) as ckpt:
        def get(name: str) -> np.ndarray:
            st = ckpt.where[name]
            a = st.get(name)
            a = bf16_to_f32(a) if st.dtype(name) == "BF16" else a
            return np.asarray(a, np.float32)

        emb = get("transformer.token_embeddings.weight")
        head = emb if spec.tied_embeddings else get("lm_head.weight")
        # windows of equal length go together (all but possibly the last)
        groups: list[list] = []
        for w in wins:
            if groups and len(groups[-1]) < batch and len(groups[-1][0]) == len(w):
                groups[-1].append(w)
            else:
                groups.append([w])
        for gi, group in enumerate(groups):
            tok = np.asarray(group, np.int64)              # (B, T)
            B, T = tok.shape
            n_tok += B * T
            cos, sin = _rope_tables(T, hd, spec.rope_theta)
            mask = np.triu(np.full((T, T), -np.inf, np.float32), 1)
            x = emb[tok]                                    # (B, T, D)
            for i in range(spec.n_layer):
                hf, ob = f"transformer.layers.{i}.", f"blk.{i}."
                nq, nkv, F = spec.n_head_q[i], spec.n_head_kv[i], spec.ffn_dim[i]
                h = _rms_norm(x, get(hf + "attn_norm.weight"), eps)
                stats.add(ob + "attn_qkv", h)
                qkv = (h @ get(hf + "attn.qkv_proj.weight").T).reshape(B, T, nq + 2 * nkv, hd)
                qkv = qkv.transpose(0, 2, 1, 3)             # (B, heads, T, hd)
                q, k, v = qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:]
                if spec.qk_norm:
                    q = _rms_norm(q, get(hf + "attn.q_norm.weight"), eps)
                    k = _rms_norm(k, get(hf + "attn.k_norm.weight"), eps)
                q, k = _rope(q, cos, sin), _rope(k, cos, sin)
                g = nq // nkv                               # query head j reads kv head j // g
                q = q.reshape(B, nkv, g, T, hd)
                s = q @ k[:, :, None].swapaxes(-1, -2) * np.float32(1.0 / np.sqrt(hd)) + mask  # (B, nkv, g, T, T)
                s = np.exp(s - s.max(axis=-1, keepdims=True))
                s /= s.sum(axis=-1, keepdims=True)
                o = (s @ v[:, :, None]).reshape(B, nq, T, hd)
                o = o.transpose(0, 2, 1, 3).reshape(B, T, nq * hd)
                stats.add(ob + "attn_output", o)
                x = x + o @ get(hf + "attn.out_proj.weight").T
                h = _rms_norm(x, get(hf + "ffn_norm.weight"), eps)
                stats.add(ob + "ffn_gate_up", h)
                gu = h @ get(hf + "ffn.proj_1.weight").T
                a = gu[..., :F] / (1.0 + np.exp(-gu[..., :F])) * gu[..., F:]
                stats.add(ob + "ffn_down", a)
                x = x + a @ get(hf + "ffn.proj_2.weight").T
            h = _rms_norm(x, get("transformer.norm.weight"), eps)
            stats.add("token_embd" if spec.tied_embeddings else "output", h)
            if return_logits:
                all_logits += list(h @ head.T)
            if progress is not None:
                progress(f"calibration: {gi + 1}/{len(groups)} batches, {n_tok} tokens")
    out = {name: s / n_tok for name, s in stats.sum.items()}
    out[TOKENS_KEY] = np.array(n_tok)
    return (out, all_logits) if return_logits else out


def save_imatrix(path, imatrix: dict) -> None:
    np.savez(path, **imatrix)


def load_imatrix(path) -> dict:
    """An .npz written by save_imatrix; checks that every array is finite and non-negative."""
    try:
        with np.load(path) as z:
            out = {k: np.asarray(z[k], np.float64) for k in z.files}
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read the importance file {path}: {e}; write one with "
                          f"openelm-rt-export --calibration-ids ... --imatrix-out FILE.npz") from None
    for k, v in out.items():
        if k != TOKENS_KEY and (v.ndim != 1 or not np.isfinite(v).all() or (v < 0).any()):
            raise ExportError(f"importance file {path}: {k!r} is not a 1-D array of finite, "
                              f"non-negative numbers")
    return out
