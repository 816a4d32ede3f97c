"""llama.cpp side of bench_llama.py; runs with the llama-cpp-python venv's Python, not ours.

Speaks JSON lines: one request object per line on stdin, one reply per line on stdout
({"ok": true, ...} or {"ok": false, "error": "..."}). llama.cpp's own log is silenced.
Arrays (logits, dequantized weights) travel as .npy files whose paths are in the request.

Requests ("cmd"):
  convert    ckpt, tokenizer, out      HF OpenELM safetensors -> F32 GGUF (our converter)
  quantize   src, dst, ftype, threads  llama.cpp's own quantizer, default parameters
  tensors    path                      {name: [ggml type, bytes]} of a GGUF
  load       path, n_ctx, n_batch, exact, n_seq   model + context (replaces the previous one);
                                       llama.cpp's default context settings, or with exact: F32 KV
                                       cache and no flash attention (for comparing logits); n_seq
                                       sequences (default 1)
  pp         n, threads, seed          prefill n tokens from an empty cache -> tokens/s
  tg         n, threads, seed          n single-token decodes after a 1-token prompt -> tokens/s
  tgb        b, prompt, n, threads, seed   b sequences (prompt tokens each, prefilled first), then n
                                       steps of one batch with a token of each -> aggregate tokens/s
  logits     ids (list of lists), threads, out   all-position logits, float32 (S, T, V)
  dequant    path, names, out_dir      GGUF tensors dequantized to float32 .npy files
  tokenize   path, text                token ids of text with the GGUF's vocabulary (no BOS added)
  quit

It imports nothing from openelm_rt (different interpreter, different NumPy), so the
converter reads safetensors and config.json itself.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
import time
import traceback

import numpy as np

import gguf
import llama_cpp as L

# ----------------------------------------------------------------------------- conversion

_ST_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def _safetensors(ckpt_dir: str) -> dict:
    """{name: float32 array} of every tensor, memory-mapped where the file is F32."""
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for fname in files:
        path = os.path.join(ckpt_dir, fname)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            dt = _ST_NUMPY[info["dtype"]]
            count = (b - a) // np.dtype(dt).itemsize
            arr = np.memmap(path, dtype=dt, mode="r", offset=8 + n + a, shape=(count,))
            if info["dtype"] == "BF16":
                arr = (arr.astype(np.uint32) << 16).view(np.float32)
            elif info["dtype"] == "F16":
                arr = arr.astype(np.float32)
            out[name] = arr.reshape(info["shape"])
    return out


def _vocab(writer: gguf.GGUFWriter, tokenizer_path: str, vocab_size: int) -> None:
    """LLaMA SentencePiece vocabulary: pieces, scores and piece kinds from tokenizer.model."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    if sp.vocab_size() != vocab_size:
        raise ValueError(f"tokenizer has {sp.vocab_size()} pieces, config.json vocab_size {vocab_size}")
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        kind = (gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                else gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.BYTE if sp.is_byte(i)
                else gguf.TokenType.NORMAL)
        types.append(int(kind))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(sp.unk_id())
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def convert(ckpt: str, tokenizer: str, out: str) -> dict:
    """HF OpenELM checkpoint -> GGUF (arch "openelm", all tensors F32), as llama.cpp expects it.

    Metadata: per-layer arrays for FFN width and head counts; RMSNorm eps 1e-6 and full-width
    rotary (rope dimension = head_dim), which OpenELM hard-codes. Tensors keep the HF row
    order: llama.cpp splits the fused qkv rows as [all q heads | all k heads | all v heads]
    (as HF does) and applies NeoX (rotate-half) RoPE, so no permutation is needed; only the
    fused SwiGLU input proj_1 is split, rows [0, F) -> ffn_gate and [F, 2F) -> ffn_up. The
    LM head is tied: llama.cpp reuses token_embd when there is no `output` tensor.
    """
    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = json.load(f)
    if not cfg.get("share_input_output_layers", True):
        raise ValueError("untied OpenELM checkpoints are not handled by this converter")
    w = _safetensors(ckpt)
    n_layer = int(cfg["num_transformer_layers"])
    hd = int(cfg["head_dim"])
    ffn = [w[f"transformer.layers.{i}.ffn.proj_1.weight"].shape[0] // 2 for i in range(n_layer)]

    tmp = out + ".tmp"
    writer = gguf.GGUFWriter(tmp, "openelm")
    writer.add_name("OpenELM (random weights, openelm_rt benchmark)")
    writer.add_block_count(n_layer)
    writer.add_context_length(int(cfg["max_context_length"]))
    writer.add_embedding_length(int(cfg["model_dim"]))
    writer.add_feed_forward_length(ffn)
    writer.add_head_count([int(x) for x in cfg["num_query_heads"]])
    writer.add_head_count_kv([int(x) for x in cfg["num_kv_heads"]])
    writer.add_rope_freq_base(float(cfg["rope_freq_constant"]))
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(hd)
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    _vocab(writer, tokenizer, int(cfg["vocab_size"]))

    def f32(a):
        return np.ascontiguousarray(a, dtype=np.float32)

    writer.add_tensor("token_embd.weight", f32(w["transformer.token_embeddings.weight"]))
    for i in range(n_layer):
        p, b = f"transformer.layers.{i}.", f"blk.{i}."
        writer.add_tensor(b + "attn_norm.weight", f32(w[p + "attn_norm.weight"]))
        writer.add_tensor(b + "attn_qkv.weight", f32(w[p + "attn.qkv_proj.weight"]))
        writer.add_tensor(b + "attn_q_norm.weight", f32(w[p + "attn.q_norm.weight"]))
        writer.add_tensor(b + "attn_k_norm.weight", f32(w[p + "attn.k_norm.weight"]))
        writer.add_tensor(b + "attn_output.weight", f32(w[p + "attn.out_proj.weight"]))
        writer.add_tensor(b + "ffn_norm.weight", f32(w[p + "ffn_norm.weight"]))
        proj_1 = w[p + "ffn.proj_1.weight"]
        writer.add_tensor(b + "ffn_gate.weight", f32(proj_1[:ffn[i]]))
        writer.add_tensor(b + "ffn_up.weight", f32(proj_1[ffn[i]:]))
        writer.add_tensor(b + "ffn_down.weight", f32(w[p + "ffn.proj_2.weight"]))
    writer.add_tensor("output_norm.weight", f32(w["transformer.norm.weight"]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return {"tensors": 2 + 9 * n_layer}


_FTYPES = {"F32": L.LLAMA_FTYPE_ALL_F32, "F16": L.LLAMA_FTYPE_MOSTLY_F16,
           "BF16": L.LLAMA_FTYPE_MOSTLY_BF16, "Q8_0": L.LLAMA_FTYPE_MOSTLY_Q8_0,
           "Q4_0": L.LLAMA_FTYPE_MOSTLY_Q4_0, "Q6_K": L.LLAMA_FTYPE_MOSTLY_Q6_K,
           "Q5_K_M": L.LLAMA_FTYPE_MOSTLY_Q5_K_M, "Q4_K_M": L.LLAMA_FTYPE_MOSTLY_Q4_K_M}


def quantize(src: str, dst: str, ftype: str, threads: int) -> dict:
    params = L.llama_model_quantize_default_params()  # what llama-quantize uses
    params.ftype = _FTYPES[ftype]
    params.nthread = threads
    tmp = dst + ".tmp"
    rc = L.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype}) returned {rc}")
    os.replace(tmp, dst)
    return {}


def tensors(path: str) -> dict:
    r = gguf.GGUFReader(path)
    return {"tensors": {t.name: [t.tensor_type.name, int(t.n_bytes)] for t in r.tensors}}


_readers: dict = {}


def dequant(path: str, names: list, out_dir: str) -> dict:
    r = _readers.get(path)
    if r is None:
        _readers.clear()
        r = _readers[path] = gguf.GGUFReader(path)
    by_name = {t.name: t for t in r.tensors}
    files = {}
    for name in names:
        t = by_name[name]
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        shape = [int(x) for x in reversed(t.shape)]  # GGUF lists ne0 (the row length) first
        f = os.path.join(out_dir, name + ".npy")
        np.save(f, a.reshape(shape))
        files[name] = f
    return {"files": files}


def tokenize(path: str, text: str) -> dict:
    mp = L.llama_model_default_params()
    mp.vocab_only = True
    model = L.llama_model_load_from_file(path.encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp could not load the vocabulary of {path}")
    try:
        vocab = L.llama_model_get_vocab(model)
        raw = text.encode()
        buf = (L.llama_token * (len(raw) + 8))()
        n = L.llama_tokenize(vocab, raw, len(raw), buf, len(buf), False, False)
        if n < 0:
            raise RuntimeError(f"llama_tokenize returned {n}")
        return {"ids": list(buf[:n])}
    finally:
        L.llama_model_free(model)


# ----------------------------------------------------------------------------- running

_LOG_CB = L.llama_log_callback(lambda level, text, user: None)  # kept alive: llama.cpp holds it


class Runner:
    def __init__(self):
        L.llama_log_set(_LOG_CB, ctypes.c_void_p(0))
        L.llama_backend_init()
        self.model = self.ctx = None
        self.batch = None
        self.n_batch = 0

    def close(self):
        if self.batch is not None:
            L.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            L.llama_model_free(self.model)
            self.model = None

    def load(self, path: str, n_ctx: int, n_batch: int, exact: bool, n_seq: int = 1) -> dict:
        self.close()
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_threads = cp.n_threads_batch = os.cpu_count() or 1
        cp.n_seq_max = n_seq
        if exact:  # F16 KV cache and flash attention (on by default) round to F16: ~1e-3 in the logits
            cp.type_k = cp.type_v = int(gguf.GGMLQuantizationType.F32)
            cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_batch = n_batch
        self.batch = L.llama_batch_init(n_batch, 0, 1)
        return {"n_vocab": L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model)),
                "system_info": L.llama_print_system_info().decode(errors="replace")}

    def _decode(self, ids, pos0: int, all_logits: bool) -> None:
        b = self.batch
        n = len(ids)
        assert 0 < n <= self.n_batch
        for k, t in enumerate(ids):
            b.token[k] = t
            b.pos[k] = pos0 + k
            b.n_seq_id[k] = 1
            b.seq_id[k][0] = 0
            b.logits[k] = 1 if (all_logits or k == n - 1) else 0
        b.n_tokens = n
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _reset(self, threads: int) -> None:
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        L.llama_set_n_threads(self.ctx, threads, threads)

    def _random_ids(self, n: int, seed: int) -> list:
        n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        return np.random.default_rng(seed).integers(3, n_vocab, size=n).tolist()

    def pp(self, n: int, threads: int, seed: int) -> dict:
        ids = self._random_ids(n, seed)
        self._reset(threads)
        t0 = time.perf_counter()
        self._decode(ids, 0, False)
        L.llama_synchronize(self.ctx)
        return {"tok_s": n / (time.perf_counter() - t0)}

    def tg(self, n: int, threads: int, seed: int) -> dict:
        ids = self._random_ids(n + 1, seed)
        self._reset(threads)
        self._decode(ids[:1], 0, False)
        L.llama_synchronize(self.ctx)
        t0 = time.perf_counter()
        for k in range(1, n + 1):
            self._decode(ids[k:k + 1], k, False)
            L.llama_get_logits_ith(self.ctx, -1)  # synchronizes, like reading the logits
        return {"tok_s": n / (time.perf_counter() - t0)}

    def tgb(self, b: int, prompt: int, n: int, threads: int, seed: int) -> dict:
        """Batched decode as a server does it: b sequences, each prefilled with `prompt` tokens,
        then n llama_decode calls of b tokens (one per sequence, logits for each)."""
        rng = np.random.default_rng(seed)
        self._reset(threads)
        bt = self.batch
        for s in range(b):
            ids = rng.integers(3, 32000, size=prompt).tolist()
            for k0 in range(0, prompt, self.n_batch):
                chunk = ids[k0:k0 + self.n_batch]
                for k, t in enumerate(chunk):
                    bt.token[k], bt.pos[k], bt.n_seq_id[k] = t, k0 + k, 1
                    bt.seq_id[k][0] = s
                    bt.logits[k] = 0
                bt.n_tokens = len(chunk)
                if L.llama_decode(self.ctx, bt) != 0:
                    raise RuntimeError("llama_decode failed during the prompts")
        L.llama_synchronize(self.ctx)
        toks = rng.integers(3, 32000, size=(n, b))
        t0 = time.perf_counter()
        for i in range(n):
            for s in range(b):
                bt.token[s], bt.pos[s], bt.n_seq_id[s] = int(toks[i, s]), prompt + i, 1
                bt.seq_id[s][0] = s
                bt.logits[s] = 1
            bt.n_tokens = b
            rc = L.llama_decode(self.ctx, bt)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} at batch {b}")
            L.llama_get_logits_ith(self.ctx, b - 1)  # synchronizes, like reading the logits
        return {"tok_s": b * n / (time.perf_counter() - t0)}

    def logits(self, ids: list, threads: int, out: str) -> dict:
        n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        res = []
        for seq in ids:
            self._reset(threads)
            self._decode(seq, 0, True)
            rows = [np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, k), shape=(n_vocab,)).copy()
                    for k in range(len(seq))]
            res.append(np.stack(rows))
        np.save(out, np.stack(res).astype(np.float32))
        return {}


def main() -> int:
    runner = Runner()
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but replies may reach the protocol stream
    handlers = {
        "convert": lambda r: convert(r["ckpt"], r["tokenizer"], r["out"]),
        "quantize": lambda r: quantize(r["src"], r["dst"], r["ftype"], int(r.get("threads", 0))),
        "tensors": lambda r: tensors(r["path"]),
        "dequant": lambda r: dequant(r["path"], r["names"], r["out_dir"]),
        "tokenize": lambda r: tokenize(r["path"], r["text"]),
        "load": lambda r: runner.load(r["path"], int(r["n_ctx"]), int(r["n_batch"]),
                                     bool(r.get("exact", False)), int(r.get("n_seq", 1))),
        "pp": lambda r: runner.pp(int(r["n"]), int(r["threads"]), int(r.get("seed", 0))),
        "tg": lambda r: runner.tg(int(r["n"]), int(r["threads"]), int(r.get("seed", 0))),
        "tgb": lambda r: runner.tgb(int(r["b"]), int(r["prompt"]), int(r["n"]), int(r["threads"]),
                                    int(r.get("seed", 0))),
        "logits": lambda r: runner.logits(r["ids"], int(r["threads"]), r["out"]),
        "version": lambda r: {"llama_cpp_python": L.__version__,
                              "system_info": L.llama_print_system_info().decode(errors="replace")},
    }
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        if req.get("cmd") == "quit":
            break
        try:
            reply = {"ok": True, **handlers[req["cmd"]](req)}
        except Exception as e:  # reported to the caller, who raises it
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    runner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
