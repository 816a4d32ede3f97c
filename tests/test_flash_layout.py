"""The flash layout (docs/FORMAT.md "Flash layout", python/openelm_rt/flash.py,
csrc/model/flash_layout.*): FFN neurons hottest-first in bundles, so that under a memory budget
each layer's cold tail is one sequential read. The exact policy on a flash-layout file must give
the logits of the same file fully resident, bit for bit; and the file computes the same model
as the ordinary layout (up to the order of float sums and, for q8/q4, the down columns'
quantization blocks).
"""
import json
import struct

import numpy as np
import pytest

from conftest import build_model, prompt_ids
from test_memory_budget import _logits, _runtime
from test_memory_budget import _weights_budget as _ffn_budget

BUNDLE = 64


@pytest.fixture(scope="module")
def core():
    from openelm_rt import _core
    return _core


@pytest.fixture(scope="module")
def flash_models(work_dir, tokenizer_path):
    """12 layers of FFN widths 256 .. 512 (bundles of 64 neurons): {dtype: (ordinary, flash)}."""
    from openelm_rt import export
    m = build_model(work_dir, tokenizer_path, "flash", seed=11,
                    config_overrides={"num_transformer_layers": 12, "model_dim": 128, "head_dim": 32,
                                      "ffn_multipliers": [2.0, 4.0]})
    out = {}
    for dt in ("f32", "q8", "bf16"):
        plain = m.oelm if dt == "f32" else export.export_checkpoint(
            m.ckpt_dir, work_dir / f"flash_plain_{dt}.oelm", dtype=dt, tokenizer=tokenizer_path)
        fl = export.export_checkpoint(m.ckpt_dir, work_dir / f"flash_{dt}.oelm", dtype=dt,
                                      tokenizer=tokenizer_path, flash_layout=True,
                                      bundle_neurons=BUNDLE, flash_calibration_tokens=300)
        out[dt] = (plain, fl)
    return out


def test_file_is_version_2_with_a_valid_permutation(flash_models):
    from openelm_rt import export
    with export.read_oelm(flash_models["q8"][1]) as f:
        assert f.header["format_version"] == 2
        fl = f.metadata["flash_layout"]
        assert fl["version"] == 2 and fl["bundle_neurons"] == BUNDLE and "perm" not in fl
        assert fl["calibration"]["tokens"] > 100
        dims = f.metadata["model"]["ffn_dim"]
        perms = [f.tensor(f"blk.{i}.ffn_perm") for i in range(len(dims))]
        assert all(p.dtype == np.int32 for p in perms)
        assert [sorted(p.tolist()) for p in perms] == [list(range(F)) for F in dims]
        assert any((p != np.arange(len(p))).any() for p in perms)  # calibration reordered something
        names = f.names()
        assert "blk.0.ffn_bundles" in names and "blk.0.ffn_gate_up" not in names and "blk.0.ffn_down" not in names
        # The metadata stays small: the permutation is in tensors, not JSON numbers.
        assert f.header["metadata_size"] < 64 * 1024
    with export.read_oelm(flash_models["q8"][0]) as f:
        assert f.header["format_version"] == 1 and "flash_layout" not in f.metadata


@pytest.mark.parametrize("dtype", ["f32", "q8", "bf16"])
def test_flash_layout_computes_the_same_model(core, flash_models, dtype):
    plain, fl = flash_models[dtype]
    want, got = _logits(_runtime(core, plain)), _logits(_runtime(core, fl))
    if dtype == "f32":  # the same weights, permuted: only the float sums run in another order
        np.testing.assert_allclose(got, want, atol=2e-4 * max(1.0, float(np.abs(want).max())))
        return
    # Rounded weights: bf16 rounds each weight alike in both layouts (the sums differ, and bf16
    # activations round differently after); q8 also quantizes the down columns (and their
    # activations) in other 32-neuron blocks. Either way the flash file is as close to the f32
    # model as the ordinary file is.
    ref = _logits(_runtime(core, flash_models["f32"][0]))
    rms = lambda a: float(np.sqrt(np.mean((a - ref) ** 2)))  # noqa: E731
    assert rms(got) < 1.5 * rms(want) + 1e-6, (rms(got), rms(want))
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8  # random weights: near ties


@pytest.mark.parametrize("dtype", ["f32", "q8", "bf16"])
def test_exact_policy_on_flash_file_equals_resident(core, flash_models, dtype):
    path = flash_models[dtype][1]
    want = _logits(_runtime(core, path))
    for fraction in (0.3, 0.5, 0.8):
        rt = _runtime(core, path, memory_budget=_ffn_budget(core, path, fraction))
        plan = rt.memory_plan
        assert plan["streamed_bytes_per_step"] > 0 and plan["total"] <= plan["budget"], plan["text"]
        assert "neuron bundles stream" in plan["text"]
        # A tail of bundles per layer, partial layers included (neuron granularity).
        bundles = plan["streamed_bundles"]
        assert len(bundles) == 12 and any(0 < first < n for first, n in bundles), bundles
        np.testing.assert_array_equal(_logits(rt), want, err_msg=f"{dtype} at {fraction:.0%}")
        st = rt.stream_stats
        streamed_layers = sum(first < n for first, n in bundles)
        # One sequential request per streamed layer and step, exactly the tail's bytes (plus at
        # most the two reads the prefetch thread has made ahead for the next step).
        n = rt.steps * streamed_layers
        assert n <= st["requests"] <= n + 2
        assert rt.steps * plan["streamed_bytes_per_step"] <= st["bytes_read"] <= \
            rt.steps * plan["streamed_bytes_per_step"] + plan["io_bytes"]


@pytest.mark.parametrize("io,prefetch", [("direct", False), ("buffered", True), ("mmap", True)])
def test_flash_every_io_mode_is_exact(core, flash_models, io, prefetch):
    path = flash_models["q8"][1]
    want = _logits(_runtime(core, path))
    rt = _runtime(core, path, memory_budget=_ffn_budget(core, path, 0.4), stream_io=io, prefetch=prefetch)
    np.testing.assert_array_equal(_logits(rt), want)
    assert rt.stream_stats["layers_streamed"] > 0


def test_flash_plan_refuses_below_minimum(core, flash_models):
    path = flash_models["f32"][1]
    minimum = _runtime(core, path, memory_budget=1 << 40).memory_plan["minimum"]
    plan = _runtime(core, path, memory_budget=minimum).memory_plan
    assert plan["total"] <= minimum and plan["streamed_bytes_per_step"] > 0
    with pytest.raises(ValueError, match="below the minimum of .* MiB.*raise memory_budget"):
        _runtime(core, path, memory_budget=minimum - 1)


def test_flash_streams_fewer_bytes_than_whole_matrices(core, flash_models):
    """At the same budget the bundle-granular plan streams no more than the matrix-granular one
    on the ordinary file (it can keep part of a layer resident)."""
    plain, fl = flash_models["f32"]
    for fraction in (0.3, 0.5, 0.8):
        b = _ffn_budget(core, plain, fraction)
        p_plain = _runtime(core, plain, memory_budget=b).memory_plan
        p_flash = _runtime(core, fl, memory_budget=b).memory_plan
        # The bundle padding makes the flash FFN slightly larger, and its permutation tensors and
        # metadata take a little more of the budget: compare against that.
        size = lambda p: p["resident_fixed"] + p["other_bytes"] + p["resident_ffn"] + p["streamed_bytes_per_step"]  # noqa: E731
        pad = size(p_flash) - size(p_plain)
        assert p_flash["streamed_bytes_per_step"] <= p_plain["streamed_bytes_per_step"] + pad


# ------------------------------------------------------------------- validation of the section

def _rewrite(src, dst, edit_meta=None, header_version=None):
    """Copy of src with its metadata JSON edited (and the header fixed up)."""
    import zlib
    from openelm_rt import export
    data = bytearray(open(src, "rb").read())
    fields = list(export._HEADER.unpack(bytes(data[:64])))
    meta = json.loads(bytes(data[64:64 + fields[4]]))
    if edit_meta:
        edit_meta(meta)
    blob = json.dumps(meta, separators=(",", ":")).encode()
    assert 64 + len(blob) <= fields[5], "edited metadata must fit the reserved room"
    data[64:fields[5]] = blob + bytes(fields[5] - 64 - len(blob))
    fields[4], fields[8] = len(blob), zlib.crc32(blob)
    if header_version is not None:
        fields[1] = header_version
    data[:64] = export._HEADER.pack(*fields)
    open(dst, "wb").write(data)
    return dst


@pytest.mark.parametrize("edit,pattern", [
    (lambda m: m["flash_layout"].update(version=3), r"version 3 is newer.*upgrade openelm_rt"),
    (lambda m: m["flash_layout"].update(version=1), r"version 1 .*no longer read; re-export"),
    (lambda m: m["flash_layout"].update(version=0), r"\"version\" is 0"),
    (lambda m: m["flash_layout"].update(bundle_neurons=48), r"bundle_neurons.*multiple of 32"),
    (lambda m: m["flash_layout"].update(bundle_neurons=32), r"ffn_bundles' has shape"),
    (lambda m: m.__setitem__("flash_layout", []), r"must be an object"),
])
def test_reader_refuses_a_bad_flash_section(core, flash_models, tmp_path, edit, pattern):
    p = _rewrite(flash_models["q8"][1], tmp_path / "bad.oelm", edit)  # q8: bundle padding varies with the size
    with pytest.raises(ValueError, match=pattern) as e:
        core.Model(str(p), False)
    assert "flash_layout" in str(e.value) or "ffn_bundles" in str(e.value)


def _edit_perm(src, dst, layer, fn):
    """Copy of src with the permutation tensor of `layer` edited in place by fn(int32 array)."""
    from openelm_rt import export
    with export.read_oelm(src) as f:
        t = next(t for t in f.metadata["tensors"] if t["name"] == f"blk.{layer}.ffn_perm")
        begin = f.header["data_offset"] + t["offset"]
    data = bytearray(open(src, "rb").read())
    perm = np.frombuffer(bytes(data[begin:begin + t["size"]]), dtype="<i4").copy()
    fn(perm)
    data[begin:begin + t["size"]] = perm.astype("<i4").tobytes()
    open(dst, "wb").write(data)
    return dst


@pytest.mark.parametrize("edit,pattern", [
    (lambda p: p.__setitem__(5, p[6]), r"'blk.3.ffn_perm' lists neuron \d+ twice; it must be a permutation"),
    (lambda p: p.__setitem__(0, 10**6), r"'blk.3.ffn_perm': element 0 is 1000000, not a neuron index"),
    (lambda p: p.__setitem__(7, -1), r"'blk.3.ffn_perm': element 7 is -1"),
])
def test_reader_refuses_a_bad_permutation(core, flash_models, tmp_path, edit, pattern):
    p = _edit_perm(flash_models["f32"][1], tmp_path / "bad.oelm", 3, edit)
    with pytest.raises(ValueError, match=pattern + ".*re-export"):
        core.Model(str(p), False)


def test_reader_refuses_a_missing_permutation(core, flash_models, tmp_path):
    def drop(meta):
        meta["tensors"] = [t for t in meta["tensors"] if t["name"] != "blk.2.ffn_perm"]
    p = _rewrite(flash_models["f32"][1], tmp_path / "noperm.oelm", drop)
    with pytest.raises(ValueError, match="missing tensor 'blk.2.ffn_perm'"):
        core.Model(str(p), False)


def test_reader_refuses_flash_section_in_a_version_1_file(core, flash_models, tmp_path):
    p = _rewrite(flash_models["f32"][1], tmp_path / "v1.oelm", header_version=1)
    with pytest.raises(ValueError, match="format_version 1.*re-export"):
        core.Model(str(p), False)


def test_exporter_refuses_bad_options(flash_models, work_dir, tokenizer_path, tmp_path):
    from openelm_rt import export
    from openelm_rt.hf_config import ExportError
    ckpt = work_dir / "ckpt_flash"
    with pytest.raises(ExportError, match="multiple of 32"):
        export.export_checkpoint(ckpt, tmp_path / "x.oelm", tokenizer=tokenizer_path, flash_layout=True, bundle_neurons=40)
    with pytest.raises(ExportError, match="flash_calibration_ids must be"):
        export.export_checkpoint(ckpt, tmp_path / "x.oelm", tokenizer=tokenizer_path, flash_layout=True,
                                 flash_calibration_ids=[1, 99999])
    assert not (tmp_path / "x.oelm").exists() and not list(tmp_path.glob(".x.oelm*"))


def test_ffn_probe_counts_every_token(core, flash_models):
    rt = _runtime(core, flash_models["f32"][0])
    rt.ffn_probe_start()
    s = rt.seq_new()
    rt.eval([(s, prompt_ids(20), "last")])
    st = rt.ffn_probe_take()
    assert st["tokens"] == 20 and len(st["active"]) == 12
    for act, mag in zip(st["active"], st["magnitude"]):
        assert act.min() >= 0 and act.max() <= 20 and 0 < act.sum() < 20 * len(act) and (mag > 0).all()
    with pytest.raises(ValueError, match="ffn_probe_start"):
        rt.ffn_probe_take()
    with pytest.raises(ValueError, match="ordinary layout"):
        _runtime(core, flash_models["f32"][1]).ffn_probe_start()


def test_quantized_export_ranks_on_a_bf16_temporary(core, flash_models):
    """A block-quantized flash export ranks its neurons on a bf16 export of the checkpoint (no
    quantizer run for the ranking): its permutation is the bf16 file's order on the same tokens."""
    from openelm_rt import export, flash
    plain_bf16 = flash_models["bf16"][0]
    ids = flash.calibration_tokens(core.Model(str(plain_bf16), False), None, 300)
    want, _ = flash.neuron_order(plain_bf16, ids)
    with export.read_oelm(flash_models["q8"][1]) as f:
        for i, order in enumerate(want):
            np.testing.assert_array_equal(f.tensor(f"blk.{i}.ffn_perm"), order, err_msg=f"layer {i}")
