"""Running under a memory budget (csrc/model/streaming.*): the planner, the I/O engine, and the
exact streamed mode, whose logits must equal the resident path's bit for bit.
"""
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import build_model, env_with_pythonpath, prompt_ids

DTYPES = ["f32", "f16", "bf16", "q8", "q4"]
# Small steps and context, so the model's weights are most of what the budget holds.
RT_KW = dict(max_context=64, max_step_tokens=16, kv_budget=8 * 96 * 1024)  # 8 blocks


@pytest.fixture(scope="module")
def core():
    from openelm_rt import _core
    return _core


@pytest.fixture(scope="module")
def exports(work_dir, tokenizer_path):
    """24 layers (FFN widths 256 .. 512), so that no layer is a large share of the model, in every
    weight type: {dtype: .oelm path}."""
    from openelm_rt import export
    m = build_model(work_dir, tokenizer_path, "budget", seed=7,
                    config_overrides={"num_transformer_layers": 24, "model_dim": 128, "head_dim": 32,
                                      "ffn_multipliers": [2.0, 4.0]})
    out = {"f32": m.oelm}
    for dt in ("f16", "bf16", "q8", "q4"):
        out[dt] = export.export_checkpoint(m.ckpt_dir, work_dir / f"budget_{dt}.oelm", dtype=dt,
                                           tokenizer=tokenizer_path)
    return out


def _runtime(core, path, **kw):
    model = core.Model(str(path), False)
    return core.Runtime(model, core.Backend("cpu", 2), **{**RT_KW, **kw})


def _logits(rt):
    """Prefill two sequences in one step (one chunked), then decode both: every row's logits."""
    a, b = prompt_ids(23, seed=1), prompt_ids(9, seed=2)
    sa, sb = rt.seq_new(), rt.seq_new()
    out = [rt.eval([(sa, a, "all"), (sb, b, "all")])]
    for i in range(4):
        out.append(rt.eval([(sa, [5 + i], "last"), (sb, [7 + i], "last")]))
    return np.concatenate(out)


def _weights_budget(core, path, fraction):
    """A budget with room for `fraction` of the FFN matrices (read buffers included) beside what is
    always resident (embeddings, attention, norms), the KV cache and scratch. (As a share of the
    whole file, this small model's minimum is 36 % (f32) to 60 % (q4): its embeddings and 4 KiB
    tensor padding weigh far more than in the real sizes, benchmarks/bench_flash.py.)"""
    plan = _runtime(core, path, memory_budget=1 << 40).memory_plan
    budget = int(plan["resident_fixed"] + plan["kv_bytes"] + plan["scratch_bytes"] + plan["other_bytes"]
                 + fraction * plan["resident_ffn"])
    assert budget >= plan["minimum"], plan["text"]
    return budget


@pytest.mark.parametrize("dtype", DTYPES)
def test_streamed_logits_equal_resident(core, exports, dtype):
    path = exports[dtype]
    want = _logits(_runtime(core, path))
    for fraction in (0.3, 0.5, 0.8):
        rt = _runtime(core, path, memory_budget=_weights_budget(core, path, fraction))
        plan = rt.memory_plan
        assert plan["streamed_bytes_per_step"] > 0, plan["text"]
        assert plan["total"] <= plan["budget"]
        got = _logits(rt)
        np.testing.assert_array_equal(got, want, err_msg=f"{dtype} at {fraction:.0%}")
        st = rt.stream_stats
        # Every step read exactly the streamed matrices (each group rounded to 4 KiB pages).
        steps = rt.steps
        assert st["bytes_read"] >= steps * plan["streamed_bytes_per_step"]
        assert st["bytes_read"] <= steps * (plan["streamed_bytes_per_step"] + 2 * 4096 * len(plan["streamed_layers"]))


@pytest.mark.parametrize("io,prefetch", [("direct", False), ("buffered", True), ("mmap", True)])
def test_every_io_mode_is_exact(core, exports, io, prefetch):
    path = exports["q8"]
    want = _logits(_runtime(core, path))
    rt = _runtime(core, path, memory_budget=_weights_budget(core, path, 0.4), stream_io=io, prefetch=prefetch)
    np.testing.assert_array_equal(_logits(rt), want)
    assert rt.stream_stats["layers_streamed"] > 0


def test_plan_keeps_everything_resident_when_it_fits(core, exports):
    rt = _runtime(core, exports["f32"], memory_budget=1 << 40)
    plan = rt.memory_plan
    assert plan["streamed_bytes_per_step"] == 0 and plan["io_bytes"] == 0
    assert rt.stream_stats is None
    assert "streamed: nothing" in plan["text"]
    assert _runtime(core, exports["f32"]).memory_plan is None


def test_planner_refuses_a_budget_below_the_minimum(core, exports):
    path = exports["f32"]
    minimum = _runtime(core, path, memory_budget=1 << 40).memory_plan["minimum"]
    plan = _runtime(core, path, memory_budget=minimum).memory_plan  # the minimum itself works
    assert plan["total"] <= minimum and plan["streamed_bytes_per_step"] > 0
    with pytest.raises(ValueError, match=r"below the minimum of ([0-9.]+) MiB") as e:
        _runtime(core, path, memory_budget=minimum - 1)
    stated = float(re.search(r"minimum of ([0-9.]+) MiB", str(e.value)).group(1))
    assert abs(stated - minimum / 2**20) < 0.06
    assert "raise memory_budget" in str(e.value)


def test_session_budget_as_percentage_generates_the_same(ort, exports):
    path = str(exports["f32"])
    with ort.Session(path, max_context=64) as s:
        want = s.generate(prompt_ids(12), max_new_tokens=10).token_ids
    # 80 % of the file: the KV cache (one sequence of 64), scratch (with the packed f32 path's
    # weight panels in each thread) and the runtime's other allocations (1.4 MiB) take a large
    # share of this small file.
    with ort.Session(path, max_context=64, memory_budget="80%", max_batch=1) as s:
        plan = s.memory_plan
        assert plan["budget"] == int(os.path.getsize(path) * 0.80)
        assert plan["streamed_bytes_per_step"] > 0, plan["text"]
        assert s.generate(prompt_ids(12), max_new_tokens=10).token_ids == want
        assert s.stream_stats["bytes_read"] > 0
    for bad in ("0%", "-5%", "x%", "lots"):
        with pytest.raises(ValueError, match="memory_budget"):
            ort.Session(path, memory_budget=bad)
    with pytest.raises(ValueError, match="stream_io"):
        ort.Session(path, memory_budget="50%", stream_io="aio")


def test_cli_memory_budget_prints_the_plan(exports):
    path = str(exports["f32"])
    run = lambda *a: subprocess.run([sys.executable, "-m", "openelm_rt.cli", "generate", "--model", path, "--prompt", "Hello",
                                     "--max-new-tokens", "4", "--max-context", "64", *a],
                                    capture_output=True, text=True, env=env_with_pythonpath(), timeout=120)
    ok, base = run("--memory-budget", "80%"), run()
    assert ok.returncode == 0, ok.stderr
    assert "memory plan: budget" in ok.stderr and "streamed per forward step" in ok.stderr
    assert ok.stdout == base.stdout
    bad = run("--memory-budget", "1MiB")
    assert bad.returncode != 0 and "below the minimum of" in bad.stderr


# ----------------------------------------------------------------------------- the I/O engine

@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("io") / "data.bin"
    rng = np.random.default_rng(0)
    blob = rng.integers(0, 256, size=3 * (1 << 20) + 4000, dtype=np.uint8).tobytes()  # not a whole page
    p.write_bytes(blob)
    return p, blob


# The second crosses 1 MiB chunks and ends in the file's last, partial page (96 bytes past its end).
RANGES = [(0, 4096), (8192, (3 << 20) - 4096)]


@pytest.mark.parametrize("fault", ["", "short", "eintr"])
@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_io_reads_exact_bytes_through_faults(core, data_file, mode, fault):
    path, blob = data_file
    r = core._io_read(str(path), RANGES, mode=mode, threads=3, fault=fault)
    got = r["data"]
    assert got[:4096] == blob[:4096]
    assert got[4096:4096 + len(blob) - 8192] == blob[8192:]  # up to the end of the file
    assert r["requests"] == 2
    if fault:
        assert r["retries"] > 0 and r["syscalls"] > r["retries"]
    else:
        assert r["retries"] == 0


def test_io_direct_rejects_unaligned(core, data_file):
    path, blob = data_file
    probe = core._io_read(str(path), [(0, 4096)], mode="direct")
    if probe["mode"] != "direct":
        pytest.skip("this file system refuses O_DIRECT")
    with pytest.raises(ValueError, match="aligned to 4096"):
        core._io_read(str(path), [(100, 5000)], mode="direct")
    r = core._io_read(str(path), [(100, 5000)], mode="buffered")
    assert r["data"] == blob[100:5100]


def test_io_end_of_file_is_an_error(core, data_file):
    path, blob = data_file
    with pytest.raises(RuntimeError, match="end of file"):
        core._io_read(str(path), [(len(blob) // 4096 * 4096, 2 * 4096)], mode="buffered")


def test_io_tmpfs_falls_back_or_reads_directly(core, data_file):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    _, blob = data_file
    p = f"/dev/shm/oelm_io_test_{os.getpid()}"
    with open(p, "wb") as f:
        f.write(blob)
    try:
        r = core._io_read(p, RANGES, mode="direct")
        # tmpfs without O_DIRECT (Linux < 6.6) falls back to buffered reads, flagged.
        assert r["fell_back"] == (r["mode"] == "buffered")
        assert r["data"][:4096] == blob[:4096]
        assert r["data"][4096:4096 + len(blob) - 8192] == blob[8192:]
    finally:
        os.unlink(p)


def test_coalesce(core):
    # Adjacent and near ranges become one aligned read; far ones stay apart; buffer offsets pack.
    assert core._coalesce([(4096, 100), (8192, 5000)], 0) == [(4096, 4096 + 8192, 0)]
    assert core._coalesce([(0, 10), (3 * 4096, 10)], 0) == [(0, 4096, 0), (3 * 4096, 4096, 4096)]
    assert core._coalesce([(3 * 4096, 10), (0, 10)], 8192) == [(0, 4 * 4096, 0)]
    assert core._coalesce([(0, 4096), (100, 50)], 0) == [(0, 4096, 0)]


# ------------------------------------------------------------------------------- peak memory

@pytest.fixture(scope="module")
def medium(work_dir, tokenizer_path):
    """Weights large enough (~55 MB) that they, not the interpreter, dominate the process:
    {"ordinary": path, "flash": the flash-layout export of the same checkpoint}."""
    from openelm_rt import export
    m = build_model(work_dir, tokenizer_path, "budget_medium", seed=9,
                    config_overrides={"num_transformer_layers": 20, "model_dim": 256, "head_dim": 32,
                                      "ffn_multipliers": [2.0, 4.0]})
    fl = export.export_checkpoint(m.ckpt_dir, work_dir / "budget_medium_flash.oelm", tokenizer=tokenizer_path,
                                  flash_layout=True, bundle_neurons=128, flash_calibration_tokens=256)
    return {"ordinary": m.oelm, "flash": fl}


@pytest.mark.parametrize("layout", ["ordinary", "flash"])
def test_peak_rss_stays_within_the_budget(medium, layout):
    path = medium[layout]
    size = os.path.getsize(path)
    budget = size * 6 // 10
    script = textwrap.dedent(f"""
        import json, numpy, openelm_rt, openelm_rt._core
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        def model_mapping_rss():
            total, ours = 0, False
            for line in open("/proc/self/smaps"):
                if "-" in line.split()[0]:
                    ours = line.rstrip().endswith(".oelm")
                elif ours and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
            return total
        base, anon = status("VmRSS:"), status("RssAnon:")
        s = openelm_rt.Session({str(path)!r}, max_context=64, memory_budget={budget}, max_batch=1, threads=2)
        ids = s.generate(list(range(1, 40)), max_new_tokens=16).token_ids
        print(json.dumps({{"hwm": status("VmHWM:") - base, "model": status("RssAnon:") - anon + model_mapping_rss(),
                          "plan": s.memory_plan["total"], "streamed": s.memory_plan["streamed_bytes_per_step"],
                          "n": len(ids)}}))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env_with_pythonpath(),
                       timeout=300)
    assert r.returncode == 0, r.stderr
    import json
    d = json.loads(r.stdout.strip().splitlines()[-1])
    print(layout, {k: (v / 2**20 if k != "n" else v) for k, v in d.items()}, "budget MiB", budget / 2**20)
    assert d["streamed"] > 0.2 * size and d["n"] == 16
    # The model's memory (anonymous pages the session added: KV, scratch, buffers, parsed
    # metadata; and the mapped file's resident pages): within the budget.
    assert d["model"] <= budget, d
    # The process's peak: the same plus code pages of the library as its kernels first run.
    assert d["hwm"] <= budget + (8 << 20), d
