"""The matrix shapes tests/cpp/kernel_check.cpp checks every kernel variant on must be the
OpenELM models' real shapes: the checked-in list is regenerated from hf_config.py and compared."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_openelm_shapes_inc_is_current():
    script = ROOT / "tests" / "cpp" / "gen_openelm_shapes.py"
    r = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_openelm_shapes_cover_every_size_and_matrix():
    text = (ROOT / "tests" / "cpp" / "openelm_shapes.inc").read_text()
    for size in ("270M", "450M", "1_1B", "3B"):
        rows = [line for line in text.splitlines() if line.startswith(f'{{"{size}"')]
        for matrix in ("attn_qkv", "attn_output", "ffn_gate_up", "ffn_down", "token_embd/output"):
            assert any(matrix in line for line in rows), (size, matrix)
    assert '{"3B", 32000, 3072, "token_embd/output"},' in text
