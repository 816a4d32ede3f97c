"""GPU speed of openelm_rt's CUDA backend on random-weight OpenELM models in the real shapes.

Prints, per model and weight dtype: prefill (ppN) and batch-1 decode (tgN) tokens/s, aggregate
decode at batch 8 and 32, the decode bound that memory bandwidth allows (weight bytes read per
token / device copy bandwidth, measured in the same run with PyTorch), and a PyTorch eager
implementation of OpenELM on the same weights (f16/bf16 files) for comparison.

    python benchmarks/bench_cuda.py --models-dir /tmp/oelm_models --presets 270M 1_1B --dtypes bf16 q8

Models are written (random bf16 checkpoint, then exported to each dtype, token ids only) into
--models-dir when missing; `--make-tiny DIR` writes only the tiny test models cuda_check reads.
Needs the package importable (PYTHONPATH=python after a CUDA development build) and, for the
bandwidth and the baseline, PyTorch with CUDA.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def make_models(out_dir: Path, preset: str, dtypes, log=print) -> dict:
    from openelm_rt import checkpoint, export, hf_config

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {dt: out_dir / f"random-{preset}-{dt}.oelm" for dt in dtypes}
    missing = [dt for dt, p in paths.items() if not p.exists()]
    if missing:
        ckpt = out_dir / f"ckpt-{preset}"
        if not (ckpt / "config.json").exists():
            log(f"writing a random {preset} checkpoint ...")
            checkpoint.write_random_checkpoint(ckpt, hf_config.make_config(preset), dtype="bf16", seed=0)
        for dt in missing:
            log(f"exporting {preset} as {dt} ...")
            export.export_checkpoint(ckpt, paths[dt], dtype=dt, tokenizer=None, with_tokenizer=False,
                                     progress=False)
    return paths


def copy_bandwidth(torch) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written), best of 10."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    best = 0.0
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        best = max(best, 2 * n / (s.elapsed_time(e) / 1e3))
    del a, b
    torch.cuda.empty_cache()
    return best


def weight_bytes_per_token(model) -> int:
    return sum(model.tensor(n).nbytes for n in model.tensor_names() if n != "tokenizer.model")


def time_openelm(core, model, vocab, pp, tg, batches, rng) -> dict:
    be = core.Backend("cuda", 1)
    res = {}
    ids = rng.integers(3, vocab, size=max(pp, tg + 1)).tolist()
    ctx = core.Context(model, pp, be)
    ctx.eval(ids[:16], False)  # warm-up
    ctx.reset()
    t0 = time.perf_counter()
    ctx.eval(ids[:pp], False)
    res[f"pp{pp}"] = pp / (time.perf_counter() - t0)
    del ctx
    ctx = core.Context(model, tg + 1, be)
    ctx.eval(ids[:1], False)
    t0 = time.perf_counter()
    for t in ids[1:tg + 1]:
        ctx.eval([t], False)
    res[f"tg{tg}"] = tg / (time.perf_counter() - t0)
    del ctx
    for b in batches:  # b sequences, one token each per step
        rt = core.Runtime(model, be, max_context=tg + 2, max_step_tokens=max(256, b), budget_sequences=b)
        seqs = [rt.seq_new() for _ in range(b)]
        rt.eval([(s, [int(ids[i % len(ids)])], "last") for i, s in enumerate(seqs)])
        t0 = time.perf_counter()
        for step in range(tg):
            rt.eval([(s, [int(ids[(i + step) % len(ids)])], "last") for i, s in enumerate(seqs)])
        res[f"batch{b}"] = b * tg / (time.perf_counter() - t0)
        del rt
    return res


# ------------------------------------------------------------------ PyTorch eager baseline

def torch_openelm(torch, model, dtype):
    """OpenELM's forward in plain PyTorch on the .oelm file's weights (f16/bf16): a KV cache
    preallocated per layer, SDPA with the per-layer GQA head counts."""
    import torch.nn.functional as F

    cfg = model.config
    tdt = {"f16": torch.float16, "bf16": torch.bfloat16}[dtype]

    def t(name):
        a = model.tensor(name)
        if a.dtype == np.uint16:  # 16-bit weights come back as their bits
            x = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16 if dtype == "bf16" else torch.float16)
            return x.to("cuda", tdt)
        return torch.from_numpy(np.asarray(a, dtype=np.float32)).to("cuda", tdt)

    L, hd, D = cfg["n_layer"], cfg["head_dim"], cfg["d_model"]
    W = {n: t(n) for n in model.tensor_names() if n != "tokenizer.model"}
    emb = W["token_embd"]
    head = W.get("output", emb)
    eps = float(cfg["norm_eps"])
    inv_freq = 1.0 / (float(cfg["rope_theta"]) ** (torch.arange(0, hd, 2, device="cuda").float() / hd))

    def rms(x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(tdt) * w

    def rope(x, pos):  # x [heads, T, hd]
        ang = pos[:, None].float() * inv_freq[None, :]
        cos, sin = torch.cat([ang.cos()] * 2, -1).to(tdt), torch.cat([ang.sin()] * 2, -1).to(tdt)
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def new_cache(n):
        return [(torch.empty(cfg["n_head_kv"][i], n, hd, device="cuda", dtype=tdt),
                 torch.empty(cfg["n_head_kv"][i], n, hd, device="cuda", dtype=tdt)) for i in range(L)]

    @torch.inference_mode()
    def forward(ids, cache, p0):
        T = ids.shape[0]
        pos = torch.arange(p0, p0 + T, device="cuda")
        x = emb[ids]
        for i in range(L):
            nq, nkv = cfg["n_head_q"][i], cfg["n_head_kv"][i]
            p = f"blk.{i}."
            qkv = rms(x, W[p + "attn_norm"]) @ W[p + "attn_qkv"].T
            q, k, v = qkv.view(T, nq + 2 * nkv, hd).transpose(0, 1).split([nq, nkv, nkv], 0)
            if p + "attn_q_norm" in W:
                q, k = rms(q, W[p + "attn_q_norm"]), rms(k, W[p + "attn_k_norm"])
            q, k = rope(q, pos), rope(k, pos)
            kc, vc = cache[i]
            kc[:, p0:p0 + T], vc[:, p0:p0 + T] = k, v
            rep = nq // nkv
            kk = kc[:, :p0 + T].repeat_interleave(rep, 0)
            vv = vc[:, :p0 + T].repeat_interleave(rep, 0)
            o = F.scaled_dot_product_attention(q, kk, vv, is_causal=T > 1 and p0 == 0)
            x = x + o.transpose(0, 1).reshape(T, nq * hd) @ W[p + "attn_output"].T
            gu = rms(x, W[p + "ffn_norm"]) @ W[p + "ffn_gate_up"].T
            g, u = gu.chunk(2, -1)
            x = x + (F.silu(g) * u) @ W[p + "ffn_down"].T
        return rms(x[-1:], W["output_norm"]) @ head.T

    return forward, new_cache


def time_torch(torch, model, dtype, pp, tg, rng) -> dict:
    forward, new_cache = torch_openelm(torch, model, dtype)
    vocab = model.config["vocab_size"]
    ids = torch.tensor(rng.integers(3, vocab, size=max(pp, tg + 1)), device="cuda")
    res = {}
    cache = new_cache(max(pp, tg + 1))
    forward(ids[:16], cache, 0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    forward(ids[:pp], cache, 0)
    torch.cuda.synchronize()
    res[f"pp{pp}"] = pp / (time.perf_counter() - t0)
    forward(ids[:1], cache, 0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(1, tg + 1):
        forward(ids[i:i + 1], cache, i).argmax().item()  # the host sees each token, as a decoder would
    torch.cuda.synchronize()
    res[f"tg{tg}"] = tg / (time.perf_counter() - t0)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models-dir", default="build/cuda_models")
    p.add_argument("--presets", nargs="+", default=["270M", "1_1B"])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "f16", "q8", "q4"])
    p.add_argument("--pp", type=int, default=512)
    p.add_argument("--tg", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="*", default=[8, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline and bandwidth")
    p.add_argument("--make-tiny", metavar="DIR", help="only write the tiny test models into DIR")
    args = p.parse_args(argv)

    if args.make_tiny:
        make_models(Path(args.make_tiny), "tiny", ["f32", "f16", "bf16", "q8", "q4"])
        return 0

    from openelm_rt import _core

    info = _core.cuda_info()
    if not info["available"]:
        print(f"no CUDA device: {info['reason']}", file=sys.stderr)
        return 2
    torch = None
    if not args.no_torch:
        try:
            import torch
            if not torch.cuda.is_available():
                torch = None
        except ImportError:
            torch = None
    bw = copy_bandwidth(torch) if torch else float("nan")
    print(f"\n{info['device']}; device copy bandwidth {bw / 1e9:.0f} GB/s (read + write, PyTorch), medians of "
          f"{args.repeats}; random weights, token ids only")
    cols = [f"pp{args.pp}", f"tg{args.tg}"] + [f"batch{b}" for b in args.batches]
    print("| model | dtype | MB/token | " + " | ".join(f"{c} tok/s" for c in cols) +
          " | tg bound tok/s | tg / bound | torch pp | torch tg | tg / torch |")
    print("|---|---|---|" + "---|" * (len(cols) + 5))
    rng = np.random.default_rng(0)
    for preset in args.presets:
        paths = make_models(Path(args.models_dir), preset, args.dtypes,
                            log=lambda m: print(m, file=sys.stderr, flush=True))
        for dt in args.dtypes:
            model = _core.Model(str(paths[dt]), False)
            wbytes = weight_bytes_per_token(model)
            runs = [time_openelm(_core, model, model.config["vocab_size"], args.pp, args.tg, args.batches, rng)
                    for _ in range(args.repeats)]
            r = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
            bound = bw / wbytes
            tr = {}
            if torch is not None and dt in ("f16", "bf16"):
                try:
                    tr = time_torch(torch, model, dt, args.pp, args.tg, rng)
                except Exception as e:  # the baseline is a comparison, not the test
                    print(f"torch baseline failed on {preset} {dt}: {e}", file=sys.stderr)
            tg = r[f"tg{args.tg}"]
            print(f"| {preset} | {dt} | {wbytes / 1e6:.0f} | " + " | ".join(f"{r[c]:.0f}" for c in cols) +
                  f" | {bound:.0f} | {tg / bound:.0%} | {tr.get(f'pp{args.pp}', float('nan')):.0f} | "
                  f"{tr.get(f'tg{args.tg}', float('nan')):.0f} | "
                  f"{tg / tr[f'tg{args.tg}'] if tr else float('nan'):.2f} |", flush=True)
            del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
