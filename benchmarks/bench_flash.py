"""A model larger than its memory budget: decode speed and I/O of the exact streamed mode against
the baselines, under the same budget, with a cold page cache every run.

    python benchmarks/bench_flash.py --models 1_1B --dtypes q8 f16 --budgets 30 50 80 --out results/flash

Per model and weight type (random weights in the real shape, no tokenizer, cached in --cache):
the device's read curve (sequential O_DIRECT reads of 1 MiB chunks on 1 and 4 threads, random
4 KiB reads on 4 threads, through the runtime's own I/O engine), then for each budget (a
percentage of the model file; it covers weights, KV cache, activations and read buffers):

  resident  no budget: every weight mapped and kept (the speed the budget costs us)
  naive     every streamed matrix re-read when the layer needs it: buffered pread on one
            thread, nothing overlapped (the paper's baseline), page cache dropped after reads
  mmap      the mapped file, with each streamed matrix's pages dropped after use (madvise
            DONTNEED + posix_fadvise DONTNEED): what mmap does under a memory cap that cannot
            hold them. A cgroup memory limit cannot be created here (no privilege, no systemd
            in the container), so the cap is emulated this way.
  exact     ours: O_DIRECT pread of 1 MiB chunks from 4 I/O threads into two buffers, the next
            layer read while this one computes
  flash     exact, on the flash-layout export of the same checkpoint (--flash-layout; neurons in
            bundles of --bundle-neurons, ranked on --calibration-tokens pseudo-random token ids:
            the weights are random, so the order carries no information, and the exact mode does
            not depend on it): partial layers stay resident, each layer's cold tail is one read
  flash_resident  no budget, on the flash-layout file (the cost of computing bundle by bundle)

Each run is its own process: the model file's pages are dropped from the page cache first
(posix_fadvise DONTNEED, no privilege needed), a --prompt-token prompt is evaluated (time to
first token), then --tokens greedy decode steps. Reported: tokens/s, bytes the runtime read per
token beside /proc/self/io read_bytes per token, mean read size, the share of decode time the
forward pass waited for reads, peak RSS (VmHWM) minus the process's RSS before loading against
the budget, and the file's page-cache residency afterwards (mincore).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import subprocess
import sys
import time

MODES = ("resident", "flash_resident", "naive", "mmap", "exact", "flash")


def log(msg):
    print(f"[bench_flash] {msg}", file=sys.stderr, flush=True)


def ensure_model(preset, dtype, cache):
    from openelm_rt import checkpoint, export, hf_config
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"flash-{preset}-{export.FILE_DTYPE.get(dtype, dtype)}.oelm")
    if os.path.exists(path):
        return path
    ckpt = os.path.join(cache, f"ckpt-{preset}")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        log(f"writing a random {preset} checkpoint (bf16) to {ckpt}")
        checkpoint.write_random_checkpoint(ckpt, hf_config.make_config(preset), dtype="bf16", seed=0)
    log(f"exporting {path}")
    export.export_checkpoint(ckpt, path, dtype=dtype, with_tokenizer=False)
    return path


def ensure_flash_model(preset, dtype, cache, bundle, calib_tokens):
    import numpy as np
    from openelm_rt import export
    plain = ensure_model(preset, dtype, cache)
    path = plain[:-len(".oelm")] + f"-flash{bundle}.oelm"
    if os.path.exists(path):
        return path
    ckpt = os.path.join(cache, f"ckpt-{preset}")
    vocab = json.load(open(os.path.join(ckpt, "config.json")))["vocab_size"]
    ids = np.random.default_rng(1).integers(3, vocab, size=calib_tokens).tolist()
    log(f"exporting {path} (flash layout, bundles of {bundle})")
    export.export_checkpoint(ckpt, path, dtype=dtype, with_tokenizer=False, flash_layout=True,
                             bundle_neurons=bundle, flash_calibration_ids=ids)
    return path


def drop_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached_fraction(path):
    """Share of the file's pages in the page cache (mincore on a fresh mapping)."""
    size = os.path.getsize(path)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = ctypes.create_string_buffer(pages)
        if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
            return None
        libc.munmap(ctypes.c_void_p(addr), size)
        return sum(b & 1 for b in vec.raw) / pages
    finally:
        os.close(fd)


def proc_io_read_bytes():
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def worker(a):
    """One run in this process; prints one JSON line."""
    import numpy as np
    from openelm_rt import _core
    drop_cache(a.path)
    base_rss = status("VmRSS:")
    # The budget is a share of the ordinary file (--size), the same bytes for every mode.
    budget = 0 if a.mode.endswith("resident") else int(a.size * a.budget / 100)
    io = {"naive": "buffered", "mmap": "mmap", "exact": "direct"}.get(a.mode, "direct")
    model = _core.Model(a.path, False)
    be = _core.Backend("cpu", a.threads, "", False)
    try:
        stream = dict(memory_budget=budget, stream_io=io, io_threads=1 if a.mode == "naive" else 4,
                      prefetch=a.mode != "naive") if budget else {}  # (resident: also runs on older builds)
        rt = _core.Runtime(model, be, max_context=a.prompt + a.tokens + 16, max_step_tokens=64, budget_sequences=1,
                           **stream)
    except ValueError as e:
        print(json.dumps({"mode": a.mode, "budget_pct": a.budget, "infeasible": str(e)}))
        return
    plan = rt.memory_plan if budget else None
    rng = np.random.default_rng(0)
    vocab = int(model.config["vocab_size"])
    ids = [1] + rng.integers(3, vocab, size=a.prompt - 1).tolist()
    seq = rt.seq_new()
    t0 = time.perf_counter()
    logits = rt.eval([(seq, ids, "last")])
    ttft = time.perf_counter() - t0
    tok = int(np.argmax(logits[-1]))
    stats = lambda: rt.stream_stats if budget else None  # noqa: E731
    st0, io0, steps0 = stats(), proc_io_read_bytes(), rt.steps
    t0 = time.perf_counter()
    for _ in range(a.tokens):
        logits = rt.eval([(seq, [tok], "last")])
        tok = int(np.argmax(logits[-1]))
    dt = time.perf_counter() - t0
    st1, io1 = stats(), proc_io_read_bytes()
    n = rt.steps - steps0
    out = {"mode": a.mode, "budget_pct": a.budget if budget else None, "budget": budget or None,
           "ttft_s": ttft, "tok_s": n / dt, "ms_per_token": 1000 * dt / n,
           "os_read_bytes_per_token": (io1 - io0) / n,
           "peak_rss_added": status("VmHWM:") - base_rss, "last_token": tok}
    if plan:
        out.update(plan_total=plan["total"], plan_min=plan["minimum"],
                   streamed_bytes_per_step=plan["streamed_bytes_per_step"], io=plan["io"])
    if st0:
        rd = st1["bytes_read"] - st0["bytes_read"]
        reqs = st1["requests"] - st0["requests"]
        out.update(runtime_read_bytes_per_token=rd / n, mean_read_bytes=rd / reqs if reqs else None,
                   io_wait_share=(st1["wait_s"] - st0["wait_s"]) / dt,
                   read_mb_s=rd / (st1["read_s"] - st0["read_s"]) / 1e6 if st1["read_s"] > st0["read_s"] else None)
    del rt
    out["page_cache_after"] = cached_fraction(a.path)
    print(json.dumps(out))


def device_curve(path):
    from openelm_rt import _core
    import random
    size = os.path.getsize(path)
    out = {}
    n = min(size // 2, 512 << 20) // (1 << 20) * (1 << 20)
    for threads in (1, 4):  # timed inside the engine (its read_s), the buffer faulted in before
        drop_cache(path)
        r = _core._io_read(path, [(0, n)], mode="direct", threads=threads, keep=False)
        out[f"seq_1MiB_t{threads}_MB_s"] = n / r["read_s"] / 1e6
    rnd = random.Random(0)
    k = 4096
    offs = sorted({rnd.randrange(0, size // 4096 - 1) * 4096 for _ in range(k)})
    drop_cache(path)
    dt = _core._io_read(path, [(o, 4096) for o in offs], mode="direct", threads=4, keep=False)["read_s"]
    out["rand_4KiB_t4_MB_s"] = len(offs) * 4096 / dt / 1e6
    out["rand_4KiB_t4_iops"] = len(offs) / dt
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["1_1B"])
    p.add_argument("--dtypes", nargs="+", default=["q8"])
    p.add_argument("--budgets", nargs="+", type=int, default=[30, 50, 80], help="percent of the model file")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--tokens", type=int, default=8, help="decode steps per run")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "openelm_rt", "flash"))
    p.add_argument("--bundle-neurons", type=int, default=256, help="flash layout: neurons per bundle")
    p.add_argument("--calibration-tokens", type=int, default=256, help="flash layout: calibration tokens")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    p.add_argument("--prepare", action="store_true", help="only build the model files")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    results = []
    for preset in a.models:
        for dtype in a.dtypes:
            path = ensure_model(preset, dtype, a.cache)
            flash_path = (ensure_flash_model(preset, dtype, a.cache, a.bundle_neurons, a.calibration_tokens)
                          if {"flash", "flash_resident"} & set(a.modes) else None)
            if a.prepare:
                continue
            size = os.path.getsize(path)
            curve = device_curve(path)
            log(f"{preset} {dtype}: {size / 2**20:.0f} MiB; device: " +
                ", ".join(f"{k} {v:.0f}" for k, v in curve.items()))
            runs = []
            for budget in a.budgets:
                for mode in a.modes:
                    if mode.endswith("resident") and budget != a.budgets[0]:
                        continue
                    cmd = [sys.executable, __file__, "--worker", "--path",
                           flash_path if mode.startswith("flash") else path, "--mode", mode, "--budget",
                           str(budget), "--size", str(size), "--tokens", str(a.tokens), "--prompt", str(a.prompt),
                           "--threads", str(a.threads)]
                    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                    if r.returncode != 0:
                        raise SystemExit(f"worker failed: {' '.join(cmd)}\n{r.stderr}")
                    d = json.loads(r.stdout.strip().splitlines()[-1])
                    d.update(model=preset, dtype=dtype, file_bytes=size)
                    log(json.dumps(d))
                    runs.append(d)
            results.append({"model": preset, "dtype": dtype, "file_bytes": size, "device": curve, "runs": runs})
    if a.prepare:
        return
    md = report(results)
    print(md)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out + ".json", "w") as f:
            json.dump(results, f, indent=1)
        with open(a.out + ".md", "w") as f:
            f.write(md)


def report(results):
    mib = lambda b: f"{b / 2**20:.0f}" if b is not None else "-"  # noqa: E731
    lines = []
    for r in results:
        dv = r["device"]
        lines.append(f"\n**{r['model']} {r['dtype']}** ({mib(r['file_bytes'])} MiB). Device: sequential "
                     f"{dv['seq_1MiB_t1_MB_s']:.0f} MB/s (1 thread), {dv['seq_1MiB_t4_MB_s']:.0f} MB/s (4 threads); "
                     f"random 4 KiB {dv['rand_4KiB_t4_MB_s']:.0f} MB/s ({dv['rand_4KiB_t4_iops']:.0f} IOPS, 4 threads)\n")
        lines.append("| budget | mode | tok/s | vs naive | TTFT s | MiB read/token (runtime / OS) | mean read KiB "
                     "| read MB/s | I/O wait | peak RSS added MiB / budget | page cache after |")
        lines.append("|---|---|---:|---:|---:|---|---:|---:|---:|---|---:|")
        naive = {d["budget_pct"]: d["tok_s"] for d in r["runs"] if d["mode"] == "naive" and "tok_s" in d}
        for d in r["runs"]:
            b = f"{d['budget_pct']} %" if d.get("budget_pct") else "none"
            if "infeasible" in d:
                lines.append(f"| {b} | {d['mode']} | infeasible: {d['infeasible'].split(':')[0]} |||||||||")
                continue
            rt_read = d.get("runtime_read_bytes_per_token")
            vs = f"{d['tok_s'] / naive[d['budget_pct']]:.2f}x" if d.get("budget_pct") in naive else "-"
            cells = [b, d["mode"], f"{d['tok_s']:.2f}", vs, f"{d['ttft_s']:.2f}",
                     f"{mib(rt_read)} / {mib(d['os_read_bytes_per_token'])}",
                     f"{d['mean_read_bytes'] / 1024:.0f}" if d.get("mean_read_bytes") else "-",
                     f"{d['read_mb_s']:.0f}" if d.get("read_mb_s") else "-",
                     f"{100 * d['io_wait_share']:.0f} %" if d.get("io_wait_share") is not None else "-",
                     f"{mib(d['peak_rss_added'])} / {mib(d.get('budget'))}",
                     f"{100 * d['page_cache_after']:.0f} %" if d.get("page_cache_after") is not None else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
