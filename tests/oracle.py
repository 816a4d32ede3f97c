"""Independent float64 NumPy oracle for OpenELM (forward, greedy, HF-style sampling), written
from shared/OPENELM.md section 3, not from the C++ core; slow and plain on purpose (full
recompute). Also small I/O helpers (safetensors read/patch, bf16/f16 rounding) for the tests.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

NORM_EPS = 1e-6  # every RMSNorm in modeling_openelm.py (OPENELM.md 3.4)


def norm_eps(cfg: dict) -> float:
    """OpenELM's 1e-6, unless config.json carries rms_norm_eps (not an OpenELM field; the
    exporter's override for converted models such as the SmolLM2 stand-in)."""
    return float(cfg.get("rms_norm_eps", NORM_EPS))


# ----------------------------------------------------------------------------- primitives

def rms_norm(x: np.ndarray, w: np.ndarray, eps: float = NORM_EPS) -> np.ndarray:
    """y = x / sqrt(mean(x^2) + eps) * w over the last axis (w applied after, not 1 + w)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(w, np.float64)


def rope(x: np.ndarray, positions, theta: float) -> np.ndarray:
    """NeoX / rotate-half RoPE on the full head. x: (..., T, hd); positions: (T,).

    Dims j and j + hd/2 share the angle p / theta^(2j/hd).
    """
    x = np.asarray(x, dtype=np.float64)
    hd = x.shape[-1]
    half = hd // 2
    inv_freq = 1.0 / theta ** (np.arange(half, dtype=np.float64) * 2.0 / hd)    # (hd/2,)
    ang = np.asarray(positions, np.float64)[:, None] * inv_freq[None, :]         # (T, hd/2)
    cos = np.concatenate([np.cos(ang), np.cos(ang)], axis=-1)                   # (T, hd)
    sin = np.concatenate([np.sin(ang), np.sin(ang)], axis=-1)
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)          # rotate_half
    return x * cos + rotated * sin


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def attention_core(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal GQA attention. q: (nq, T, hd); k, v: (nkv, T, hd) -> (nq, T, hd).

    Query head j reads kv head j // (nq / nkv) (repeat_interleave on the head axis).
    """
    nq, T, hd = q.shape
    nkv = k.shape[0]
    assert nq % nkv == 0, (nq, nkv)
    group = nq // nkv
    out = np.empty_like(q, dtype=np.float64)
    mask = np.tril(np.ones((T, T), dtype=bool))                    # key s <= query t
    for j in range(nq):
        kv = j // group
        scores = q[j] @ k[kv].T / np.sqrt(hd)                       # (T, T)
        scores = np.where(mask, scores, -np.inf)
        out[j] = softmax(scores, axis=-1) @ v[kv]
    return out


# ----------------------------------------------------------------------------- forward

# A test-only config key: "bf16" rounds the input of every matrix product to bfloat16 (through
# float32), what the runtime computes for bf16 weights with Backend(exact=False), the opt-in.
ROUND_MATMUL_INPUTS = "_oracle_round_matmul_inputs"


def _acts(x: np.ndarray, cfg: dict) -> np.ndarray:
    if cfg.get(ROUND_MATMUL_INPUTS) == "bf16":
        return round_to_bf16(np.asarray(x, np.float32)).astype(np.float64)
    return x

def _layer_dims(cfg: dict, weights: dict, i: int):
    nq = int(cfg["num_query_heads"][i])
    nkv = int(cfg["num_kv_heads"][i])
    F = weights[f"transformer.layers.{i}.ffn.proj_1.weight"].shape[0] // 2
    return nq, nkv, F


def attention(h: np.ndarray, weights: dict, cfg: dict, i: int) -> np.ndarray:
    """Attention block of layer i on normalised input h: (T, D) -> (T, D)."""
    p = f"transformer.layers.{i}.attn."
    hd = int(cfg["head_dim"])
    nq, nkv, _ = _layer_dims(cfg, weights, i)
    T = h.shape[0]
    qkv = _acts(h, cfg) @ np.asarray(weights[p + "qkv_proj.weight"], np.float64).T  # (T, (nq+2nkv)*hd)
    qkv = qkv.reshape(T, nq + 2 * nkv, hd).transpose(1, 0, 2)                # (heads, T, hd)
    q, k, v = qkv[:nq], qkv[nq:nq + nkv], qkv[nq + nkv:]
    if cfg.get("normalize_qk_projections", True):
        q = rms_norm(q, weights[p + "q_norm.weight"], norm_eps(cfg))
        k = rms_norm(k, weights[p + "k_norm.weight"], norm_eps(cfg))
    pos = np.arange(T)
    theta = float(cfg["rope_freq_constant"])
    q, k = rope(q, pos, theta), rope(k, pos, theta)
    o = attention_core(q, k, v)                                              # (nq, T, hd)
    o = o.transpose(1, 0, 2).reshape(T, nq * hd)
    return _acts(o, cfg) @ np.asarray(weights[p + "out_proj.weight"], np.float64).T


def ffn(h: np.ndarray, weights: dict, cfg: dict, i: int) -> np.ndarray:
    """SwiGLU of layer i: proj_1 rows [0,F) gate, [F,2F) up."""
    p = f"transformer.layers.{i}.ffn."
    _, _, F = _layer_dims(cfg, weights, i)
    y = _acts(h, cfg) @ np.asarray(weights[p + "proj_1.weight"], np.float64).T  # (T, 2F)
    gate, up = y[:, :F], y[:, F:]
    return _acts(silu(gate) * up, cfg) @ np.asarray(weights[p + "proj_2.weight"], np.float64).T


def hidden_states(weights: dict, cfg: dict, ids) -> np.ndarray:
    """Final normalised hidden states (T, D)."""
    E = np.asarray(weights["transformer.token_embeddings.weight"], np.float64)
    x = E[np.asarray(ids, dtype=np.int64)]                                   # (T, D)
    eps = norm_eps(cfg)
    for i in range(int(cfg["num_transformer_layers"])):
        p = f"transformer.layers.{i}."
        x = x + attention(rms_norm(x, weights[p + "attn_norm.weight"], eps), weights, cfg, i)
        x = x + ffn(rms_norm(x, weights[p + "ffn_norm.weight"], eps), weights, cfg, i)
    return rms_norm(x, weights["transformer.norm.weight"], eps)


def head_matrix(weights: dict, cfg: dict) -> np.ndarray:
    if cfg.get("share_input_output_layers", True):
        return np.asarray(weights["transformer.token_embeddings.weight"], np.float64)
    return np.asarray(weights["lm_head.weight"], np.float64)


def forward(weights: dict, cfg: dict, ids) -> np.ndarray:
    """Logits (T, V) in float64 for token ids `ids` (no BOS added)."""
    ids = list(ids)
    assert len(ids) > 0
    return _acts(hidden_states(weights, cfg, ids), cfg) @ head_matrix(weights, cfg).T


# ----------------------------------------------------------------------------- sampling

def apply_repetition_penalty(logits, prev_ids, p: float) -> np.ndarray:
    """HF RepetitionPenaltyLogitsProcessor: each distinct id in prev_ids: s<0 -> s*p, else s/p."""
    out = np.array(logits, dtype=np.float64, copy=True)
    if p == 1.0 or len(prev_ids) == 0:
        return out
    ids = np.unique(np.asarray(list(prev_ids), dtype=np.int64))
    s = out[ids]
    out[ids] = np.where(s < 0, s * p, s / p)
    return out


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """HF TopKLogitsWarper: keep scores >= the k-th largest (ties at the boundary kept)."""
    k = min(max(k, 1), scores.shape[-1])
    kth = np.sort(scores)[::-1][k - 1]
    return np.where(scores < kth, -np.inf, scores)


def _top_p(scores: np.ndarray, top_p: float) -> np.ndarray:
    """HF TopPLogitsWarper: ascending sort, drop cumulative prob <= 1 - top_p, keep >= 1."""
    order = np.argsort(scores, kind="stable")                   # ascending
    cum = np.cumsum(softmax(scores[order]))
    remove_sorted = cum <= (1.0 - top_p)
    remove_sorted[-1] = False                                    # min_tokens_to_keep = 1
    remove = np.zeros_like(remove_sorted)
    remove[order] = remove_sorted
    return np.where(remove, -np.inf, scores)


def _min_p(scores: np.ndarray, min_p: float) -> np.ndarray:
    """HF MinPLogitsWarper: drop tokens with prob < min_p * max prob; keep the argmax."""
    probs = softmax(scores)
    remove = probs < min_p * probs.max()
    remove[int(np.argmax(scores))] = False
    return np.where(remove, -np.inf, scores)


def sampling_probs(logits, prev_ids, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, min_p: float = 0.0,
                   repetition_penalty: float = 1.0) -> np.ndarray:
    """The distribution HF's generate(do_sample=True) draws from, in HF's processor order:
    repetition penalty -> temperature -> top-k -> top-p -> min-p -> softmax.
    temperature == 0 means greedy: one-hot at argmax of the penalized logits.
    """
    scores = apply_repetition_penalty(np.asarray(logits, np.float64).reshape(-1), prev_ids,
                                      repetition_penalty)
    if temperature == 0:
        probs = np.zeros_like(scores)
        probs[int(np.argmax(scores))] = 1.0
        return probs
    scores = scores / temperature
    if top_k > 0:
        scores = _top_k(scores, top_k)
    if top_p < 1.0:
        scores = _top_p(scores, top_p)
    if min_p > 0.0:
        scores = _min_p(scores, min_p)
    return softmax(scores)


# ----------------------------------------------------------------------------- generation

def greedy(weights: dict, cfg: dict, prompt_ids, max_new_tokens: int, eos_id: int = 2,
           repetition_penalty: float = 1.0, return_margins: bool = False):
    """Greedy decoding with full recompute each step; stops after emitting eos_id (included).

    With return_margins=True also returns, per step, the gap between the best and the
    second best penalized logit (so a caller can tell a real mismatch from a near tie).
    """
    seq = list(prompt_ids)
    out, margins = [], []
    for _ in range(max_new_tokens):
        last = forward(weights, cfg, seq)[-1]
        scores = apply_repetition_penalty(last, seq, repetition_penalty)
        top2 = np.sort(scores)[-2:]
        margins.append(float(top2[1] - top2[0]))
        tok = int(np.argmax(scores))
        out.append(tok)
        seq.append(tok)
        if tok == eos_id:
            break
    return (out, margins) if return_margins else out


# ----------------------------------------------------------------------------- rounding

def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), returned as float32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32).reshape(np.shape(x))


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_to_f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


# Which HF tensors are "weights" (stored in weights_dtype); norms always stay f32.
def is_matrix(name: str) -> bool:
    return not name.endswith("norm.weight")


def round_weights(weights: dict, dtype: str) -> dict:
    """What an export to `dtype` ('f32' | 'f16' | 'bf16') stores, read back as float32."""
    fn = {"f32": lambda a: np.asarray(a, np.float32), "f16": round_to_f16,
          "bf16": round_to_bf16}[dtype]
    return {k: (fn(v) if is_matrix(k) else np.asarray(v, np.float32)) for k, v in weights.items()}


# ----------------------------------------------------------------------------- safetensors I/O
# A deliberately separate reader, so the oracle does not share a bug with the package loader.

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def _st_header(path: Path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


def read_safetensors(path) -> dict:
    path = Path(path)
    header, base = _st_header(path)
    raw = path.read_bytes()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        arr = np.frombuffer(raw[base + a: base + b], dtype=_ST_DTYPES[info["dtype"]])
        if info["dtype"] == "BF16":
            arr = bf16_bits_to_f32(arr)
        out[name] = arr.astype(np.float32).reshape(info["shape"])
    return out


def safetensors_files(ckpt_dir) -> list[Path]:
    d = Path(ckpt_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [d / f for f in files]
    return [d / "model.safetensors"]


def read_checkpoint(ckpt_dir) -> tuple[dict, dict]:
    """(config.json dict, {hf_name: float32 array}) of an HF OpenELM checkpoint dir."""
    d = Path(ckpt_dir)
    cfg = json.loads((d / "config.json").read_text())
    weights = {}
    for f in safetensors_files(d):
        weights.update(read_safetensors(f))
    return cfg, weights


def patch_safetensors_tensor(ckpt_dir, name: str, fn) -> None:
    """Rewrite tensor `name` in place: new = fn(old float32 array), stored in the same dtype."""
    for path in safetensors_files(ckpt_dir):
        header, base = _st_header(path)
        if name not in header:
            continue
        info = header[name]
        a, b = info["data_offsets"]
        raw = bytearray(path.read_bytes())
        dt = _ST_DTYPES[info["dtype"]]
        old = np.frombuffer(bytes(raw[base + a: base + b]), dtype=dt)
        old = bf16_bits_to_f32(old) if info["dtype"] == "BF16" else old.astype(np.float32)
        new = np.asarray(fn(old.reshape(info["shape"]).copy()), np.float32).reshape(-1)
        if info["dtype"] == "BF16":
            enc = (round_to_bf16(new).view(np.uint32) >> 16).astype(np.uint16)
        else:
            enc = new.astype(dt)
        assert enc.nbytes == b - a
        raw[base + a: base + b] = enc.tobytes()
        path.write_bytes(bytes(raw))
        return
    raise KeyError(name)
