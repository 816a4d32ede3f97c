"""A Hugging Face checkpoint directory as a model (openelm_rt.autoexport): exported once into the
cache, keyed by content, tokenizer and weight type; Session(DIR) loads the cached file."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import core_or_skip


@pytest.fixture()
def ckpt(tiny_f32, tmp_path, monkeypatch):
    d = tmp_path / "OpenELM-tiny"
    shutil.copytree(tiny_f32.ckpt_dir, d)
    monkeypatch.setenv("OPENELM_RT_CACHE", str(tmp_path / "cache"))
    return d


def test_session_of_a_directory_exports_once(ort, tiny_f32, tokenizer_path, ckpt, tmp_path):
    from openelm_rt.autoexport import resolve_model
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        ort.Session(str(ckpt))
    shutil.copy(tokenizer_path, ckpt / "tokenizer.model")
    with ort.Session(str(ckpt), threads=1) as s, ort.Session(str(tiny_f32.oelm), threads=1) as ref:
        made = sorted((tmp_path / "cache").glob("*.oelm"))
        assert [s.path] == [str(p) for p in made]
        ids = [1] + list(range(5, 40))
        assert np.array_equal(s.logits(ids), ref.logits(ids))  # the same export as the fixture's
    mtime = made[0].stat().st_mtime_ns
    assert resolve_model(ckpt) == str(made[0]) and made[0].stat().st_mtime_ns == mtime  # not exported again
    # Other weight types, and changed weights, get their own files.
    assert "-bf16-" in resolve_model(ckpt, dtype="bf16")
    with open(next(ckpt.glob("*.safetensors")), "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    changed = resolve_model(ckpt)
    assert changed != str(made[0]) and len(list((tmp_path / "cache").glob("*.oelm"))) == 3


def test_tokenizer_argument(ort, tokenizer_path, ckpt):
    from openelm_rt.autoexport import resolve_model
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        resolve_model(ckpt, tokenizer="meta-llama/Llama-2-7b-hf")  # a hub id, and no tokenizer.model beside it
    a = resolve_model(ckpt, tokenizer=tokenizer_path)
    tok_dir = ckpt.parent / "llama-tokenizer"
    tok_dir.mkdir()
    shutil.copy(tokenizer_path, tok_dir / "tokenizer.model")
    assert resolve_model(ckpt, tokenizer=tok_dir) == a  # a directory holding tokenizer.model
    shutil.copy(tokenizer_path, ckpt / "tokenizer.model")
    assert resolve_model(ckpt, tokenizer="meta-llama/Llama-2-7b-hf") == a  # the card's id: the file beside it
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_model(ckpt, dtype="int3")
    with pytest.raises(FileNotFoundError, match="without config.json"):
        resolve_model(ckpt.parent / "cache")


def test_cli_info_of_a_directory(tokenizer_path, ckpt, capsys):
    core_or_skip()
    from openelm_rt.cli import main
    shutil.copy(tokenizer_path, ckpt / "tokenizer.model")
    assert main(["info", str(ckpt)]) == 0
    assert "layers:" in capsys.readouterr().out
