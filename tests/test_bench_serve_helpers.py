"""The llama-server comparison helpers of benchmarks/bench_serve.py (the comparison itself runs
in the benchmark, not here: it needs llama-server built, which takes minutes)."""
import math
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


def test_overhead_histogram_scrape_delta_quantiles():
    """The server-overhead figures: a scraped /metrics histogram, the difference of two scrapes,
    Prometheus-style interpolated quantiles and the exact share within a bucket bound."""
    prom = pytest.importorskip("prometheus_client")
    reg = prom.CollectorRegistry()
    h = prom.Histogram(bench_serve.OVERHEAD, "x", labelnames=["stage"], buckets=(0.001, 0.002, 0.005),
                       registry=reg)
    h.labels("token").observe(0.0005)
    before = bench_serve.scrape_overhead(prom.generate_latest(reg).decode())
    for v in (0.0005, 0.0015, 0.0015, 0.004):
        h.labels("token").observe(v)
    h.labels("ttft").observe(0.003)
    d = bench_serve.overhead_delta(bench_serve.scrape_overhead(prom.generate_latest(reg).decode()), before)
    tok = d["token"]
    assert tok["count"] == 4 and tok["sum"] == pytest.approx(0.0075)
    assert tok["buckets"] == [(0.001, 1), (0.002, 3), (0.005, 4), (float("inf"), 4)]
    assert d["ttft"]["count"] == 1  # a stage absent before counts from zero
    assert bench_serve.hist_quantile(tok["buckets"], 0.5) == pytest.approx(0.0015)  # rank 2: half into (1, 2] ms
    assert bench_serve.hist_quantile(tok["buckets"], 0.25) == pytest.approx(0.001)
    assert bench_serve.share_within(tok["buckets"], 0.001) == 0.25
    assert bench_serve.share_within(tok["buckets"], 0.005) == 1.0
    rows = bench_serve.overhead_rows({8: d})
    t = next(r for r in rows if r["stage"] == "token")
    assert t["concurrency"] == 8 and t["count"] == 4 and t["within_target"] == 0.25 and t["target_ms"] == 1.0
    inf = [(0.001, 0), (float("inf"), 2)]
    assert bench_serve.hist_quantile(inf, 0.99) == 0.001  # in +Inf: the largest finite bound
    assert math.isnan(bench_serve.hist_quantile([(0.001, 0), (float("inf"), 0)], 0.5))  # no observations
