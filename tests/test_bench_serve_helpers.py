"""The llama-server comparison helpers of benchmarks/bench_serve.py (the comparison itself runs
in the benchmark, not here: it needs llama-server built, which takes minutes)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
pytest.importorskip("numpy")
import bench_serve  # noqa: E402
import llama_side  # noqa: E402


def test_llama_server_path_must_be_an_executable(tmp_path):
    f = tmp_path / "llama-server"
    f.write_text("not a binary")
    with pytest.raises(FileNotFoundError, match="not an executable file.*'auto'"):
        llama_side.ensure_llama_server(str(f))
    with pytest.raises(FileNotFoundError, match="not an executable"):
        llama_side.ensure_llama_server(str(tmp_path / "missing"))
    f.chmod(0o755)
    assert llama_side.ensure_llama_server(str(f)) == str(f)


def test_llama_server_build_disables_amx_and_builds_only_the_server():
    args = llama_side.LLAMA_SERVER_CMAKE_ARGS
    assert "-DGGML_AMX_INT8=OFF" in args and "-DGGML_NATIVE=OFF" in args and "-DLLAMA_CURL=OFF" in args


def test_median_row_takes_each_metric_median_over_repetitions():
    reps = [{"side": "server", "concurrency": 8, **{k: v for k in bench_serve.METRICS}} for v in (3.0, 1.0, 2.0)]
    m = bench_serve.median_row(reps)
    assert m["side"] == "server" and m["reps"] == 3
    assert all(m[k] == 2.0 for k in bench_serve.METRICS)
