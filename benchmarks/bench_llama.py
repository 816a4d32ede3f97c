"""openelm_rt next to llama.cpp (llama-cpp-python) on the same random OpenELM weights:
speed (prefill pp128/pp512, decode tg128) and quality of each weight type against f32.

    python benchmarks/bench_llama.py --models 270M 1_1B --threads 1 2 --out results/llama

What it does, per model:
1. Builds (once, cached in ~/.cache/openelm_rt) a Hugging Face-format OpenELM checkpoint with
   random weights in the real shape and exports it to .oelm for each of our weight types.
2. Converts the *same* safetensors to an F32 GGUF with our converter (llama_worker.py, using
   the `gguf` package), then makes F16 / Q8_0 / Q4_0 GGUFs with llama.cpp's own quantizer
   (llama_model_quantize, default parameters: what llama-quantize users get), and prints the
   type llama.cpp chose for each tensor kind (the tied embedding/LM head in particular).
3. Proves "same weights": llama.cpp F32 logits vs our f32 logits on the quality token ids
   (llama.cpp with an F32 KV cache and no flash attention for this check only; with its
   defaults, F16 rounding inside attention costs ~1e-3 relative).
4. Quality (quality.py): KL divergence and top-1 agreement of next-token distributions,
   each runtime against its own f32 run, and the relative error of every layer's output
   from a NumPy forward pass on each side's dequantized weights (weight quantization only).
5. Speed: for each weight type pair (our f16/q8/q4 vs llama F16/Q8_0/Q4_0) and thread count,
   interleaved runs (bandwidth, ours, llama, ours, llama, ...) repeated --repeats times;
   medians. llama.cpp runs in its own process (its venv's Python) with its default context
   settings, threads = threads_batch = n, n_batch = n_ubatch = 512, a fresh KV cache per run.
   The decode bound is the read bandwidth measured in the same run (per thread count) divided
   by each side's weight bytes per token. Each timed run starts after --settle seconds of
   idle: llama.cpp's OpenMP threads keep spinning after its run, and without the pause they
   took a core from the next run of ours (270M q4, two threads: ours 120 tok/s right after
   llama.cpp, 172 after a 0.5 s pause, in the same benchmark; llama.cpp 142 / 136).

Random weights need one change to be useful for quality numbers: with the usual init the
logits have a standard deviation of ~1 over the 32000-token vocabulary, so every next-token
distribution is nearly uniform (entropy ~9.9 nats, top-1 probability ~0.001) and KL / top-1
agreement say nothing. The checkpoint is therefore written with logit_scale=5 (the final
norm weight, hence every logit, times 5; nothing else changes): mean entropy ~2.8 nats and
top-1 probability ~0.4 on real text, like a trained small model. The output prints the
measured spread. Speed does not depend on it. Even so, a random network is more sensitive
to weight noise than a trained one (no redundancy; the error of the residual stream grows a
few-fold over the layers), so the quality numbers are for comparing weight types and
runtimes on the same weights, not for predicting a real model's loss.

llama-cpp-python lives in its own venv (--llama-venv, default
~/.cache/openelm_rt/llama-venv), created on first use: pip compiles llama.cpp for this CPU,
about 10 minutes. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import sentencepiece as spm

from openelm_rt import _core, export, hf_config
from openelm_rt.checkpoint import HFCheckpoint
from openelm_rt.demo import default_cache_dir, ensure_random_model
from openelm_rt.safetensors_io import bf16_to_f32

from bench_cpu import time_decode, time_prefill, weight_bytes_per_token
import llama_side
import quality

ALL_DTYPES = ("f16", "bf16", "q8", "q4", "q4k")
LOGIT_SCALE = 5.0


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- weights as float32

class OelmWeights:
    """get(hf_name) -> float32 weights as stored in one of our .oelm files (dequantized)."""

    def __init__(self, path: str):
        self.model = _core.Model(path, False)
        meta = self.model.metadata
        spec = hf_config.parse_config(meta["source"]["hf_config"])
        self.names = {t.hf_name: t.oelm_name for t in hf_config.tensor_layout(spec)}
        self.info = {t["name"]: t for t in meta["tensors"]}

    def __call__(self, hf_name: str) -> np.ndarray:
        name = self.names[hf_name]
        a, dtype = self.model.tensor(name), self.info[name]["dtype"]
        if dtype == "f32":
            return a
        if dtype == "f16":
            return a.astype(np.float32)
        if dtype == "bf16":
            return bf16_to_f32(a)
        from openelm_rt import quant  # block-quantized q8_b32r16i / q4_b32r16i: raw bytes
        N, K = self.info[name]["shape"]
        return quant.dequantize(a, dtype, N, K)


class GgufWeights:
    """get(hf_name) -> float32 weights of a GGUF, dequantized by the worker (gguf.quants)."""

    def __init__(self, worker, path: str, hf_cfg: dict, tmpdir: str):
        self.worker, self.path, self.tmpdir = worker, path, tmpdir
        spec = hf_config.parse_config(hf_cfg)
        self.names = {t.hf_name: t.oelm_name for t in hf_config.tensor_layout(spec)}

    def __call__(self, hf_name: str) -> np.ndarray:
        name = self.names[hf_name]
        if name.endswith("ffn_gate_up"):  # llama.cpp keeps gate and up separate
            parts = [name[:-len("gate_up")] + "gate.weight", name[:-len("gate_up")] + "up.weight"]
        else:
            parts = [name + ".weight"]
        files = self.worker.call("dequant", path=self.path, names=parts, out_dir=self.tmpdir)["files"]
        arrays = []
        for p in parts:
            arrays.append(np.load(files[p]))
            os.unlink(files[p])
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def checkpoint_weights(ckpt: HFCheckpoint):
    return lambda name: np.asarray(ckpt.where[name].get(name), np.float32)


# ----------------------------------------------------------------------------- runs

def our_logits(path: str, ids, threads: int) -> np.ndarray:
    model = _core.Model(path, False)
    be = _core.Backend("cpu", threads)
    return np.stack([_core.Context(model, len(s), be).eval(s, True) for s in ids])


def llama_logits(worker, path: str, ids, threads: int, exact: bool, tmpdir: str) -> np.ndarray:
    T = max(len(s) for s in ids)
    worker.call("load", path=path, n_ctx=T, n_batch=max(512, T), exact=exact)
    out = os.path.join(tmpdir, "logits.npy")
    worker.call("logits", ids=ids, threads=threads, out=out)
    a = np.load(out)
    os.unlink(out)
    return a


def gguf_summary(worker, path: str) -> dict:
    """Total bytes, the embedding's type, and a count of types over the 2-D tensors."""
    t = worker.call("tensors", path=path)["tensors"]
    kinds: dict = {}
    for name, (typ, _) in t.items():
        if not name.endswith("norm.weight"):
            kinds[typ] = kinds.get(typ, 0) + 1
    return {"bytes": sum(b for _, b in t.values()), "token_embd": t["token_embd.weight"][0],
            "matrix_types": kinds}


def speed(model_path: str, gguf: str, worker, args, backends) -> dict:
    model = _core.Model(model_path, False)
    worker.call("load", path=gguf, n_ctx=max(max(args.pp), args.tg + 1), n_batch=max(512, max(args.pp)))
    rng = np.random.default_rng(0)
    t_max, be_max = max(backends), backends[max(backends)]  # warm-up: page in both files, build graphs
    time_prefill(model, be_max, min(args.pp), rng), time_decode(model, be_max, 8, rng)
    worker.call("pp", n=min(args.pp), threads=t_max), worker.call("tg", n=8, threads=t_max)
    tests = [f"pp{n}" for n in args.pp] + [f"tg{args.tg}"]
    res = {t: {"bw": [], **{f"{side}_{k}": [] for k in tests for side in ("ours", "llama")}}
           for t in args.threads}

    def settle():  # idle before each timed run (see the docstring, step 5)
        time.sleep(args.settle)

    for rep in range(args.repeats):
        for t, be in backends.items():
            r = res[t]
            r["bw"].append(be.read_bandwidth(1 << 30, 3))
            seed = int(rng.integers(1 << 30))
            for n in args.pp:  # interleaved: ours, then llama.cpp, test by test
                settle()
                r[f"ours_pp{n}"].append(time_prefill(model, be, n, rng))
                settle()
                r[f"llama_pp{n}"].append(worker.call("pp", n=n, threads=t, seed=seed)["tok_s"])
            settle()
            r[f"ours_tg{args.tg}"].append(time_decode(model, be, args.tg, rng))
            settle()
            r[f"llama_tg{args.tg}"].append(worker.call("tg", n=args.tg, threads=t, seed=seed)["tok_s"])
        log(f"  repeat {rep + 1}/{args.repeats} done")
    # Medians, and every repeat's figure under "runs" (the JSON keeps them: ratios per repeat, spread).
    return {t: {**{k: statistics.median(v) for k, v in r.items()}, "runs": r} for t, r in res.items()}


# ----------------------------------------------------------------------------- report

class Report:
    def __init__(self):
        self.lines: list[str] = []
        self.data: dict = {"models": {}}

    def add(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def write(self, out: str) -> None:
        stem = out[:-5] if out.endswith(".json") else out
        os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
        with open(stem + ".json", "w") as f:
            json.dump(self.data, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write("\n".join(self.lines) + "\n")
        log(f"wrote {stem}.json and {stem}.md")


def fmt(x, spec=".1f"):
    return "—" if x is None else format(x, spec)


def run_model(preset: str, args, rep: Report, worker, dtypes) -> None:
    d = rep.data["models"][preset] = {}
    m32 = ensure_random_model(preset, "f32", args.cache_dir, args.tokenizer, logit_scale=args.logit_scale)
    ours = {dt: ensure_random_model(preset, dt, args.cache_dir, args.tokenizer,
                                    logit_scale=args.logit_scale).path for dt in dtypes}
    ftypes = [llama_side.LLAMA_TYPE[dt] for dt in dtypes]
    ggufs = llama_side.ensure_ggufs(worker, m32.checkpoint_dir, m32.tokenizer_path, m32.path, ftypes,
                                    max(args.threads))
    with open(os.path.join(m32.checkpoint_dir, "config.json"), encoding="utf-8") as f:
        hf_cfg = json.load(f)
    rep.add(f"\n## OpenELM-{preset} (random weights, logit_scale {args.logit_scale:g})\n")

    our_bytes = {dt: weight_bytes_per_token(_core.Model(p, False)) for dt, p in ours.items()}
    summ = {ft: gguf_summary(worker, p) for ft, p in ggufs.items()}
    d["weights"] = {"ours": our_bytes, "llama": summ}
    rep.add("| ours | bytes/token | llama.cpp | bytes/token | llama.cpp token_embd (= LM head) | llama.cpp matrix types |")
    rep.add("|---|---|---|---|---|---|")
    for dt in dtypes:
        ft = llama_side.LLAMA_TYPE[dt]
        s = summ[ft]
        rep.add(f"| {dt} | {our_bytes[dt] / 1e6:.1f} MB | {ft} | {s['bytes'] / 1e6:.1f} MB | {s['token_embd']} | "
                + ", ".join(f"{k}×{v}" for k, v in sorted(s["matrix_types"].items())) + " |")

    sp = spm.SentencePieceProcessor(model_file=m32.tokenizer_path)
    ids = quality.quality_ids(sp, args.quality_seqs, args.quality_len)
    nthreads = max(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_llama_") as tmp:
        ref_ours = our_logits(m32.path, ids, nthreads)
        ref_llama_exact = llama_logits(worker, ggufs["F32"], ids, nthreads, True, tmp)
        err = float(np.abs(ref_llama_exact - ref_ours).max() / np.abs(ref_ours).max())
        ok = err < 1e-4
        d["conversion_check"] = {"max_abs_diff_over_max_abs_logit": err, "ok": ok}
        rep.add(f"\nSame weights: llama.cpp F32 logits vs ours f32 on {len(ids)}×{len(ids[0])} tokens: "
                f"max |diff| / max |logit| = {err:.2e} ({'OK' if ok else 'MISMATCH'}, limit 1e-4; "
                f"llama.cpp with F32 KV cache and no flash attention for this check)")
        if not ok:
            raise SystemExit("the GGUF does not compute what our f32 model computes; not comparing")
        if not args.no_quality:
            quality_section(args, rep, d, worker, ids, ours, ggufs, hf_cfg, m32, ref_ours, tmp, dtypes)
    if not args.no_speed:
        speed_section(args, rep, d, worker, ours, ggufs, our_bytes, summ, dtypes, hf_cfg)


def quality_section(args, rep, d, worker, ids, ours, ggufs, hf_cfg, m32, ref_ours, tmp, dtypes):
    nthreads = max(args.threads)
    log("quality: next-token distributions ...")
    ref_llama = llama_logits(worker, ggufs["F32"], ids, nthreads, False, tmp)
    sp_ = quality.spread(ref_ours)
    # Runtime difference at f32: llama.cpp's default context (F16 KV cache, flash attention) vs ours.
    rows = {("llama.cpp vs ours", "F32 vs f32"): quality.next_token_stats(ref_ours, ref_llama)}
    for dt in dtypes:
        rows[("ours", dt)] = quality.next_token_stats(ref_ours, our_logits(ours[dt], ids, nthreads))
        ft = llama_side.LLAMA_TYPE[dt]
        rows[("llama.cpp", ft)] = quality.next_token_stats(
            ref_llama, llama_logits(worker, ggufs[ft], ids, nthreads, False, tmp))
    n_layer_ids = ids[:args.layer_seqs]
    log(f"quality: layer outputs (NumPy forward, {len(n_layer_ids)}×{len(ids[0])} tokens) ...")
    with HFCheckpoint(m32.checkpoint_dir) as ck:
        ref_states = list(quality.layer_states(hf_cfg, checkpoint_weights(ck), n_layer_ids))
    for dt in dtypes:
        rows[("ours", dt)]["layer_rel_err"] = quality.layer_errors(hf_cfg, ref_states, OelmWeights(ours[dt]),
                                                                   n_layer_ids)
        ft = llama_side.LLAMA_TYPE[dt]
        rows[("llama.cpp", ft)]["layer_rel_err"] = quality.layer_errors(
            hf_cfg, ref_states, GgufWeights(worker, ggufs[ft], hf_cfg, tmp), n_layer_ids)
    d["quality"] = {"reference_spread": sp_, "tokens": [len(ids), len(ids[0])],
                    "rows": {f"{a}:{b}": v for (a, b), v in rows.items()}}
    rep.add(f"\nQuality against f32 on the same weights: {len(ids)} sequences × {len(ids[0])} tokens of "
            f"real text (BOS + corpus.txt). Reference distributions: mean entropy {sp_['entropy']:.2f} nats, "
            f"mean top-1 probability {sp_['top1_prob']:.2f}, logit std {sp_['logit_std']:.2f}.")
    rep.add("KL(f32 ‖ type) and top-1 agreement come from the runtimes, each against its own f32 run "
            "(llama.cpp with its default context, whose F16 KV cache and flash attention add rounding of "
            "their own: the first row compares its F32 run with ours). "
            "Layer error = ‖x_type − x_f32‖ / ‖x_f32‖ of the residual stream after a layer, from a NumPy "
            f"forward pass on the dequantized weights ({len(n_layer_ids)} sequences): weight quantization "
            "only, no runtime involved. Random weights have no redundancy, and errors grow a few-fold "
            "from the first layer to the last, so absolute values are far worse than a trained model's "
            "(at Q4_0 especially): compare the rows with each other, not with published figures.\n")
    rep.add("| runtime | type | KL mean | KL max | top-1 agree | layer err: first | last | max |")
    rep.add("|---|---|---|---|---|---|---|---|")
    for (side, typ), r in rows.items():
        le = r.get("layer_rel_err")
        rep.add(f"| {side} | {typ} | {r['kl_mean']:.2e} | {r['kl_max']:.2e} | {r['top1']:.1%} | "
                + (f"{le[0]:.2e} | {le[-1]:.2e} | {max(le):.2e} |" if le else "— | — | — |"))


def matmul_flops_per_token(hf_cfg: dict) -> int:
    """2 x the weights of every matrix product of a token (LM head included, embedding lookup
    and attention scores not): the prefill work that dominates at these lengths."""
    spec = hf_config.parse_config(hf_cfg)
    return 2 * sum(int(np.prod(t.shape)) for t in hf_config.tensor_layout(spec) if not t.is_norm)


def speed_section(args, rep, d, worker, ours, ggufs, our_bytes, summ, dtypes, hf_cfg):
    flops = matmul_flops_per_token(hf_cfg)
    backends = {t: _core.Backend("cpu", t, "", not args.bf16_activations) for t in args.threads}
    kernels = next(iter(backends.values())).kernels + (", exact=False" if args.bf16_activations else "")
    d["speed"] = {}
    tg = f"tg{args.tg}"
    rep.add(f"\nSpeed (tokens/s, medians of {args.repeats} interleaved repeats; our kernels '{kernels}'; "
            f"llama.cpp {llama_side.LLAMA_CPP_PYTHON} with its default context). Decode bound = read "
            f"bandwidth measured in the same run ÷ weight bytes per token (each side's own). Prefill "
            f"is compute-bound: GFLOP/s counts the matrix products, {flops / 1e9:.2f} GFLOP per token.\n")
    rep.add("| ours | llama.cpp | threads | test | ours tok/s | llama tok/s | ours / llama | read GB/s "
            "| decode bound ours / llama | ours % bound | llama % bound | prefill GFLOP/s ours / llama |")
    rep.add("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dt in dtypes:
        ft = llama_side.LLAMA_TYPE[dt]
        log(f"speed: ours {dt} vs llama.cpp {ft} ...")
        r = speed(ours[dt], ggufs[ft], worker, args, backends)
        d["speed"][dt] = {"llama_type": ft, "by_threads": r, "matmul_flops_per_token": flops}
        for t in args.threads:
            m = r[t]
            bo, bl = m["bw"] / our_bytes[dt], m["bw"] / summ[ft]["bytes"]
            for test in [f"pp{n}" for n in args.pp] + [tg]:
                o, l_ = m[f"ours_{test}"], m[f"llama_{test}"]
                dec = test == tg
                rep.add(f"| {dt} | {ft} | {t} | {test} | {o:.1f} | {l_:.1f} | {o / l_:.2f} | "
                        f"{m['bw'] / 1e9:.1f} | "
                        + (f"{bo:.1f} / {bl:.1f} | {o / bo:.0%} | {l_ / bl:.0%} | — |" if dec else
                           f"— | — | — | {o * flops / 1e9:.0f} / {l_ * flops / 1e9:.0f} |"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, choices=("270M", "450M", "1_1B", "3B"),
                   help="default: 270M 1_1B (270M with --quick)")
    p.add_argument("--dtypes", nargs="+", default=None, choices=ALL_DTYPES,
                   help="our weight types, each compared with its llama.cpp peer "
                        "(f16-F16, bf16-BF16, q8-Q8_0, q4-Q4_0, q4k-Q4_K_M); default f16 q8 q4")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=None, help="default 5 (1 with --quick)")
    p.add_argument("--settle", type=float, default=0.5,
                   help="seconds of idle before each timed run, so that neither runtime's "
                        "spinning threads run into the other's (default 0.5)")
    p.add_argument("--pp", type=int, nargs="+", default=None, help="prefill lengths (default 128 512)")
    p.add_argument("--tg", type=int, default=None, help="decode length (default 128)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 270M, 1 repeat, pp128, tg32, 2×64 quality tokens")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--bf16-activations", action="store_true",
                   help="time our side with Backend(exact=False): bf16 weights times activations rounded to bf16 "
                        "(bf16 dot products where the CPU has them) instead of exact f32 ones (the default)")
    p.add_argument("--exact", action="store_true",
                   help="exact f32 activations for bf16 weights: the default now (up to 0.3.1 it was not); accepted "
                        "for old command lines")
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--quality-seqs", type=int, default=None, help="sequences for KL/top-1 (default 4)")
    p.add_argument("--quality-len", type=int, default=None, help="tokens per sequence (default 128)")
    p.add_argument("--layer-seqs", type=int, default=2,
                   help="sequences for the NumPy layer-error pass (default 2)")
    p.add_argument("--logit-scale", type=float, default=LOGIT_SCALE,
                   help=f"random checkpoint's logit scale (default {LOGIT_SCALE:g}; see the docstring)")
    p.add_argument("--llama-venv", default=os.path.join(default_cache_dir(), "llama-venv"))
    p.add_argument("--cache-dir", default=None, help="default ~/.cache/openelm_rt")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--out", default=None, help="write PATH.json and PATH.md (PATH may end in .json)")
    args = p.parse_args(argv)
    if args.exact and args.bf16_activations:
        p.error("--exact and --bf16-activations contradict each other; give one")
    q = args.quick
    args.models = args.models or (["270M"] if q else ["270M", "1_1B"])
    args.repeats = args.repeats or (1 if q else 5)
    args.pp = args.pp or ([128] if q else [128, 512])
    args.tg = args.tg or (32 if q else 128)
    args.quality_seqs = args.quality_seqs or (2 if q else 4)
    args.quality_len = args.quality_len or (64 if q else 128)

    wanted = args.dtypes or ["f16", "q8", "q4"]
    dtypes = [dt for dt in wanted if dt in export.WEIGHT_DTYPES]
    for dt in wanted:
        if dt not in dtypes:
            log(f"our exporter has no {dt!r} weight type (it has {', '.join(export.WEIGHT_DTYPES)}); skipping it")
    if not dtypes:
        raise SystemExit("no weight type to compare")

    python = llama_side.ensure_venv(args.llama_venv)
    rep = Report()
    t0 = time.time()
    with llama_side.LlamaWorker(python) as worker:
        v = worker.call("version")
        rep.data["setup"] = {**vars(args), "dtypes": dtypes, "llama": v, "cpu_count": os.cpu_count()}
        rep.add(f"# openelm_rt vs llama.cpp ({llama_side.LLAMA_CPP_PYTHON}) on the same weights")
        load = os.getloadavg()[0]
        rep.add(f"\n{os.cpu_count()} CPUs, load average {load:.1f} at the start; llama.cpp: "
                f"{v['system_info'].strip()}")
        if load > 0.5:  # llama.cpp's thread barriers in particular collapse on a busy machine
            rep.add(f"\n**Warning: the machine is busy (load average {load:.1f}); timings are not "
                    f"representative.**")
        for preset in args.models:
            run_model(preset, args, rep, worker, dtypes)
    rep.data["seconds"] = time.time() - t0
    rep.data["load_average_at_end"] = os.getloadavg()[0]
    if args.out:
        rep.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
