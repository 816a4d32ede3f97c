"""Hugging Face-format OpenELM checkpoints: write one with random weights, open and validate one,
load one as float32.

Real checkpoints cannot be downloaded here, so tests and benchmarks build checkpoints with the
real tensor names, shapes, dtypes and file layout (single file or shards + index.json) of the
apple/OpenELM-* repos, filled with CoreNet-style random weights. This is not a model trainer
and not the exporter (export.py).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from .hf_config import ExportError, ModelSpec, parse_config, tensor_layout
from .safetensors_io import SafetensorsFile, bf16_to_f32, f32_to_bf16, write_safetensors_streaming

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# HF untied models also save this unused [V, D] matrix (OpenELMModel.classifier, OPENELM.md 3.1).
CLASSIFIER = "transformer.classifier.weight"

_ST_DTYPE = {"f32": "F32", "bf16": "BF16"}
_TORCH_DTYPE = {"f32": "float32", "bf16": "bfloat16"}


class ProgressBar:
    """One-line progress on stderr: bytes done / total, MB/s, ETA. Redraws at most 10 times a second."""

    def __init__(self, total: int, label: str, enabled: bool, stream=None):
        self.total, self.label, self.enabled = max(total, 1), label, enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = self._last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last >= 0.1 or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(self.done / self.total, 1.0)
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        bar = "#" * int(frac * 30)
        self.stream.write(f"\r{self.label} [{bar:<30}] {frac:4.0%} {self.done / 1e6:,.1f}/"
                          f"{self.total / 1e6:,.1f} MB {rate / 1e6:6.1f} MB/s "
                          f"ETA {int(eta) // 60}:{int(eta) % 60:02d} ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()


def _init_std(name: str, shape: tuple[int, ...], spec: ModelSpec) -> float | None:
    """CoreNet init (OPENELM.md 3.8); None for norm weights, which get 1 + 0.1*N(0,1)."""
    if name.endswith("norm.weight"):
        return None
    if name == "transformer.token_embeddings.weight":
        return spec.d_model ** -0.5
    if name.endswith(("attn.out_proj.weight", "ffn.proj_2.weight")):
        return spec.d_model ** -0.5 * (2 * spec.n_layer) ** -0.5
    return shape[1] ** -0.5  # any other linear: in_features^-0.5


def _split_shards(entries: list[tuple[str, str, tuple]], shards: int) -> list[list]:
    """Contiguous groups of the file-ordered entries with about equal bytes each."""
    sizes = [math.prod(s) for _, _, s in entries]
    total = sum(sizes)
    groups: list[list] = [[] for _ in range(shards)]
    done = 0
    for k, (entry, size) in enumerate(zip(entries, sizes)):
        g = min(int(done * shards / total), shards - 1) if total else 0
        # never leave later shards empty: the last len(entries)-k entries fill them if needed
        g = max(g, shards - (len(entries) - k))
        groups[g].append(entry)
        done += size
    return groups


def write_random_checkpoint(out_dir, config: dict, dtype: str = "f32", seed: int = 0,
                            shards: int = 1, progress: bool = False,
                            logit_scale: float = 1.0) -> Path:
    """Write config.json and random weights in HF OpenELM layout into out_dir; returns out_dir.

    dtype "f32" (like the base repos) or "bf16" (like -Instruct). shards > 1 writes
    model-0000k-of-0000n.safetensors files and model.safetensors.index.json, as HF does for 3B.
    Each tensor is drawn from its own stream (seed, tensor index), so values do not depend on
    sharding, and a bf16 checkpoint holds the bf16 rounding of the f32 one with the same seed.
    Norm weights are 1 + 0.1*N(0,1), not CoreNet's ones, so a skipped norm changes the output.

    logit_scale multiplies the final norm weight (transformer.norm.weight) and so every logit,
    and nothing else. With the default 1.0 the logits have a standard deviation of about 1
    over the vocabulary: next-token distributions are nearly uniform, unlike a trained
    model's. Quality comparisons (KL divergence, top-1 agreement) need peaked ones, so the
    benchmarks pass a larger value.
    """
    if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"logit_scale must be a positive finite number, got {logit_scale!r}")
    if dtype not in _ST_DTYPE:
        raise ValueError(f"dtype must be 'f32' or 'bf16', got {dtype!r}")
    cfg = json.loads(json.dumps(config))  # deep copy that also proves it is JSON
    cfg["torch_dtype"] = _TORCH_DTYPE[dtype]
    spec = parse_config(cfg)
    shapes = {t.hf_name: t.shape for t in tensor_layout(spec)}
    if not cfg["share_input_output_layers"]:
        shapes[CLASSIFIER] = (spec.vocab_size, spec.d_model)
        shapes.setdefault("lm_head.weight", (spec.vocab_size, spec.d_model))
    index_of = {name: i for i, name in enumerate(shapes)}
    st_dtype = _ST_DTYPE[dtype]
    entries = sorted((name, st_dtype, shape) for name, shape in shapes.items())
    if not 1 <= shards <= len(entries):
        raise ValueError(f"shards must be between 1 and {len(entries)}, got {shards}")

    def make(name: str) -> np.ndarray:
        rng = np.random.default_rng([seed, index_of[name]])
        shape = shapes[name]
        w = rng.standard_normal(shape, dtype=np.float32)
        std = _init_std(name, shape, spec)
        if std is None:
            w *= np.float32(0.1)
            w += np.float32(1.0)
            if name == "transformer.norm.weight" and logit_scale != 1.0:
                w *= np.float32(logit_scale)
        else:
            w *= np.float32(std)
        return f32_to_bf16(w) if dtype == "bf16" else w

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / SINGLE_FILE, out / INDEX_FILE, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)  # a re-run with other sharding must not leave a mix
    with open(out / "config.json", "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")

    itemsize = 4 if dtype == "f32" else 2
    total = sum(math.prod(s) for s in shapes.values()) * itemsize
    bar = ProgressBar(total, f"writing {out.name}", progress)
    try:
        if shards == 1:
            write_safetensors_streaming(out / SINGLE_FILE, entries, make, on_written=bar.update)
        else:
            weight_map = {}
            for k, group in enumerate(_split_shards(entries, shards), start=1):
                fname = f"model-{k:05d}-of-{shards:05d}.safetensors"
                write_safetensors_streaming(out / fname, group, make, on_written=bar.update)
                weight_map.update({name: fname for name, _, _ in group})
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            with open(out / INDEX_FILE, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")
    finally:
        bar.close()
    return out


class HFCheckpoint:
    """The safetensors files of a checkpoint dir, validated; .where maps tensor name -> its file.

    model.safetensors if present (HF from_pretrained tries it first), else the shards listed in
    model.safetensors.index.json, which must exist and agree with the index both ways.
    """

    def __init__(self, src):
        src = Path(src)
        self.files: list[SafetensorsFile] = []
        self.where: dict[str, SafetensorsFile] = {}
        try:
            if (src / SINGLE_FILE).is_file():
                st = self._open(src / SINGLE_FILE)
                self.where = {name: st for name in st.keys()}
            elif (src / INDEX_FILE).is_file():
                self._open_sharded(src)
            else:
                present = sorted(p.name for p in src.iterdir())[:20]
                hint = (" It has PyTorch .bin weights: load them with transformers and re-save "
                        "with save_pretrained(safe_serialization=True)."
                        if any(n.endswith(".bin") for n in present) else "")
                raise ExportError(f"{src} contains neither {SINGLE_FILE} nor {INDEX_FILE} "
                                  f"(found: {', '.join(present) or 'nothing'}).{hint}")
        except BaseException:
            self.close()
            raise

    def _open(self, path: Path) -> SafetensorsFile:
        st = SafetensorsFile(path)
        self.files.append(st)
        return st

    def _open_sharded(self, src: Path) -> None:
        index_path = src / INDEX_FILE
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ExportError(f"cannot read {index_path}: {e}") from e
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise ExportError(f"{index_path} has no valid \"weight_map\" (an object mapping "
                              f"tensor names to shard file names); re-download the index")
        shards: dict[str, SafetensorsFile] = {}
        for fname in sorted(set(weight_map.values())):
            path = src / fname
            if not path.is_file():
                raise ExportError(f"{index_path} lists shard {fname}, but {path} does not "
                                  f"exist; download every shard of the checkpoint")
            shards[fname] = self._open(path)
        for name, fname in weight_map.items():
            if name not in shards[fname]:
                raise ExportError(f"{index_path} maps tensor {name} to {fname}, but that file "
                                  f"does not contain it; the index and shards do not match")
            self.where[name] = shards[fname]
        for fname, st in shards.items():
            for name in st.keys():
                if weight_map.get(name) != fname:
                    raise ExportError(f"shard {fname} contains tensor {name}, which {INDEX_FILE} "
                                      f"does not assign to it; the index and shards do not match")

    def close(self) -> None:
        for st in self.files:
            st.close()

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_hf_checkpoint(ckpt_dir) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict, {HF name: float32 array}) for a checkpoint dir; BF16/F16 upcast exactly."""
    d = Path(ckpt_dir)
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    tensors: dict[str, np.ndarray] = {}
    with HFCheckpoint(d) as ckpt:
        for name, st in ckpt.where.items():
            a = st.get(name)
            if st.dtype(name) == "BF16":
                a = bf16_to_f32(a)
            tensors[name] = np.array(a, dtype=np.float32)  # copy: detach from the mapping
    return cfg, tensors

