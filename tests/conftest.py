"""Session-scoped fixtures: a SentencePiece tokenizer trained on the shipped corpus, tiny random
HF checkpoints (f32, f32 in 3 shards, bf16, untied) with randomized norms, their .oelm exports
and the oracle's view of their weights; plus prompt and subprocess helpers.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import oracle  # noqa: E402

REAL_LLAMA_TOKENIZER = REPO_ROOT.parent / "shared" / "tokenizers" / "llama2" / "tokenizer.model"

# Prompt lengths used by the forward tests (tiny model, max_context 256).
PROMPT_LENGTHS = (1, 2, 7, 33, 100)


def prompt_ids(n: int, vocab_size: int = 1024, seed: int = 0, bos: bool = True) -> list[int]:
    """A deterministic test prompt of n token ids (BOS first when bos=True)."""
    rng = np.random.default_rng(1000 + 7 * n + seed)
    ids = rng.integers(3, vocab_size, size=n).tolist()
    if bos:
        ids[0] = 1
    return [int(t) for t in ids]


TEXT_PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "  leading and  double  spaces ",
    "Ünïcödé — naïve café, 東京 🙂",
]


def env_with_pythonpath() -> dict:
    """Environment for subprocesses: they import the same openelm_rt as this process
    (the installed package in CI, python/ of the tree with PYTHONPATH=python in a dev run)."""
    import openelm_rt
    env = dict(os.environ)
    pkg_parent = str(Path(openelm_rt.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(
        [pkg_parent] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_cli(*args, timeout: float = 120):
    """`python -m openelm_rt.cli ARGS` (each converted with str) with this process's openelm_rt;
    the CompletedProcess, text captured."""
    import subprocess
    return subprocess.run([sys.executable, "-m", "openelm_rt.cli", *map(str, args)], capture_output=True,
                          text=True, env=env_with_pythonpath(), timeout=timeout)


def _import_or_skip(name: str):
    """Import a package module; in a dev tree where it is not built yet, skip. Under CI
    (CI set) a missing module is a failure, so a broken build cannot pass as all-skipped."""
    try:
        return __import__(name, fromlist=["_"])
    except ImportError as e:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not importable: {e}")
        pytest.skip(f"{name} not importable yet: {e}")


def core_or_skip():
    """The compiled core; the end-to-end tests skip (not fail) until it is built."""
    _import_or_skip("openelm_rt._core")
    import openelm_rt
    return openelm_rt


@dataclass
class Model:
    """A tiny checkpoint, its export, and what the oracle needs to run it."""
    name: str
    ckpt_dir: Path
    oelm: Path
    cfg: dict              # HF config.json
    weights: dict          # HF name -> float32, as stored in the checkpoint (upcast)


def _randomize_norms(ckpt_dir: Path, cfg: dict, seed: int) -> None:
    """Norm weights are 1 at init; make them differ so that swapped or ignored norm
    weights (q_norm vs k_norm, attn_norm vs ffn_norm, 1 + w) change the logits."""
    rng = np.random.default_rng(seed)
    names = ["transformer.norm.weight"]
    for i in range(int(cfg["num_transformer_layers"])):
        p = f"transformer.layers.{i}."
        names += [p + "attn_norm.weight", p + "ffn_norm.weight"]
        if cfg.get("normalize_qk_projections", True):
            names += [p + "attn.q_norm.weight", p + "attn.k_norm.weight"]
    for n in names:
        oracle.patch_safetensors_tensor(
            ckpt_dir, n, lambda a: rng.uniform(0.5, 1.5, size=a.shape).astype(np.float32))


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("oelm")


@pytest.fixture(scope="session")
def tokenizer_path(work_dir) -> Path:
    tt = _import_or_skip("openelm_rt.tokenizer_train")
    return Path(tt.train_sentencepiece(work_dir / "tok1024.model", 1024))


@pytest.fixture(scope="session")
def sp(tokenizer_path):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(tokenizer_path))


def build_model(work_dir: Path, tokenizer_path: Path, name: str, *, dtype="f32", shards=1,
           seed=0, export_dtype="auto", config_overrides=None, patch=None,
           with_tokenizer=True) -> Model:
    hf_config = _import_or_skip("openelm_rt.hf_config")
    checkpoint = _import_or_skip("openelm_rt.checkpoint")
    export = _import_or_skip("openelm_rt.export")
    cfg = hf_config.make_config("tiny", **(config_overrides or {}))
    ckpt = Path(checkpoint.write_random_checkpoint(work_dir / f"ckpt_{name}", cfg, dtype=dtype,
                                                   seed=seed, shards=shards))
    _randomize_norms(ckpt, cfg, seed + 100)
    if patch is not None:
        patch(ckpt, cfg)
    out = Path(export.export_checkpoint(ckpt, work_dir / f"{name}.oelm", dtype=export_dtype,
                                        tokenizer=tokenizer_path if with_tokenizer else None,
                                        with_tokenizer=with_tokenizer))
    cfg_read, weights = oracle.read_checkpoint(ckpt)
    return Model(name, ckpt, out, cfg_read, weights)


@pytest.fixture(scope="session")
def tiny_f32(work_dir, tokenizer_path) -> Model:
    return build_model(work_dir, tokenizer_path, "f32", seed=0)


@pytest.fixture(scope="session")
def tiny_sharded(work_dir, tokenizer_path) -> Model:
    return build_model(work_dir, tokenizer_path, "sharded", shards=3, seed=1)


@pytest.fixture(scope="session")
def tiny_bf16(work_dir, tokenizer_path) -> Model:
    return build_model(work_dir, tokenizer_path, "bf16", dtype="bf16", seed=2)


@pytest.fixture(scope="session")
def tiny_untied(work_dir, tokenizer_path) -> Model:
    return build_model(work_dir, tokenizer_path, "untied", seed=3,
                  config_overrides={"share_input_output_layers": False})


@pytest.fixture(scope="session")
def tiny_noqk(work_dir, tokenizer_path) -> Model:
    """normalize_qk_projections=false, its own RMSNorm eps (rms_norm_eps), and no tokenizer:
    the configuration of the SmolLM2 stand-in (benchmarks/standin.py) in the tiny shape."""
    return build_model(work_dir, tokenizer_path, "noqk", seed=4, with_tokenizer=False,
                       config_overrides={"normalize_qk_projections": False, "rms_norm_eps": 1e-5})


@pytest.fixture(scope="session")
def tiny_models(tiny_f32, tiny_sharded, tiny_bf16, tiny_untied) -> dict:
    return {m.name: m for m in (tiny_f32, tiny_sharded, tiny_bf16, tiny_untied)}


@pytest.fixture(scope="session")
def tiny_f32_export(work_dir, tokenizer_path, tiny_f32):
    """f16 / bf16 exports of the f32 checkpoint: {dtype: .oelm path}."""
    export = _import_or_skip("openelm_rt.export")
    return {dt: Path(export.export_checkpoint(tiny_f32.ckpt_dir, work_dir / f"f32_as_{dt}.oelm",
                                              dtype=dt, tokenizer=tokenizer_path))
            for dt in ("f16", "bf16")}


@pytest.fixture(scope="session")
def tiny_f32_all_dtypes(work_dir, tokenizer_path, tiny_f32, tiny_f32_export):
    """The f32 checkpoint in every weight type: {dtype: .oelm path} (f32, f16, bf16, q8, q4)."""
    export = _import_or_skip("openelm_rt.export")
    out = {"f32": tiny_f32.oelm, **tiny_f32_export}
    for dt in ("q8", "q4"):
        out[dt] = export.export_checkpoint(tiny_f32.ckpt_dir, work_dir / f"batch_{dt}.oelm", dtype=dt,
                                           tokenizer=tokenizer_path)
    return out


@pytest.fixture(scope="session")
def oracle_weights(tiny_f32):
    """The f32 checkpoint as the package's own loader reads it (cross-checked in
    test_forward against the independent safetensors reader in oracle.py)."""
    checkpoint = _import_or_skip("openelm_rt.checkpoint")
    return checkpoint.load_hf_checkpoint(tiny_f32.ckpt_dir)


@pytest.fixture(scope="session")
def session_f32(tiny_f32):
    ort = core_or_skip()
    s = ort.Session(str(tiny_f32.oelm))
    yield s
    s.close()


@pytest.fixture(scope="session")
def real_llama_tokenizer() -> Path:
    if not REAL_LLAMA_TOKENIZER.is_file():
        pytest.skip(f"LLaMA-2 tokenizer not present at {REAL_LLAMA_TOKENIZER}")
    return REAL_LLAMA_TOKENIZER


@pytest.fixture(scope="session")
def ort():
    return core_or_skip()


def favour_token_patch(token: int, factor: float):
    """A build_model patch scaling the token's embedding row (tied to the LM head) by factor:
    a model that produces that token (EOS, say) after a few steps of greedy decoding."""
    def patch(ckpt, cfg):
        import oracle

        def scale(a):
            a = a.copy()
            a[token] *= factor
            return a
        oracle.patch_safetensors_tensor(ckpt, "transformer.token_embeddings.weight", scale)
    return patch


def poison_token_embedding(src, dst, token: int, value: float = float("nan")) -> Path:
    """Copy the .oelm file src to dst with row `token` of an f32 token_embd set to `value`
    (NaN / inf): the tensor data of a corrupt file, which loads (tensor CRCs are checked only
    with verify) and makes non-finite activations for prompts holding that token."""
    import json
    import struct
    raw = bytearray(Path(src).read_bytes())
    _, _, _, meta_off, meta_size, data_off = struct.unpack_from("<8sIIQQQ", raw, 0)
    meta = json.loads(raw[meta_off: meta_off + meta_size].decode("utf-8"))
    t = next(t for t in meta["tensors"] if t["name"] == "token_embd")
    assert t["dtype"] == "f32", f"token_embd is {t['dtype']}; export it with embedding_dtype='f32'"
    d = t["shape"][-1]
    at = data_off + t["offset"] + 4 * d * token
    raw[at: at + 4 * d] = np.full(d, value, dtype="<f4").tobytes()
    Path(dst).write_bytes(bytes(raw))
    return Path(dst)
