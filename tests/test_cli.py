"""The command-line tools, run as subprocesses: `openelm-rt generate`, `openelm-rt demo`
(tiny preset only) and `openelm-rt-export`, both as `python -m ...` and as console scripts
when installed. Checks output text against Session.generate, the speed line, and exit codes.
"""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import env_with_pythonpath

PROMPT = "Once upon a time"
SPEED = re.compile(r"tok(en)?s?\s*/\s*s", re.IGNORECASE)


def _launchers(module, script):
    out = [pytest.param([sys.executable, "-m", module], id="python-m")]
    exe = shutil.which(script)
    out.append(pytest.param([exe] if exe else None, id="console-script"))
    return out


def _run(cmd, *args, timeout=120):
    if cmd is None:
        pytest.skip("console script not on PATH (package not installed)")
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True,
                          env=env_with_pythonpath(), timeout=timeout)


RT = _launchers("openelm_rt.cli", "openelm-rt")
EXPORT = _launchers("openelm_rt.export", "openelm-rt-export")


@pytest.mark.parametrize("cmd", RT)
def test_generate_prints_text_and_speed(cmd, session_f32, tiny_f32):
    expected = session_f32.generate(PROMPT, max_new_tokens=8).text
    p = _run(cmd, "generate", "--model", tiny_f32.oelm, "--prompt", PROMPT,
             "--max-new-tokens", 8)
    assert p.returncode == 0, p.stderr
    assert expected.strip() and expected in p.stdout, (
        f"stdout {p.stdout!r} does not contain the generated text {expected!r}")
    assert SPEED.search(p.stderr), f"no speed line in stderr: {p.stderr!r}"


def test_generate_max_length_counts_prompt(session_f32, tiny_f32):
    n_prompt = len(session_f32.tokenize(PROMPT))
    expected = session_f32.generate(PROMPT, max_new_tokens=5)
    p = _run(RT[0].values[0], "generate", "--model", tiny_f32.oelm, "--prompt", PROMPT,
             "--max_length", n_prompt + 5)
    assert p.returncode == 0, p.stderr
    assert expected.text in p.stdout
    longer = session_f32.generate(PROMPT, max_new_tokens=6).text
    if longer != expected.text:
        assert longer not in p.stdout, "--max_length must include the prompt tokens"


def test_generate_kwargs_accepted(session_f32, tiny_f32):
    expected = session_f32.generate(PROMPT, max_new_tokens=10, repetition_penalty=1.2, top_k=5,
                                    temperature=0.7, seed=3).text
    p = _run(RT[0].values[0], "generate", "--model", tiny_f32.oelm, "--prompt", PROMPT,
             "--max-new-tokens", 10, "--threads", 2,
             "--generate_kwargs", "repetition_penalty=1.2", "top_k=5", "temperature=0.7",
             "seed=3")
    assert p.returncode == 0, p.stderr
    assert expected in p.stdout, f"stdout {p.stdout!r} vs Session text {expected!r}"


def test_generate_stream(session_f32, tiny_f32):
    expected = session_f32.generate(PROMPT, max_new_tokens=8).text
    p = _run(RT[0].values[0], "generate", "--model", tiny_f32.oelm, "--prompt", PROMPT,
             "--max-new-tokens", 8, "--stream")
    assert p.returncode == 0, p.stderr
    assert expected in p.stdout


def test_unknown_generate_kwarg_exits_2(tiny_f32, ort):
    p = _run(RT[0].values[0], "generate", "--model", tiny_f32.oelm, "--prompt", PROMPT,
             "--generate_kwargs", "frobnicate=3")
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "frobnicate" in p.stderr
    assert "Traceback" not in p.stderr


def test_bad_generate_kwarg_value_exits_nonzero(tiny_f32, ort):
    p = _run(RT[0].values[0], "generate", "--model", tiny_f32.oelm, "--prompt", PROMPT,
             "--generate_kwargs", "top_p=1.7")
    assert p.returncode != 0
    assert "top_p" in p.stderr and "Traceback" not in p.stderr


def test_missing_model_exits_2(tmp_path, ort):
    missing = tmp_path / "nope.oelm"
    p = _run(RT[0].values[0], "generate", "--model", missing, "--prompt", PROMPT)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert str(missing) in p.stderr
    assert "Traceback" not in p.stderr


def test_demo_tiny_end_to_end(tmp_path, ort):
    cache = tmp_path / "demo_cache"
    p = _run(RT[0].values[0], "demo", "--preset", "tiny", "--cache-dir", cache,
             "--max-new-tokens", 8, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search("random", p.stdout + p.stderr, re.IGNORECASE), "no random-weights notice"
    assert SPEED.search(p.stdout + p.stderr)
    assert any(cache.rglob("*.oelm")), "demo should leave its model in the cache dir"
    # a second run reuses the cache
    p2 = _run(RT[0].values[0], "demo", "--preset", "tiny", "--cache-dir", cache,
              "--max-new-tokens", 8, timeout=300)
    assert p2.returncode == 0, p2.stderr[-3000:]


@pytest.mark.parametrize("cmd", EXPORT)
def test_export_help(cmd):
    p = _run(cmd, "--help")
    assert p.returncode == 0, p.stderr
    assert "--dtype" in p.stdout and "--tokenizer" in p.stdout


def test_export_cli_matches_api(tmp_path, tiny_f32, tokenizer_path, tiny_f32_export, ort):
    out = tmp_path / "cli_bf16.oelm"
    p = _run(EXPORT[0].values[0], tiny_f32.ckpt_dir, "-o", out, "--dtype", "bf16",
             "--tokenizer", tokenizer_path)
    assert p.returncode == 0, p.stderr
    with ort.Session(str(out)) as a, ort.Session(str(tiny_f32_export["bf16"])) as b:
        ids = [1, 17, 300, 5]
        assert (a.logits(ids) == b.logits(ids)).all()


def test_export_cli_bad_source_exits_nonzero(tmp_path):
    p = _run(EXPORT[0].values[0], tmp_path / "no_ckpt", "-o", tmp_path / "x.oelm")
    assert p.returncode != 0
    assert "no_ckpt" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "x.oelm").exists()


def test_info_prints_stored_config_and_verifies(session_f32, tiny_f32, tmp_path):
    p = _run(RT[0].values[0], "info", tiny_f32.oelm, "--verify")
    assert p.returncode == 0, p.stderr
    c = session_f32.config
    assert str(c["n_head_q"]) in p.stdout and str(c["ffn_dim"]) in p.stdout, p.stdout
    assert "verified" in p.stdout
    # A flipped byte in a weight must make --verify fail with exit 2 and name the tensor.
    data = bytearray(tiny_f32.oelm.read_bytes())
    data[-100] ^= 0xFF  # the last tensor (output_norm) ends the file
    bad = tmp_path / "flipped.oelm"
    bad.write_bytes(bytes(data))
    p = _run(RT[0].values[0], "info", bad, "--verify")
    assert p.returncode == 2 and "checksum" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_info_and_generate_bf16_activations(tiny_bf16):
    """bf16 files: info says exact activations are the default and what --bf16-activations does
    on this CPU; generate takes the flag (greedy text as Session(exact=False) gives it)."""
    ort = pytest.importorskip("openelm_rt")
    p = _run(RT[0].values[0], "info", tiny_bf16.oelm)
    assert p.returncode == 0, p.stderr
    line = next(l for l in p.stdout.splitlines() if l.startswith("bf16 matmuls:"))
    assert "exact f32 activations (default)" in line and "--bf16-activations" in line, line
    with ort.Session(str(tiny_bf16.oelm), exact=False) as s:
        assert ("bf16 dot products" in line) == s._backend.rounds_activations("bf16"), line
        want = s.generate(PROMPT, max_new_tokens=8).text
    p = _run(RT[0].values[0], "generate", "--model", tiny_bf16.oelm, "--prompt", PROMPT, "--max-new-tokens", 8,
             "--bf16-activations")
    assert p.returncode == 0, p.stderr
    assert want.strip() and want in p.stdout, (p.stdout, want)


def test_versions_agree():
    """One version everywhere: the package, its native core, pyproject.toml and the C header
    (CMake refuses to configure when the header and CMakeLists.txt differ)."""
    import openelm_rt
    from openelm_rt import _core
    root = Path(__file__).resolve().parents[1]
    project = re.search(r'^version = "([^"]+)"', (root / "pyproject.toml").read_text(), re.M).group(1)
    header = (root / "csrc/include/openelm_rt/openelm_rt.h").read_text()
    macros = ".".join(re.search(rf"#define OELM_VERSION_{k} (\d+)", header).group(1)
                      for k in ("MAJOR", "MINOR", "PATCH"))
    assert openelm_rt.__version__ == _core.VERSION == project == macros, \
        (openelm_rt.__version__, _core.VERSION, project, macros)


def test_version_names_the_format_versions():
    import openelm_rt
    for cmd in (RT[0].values[0], EXPORT[0].values[0]):
        p = _run(cmd, "--version")
        assert p.returncode == 0, p.stderr
        # The runtime reads up to 2 (2: the flash layout); the exporter writes 1, or 2 with --flash-layout.
        assert openelm_rt.__version__ in p.stdout and re.search(r"format_version [12]\b", p.stdout), p.stdout
