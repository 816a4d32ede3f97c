"""The llama.cpp side of bench_llama.py and bench_serve.py, seen from our Python: the
llama-cpp-python venv, the worker process (llama_worker.py), the GGUF files made from the same
weights, and llama.cpp's `llama-server` binary built from the sources vendored in the same
llama-cpp-python sdist (ensure_llama_server; `python benchmarks/llama_side.py build-server`).

llama-cpp-python runs in its own venv (default ~/.cache/openelm_rt/llama-venv), created
here when missing: pip compiles llama.cpp from the sdist for the host CPU, which takes
about 10 minutes once (pip's wheel cache makes a re-creation quick).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
VENV_PACKAGES = [LLAMA_CPP_PYTHON, "gguf==0.19.0", "numpy", "sentencepiece"]
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama_worker.py")
# our .oelm dtype -> the llama.cpp file type it is compared with (same bits per weight)
LLAMA_TYPE = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8": "Q8_0", "q4": "Q4_0", "q4k": "Q4_K_M"}


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def venv_python(venv: str) -> str:
    return os.path.join(venv, "bin", "python")


def _venv_ready(venv: str) -> bool:
    py = venv_python(venv)
    if not os.path.exists(py):
        return False
    check = ("import llama_cpp, gguf, numpy, sentencepiece; "
             f"assert llama_cpp.__version__ == {LLAMA_CPP_PYTHON.split('==')[1]!r}")
    return subprocess.run([py, "-c", check], capture_output=True).returncode == 0


NO_AMX_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON "
                     "-DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON "
                     "-DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " amx_int8" in f.read()
    except OSError:
        return False


def ensure_venv(venv: str) -> str:
    """Path of the venv's python, creating the venv (python -m venv + pip install) if needed."""
    venv = os.path.abspath(venv)
    if _venv_ready(venv):
        return venv_python(venv)
    if os.path.exists(venv):
        _log(f"{venv} exists but lacks {LLAMA_CPP_PYTHON}; re-creating it")
        shutil.rmtree(venv)
    _log(f"creating {venv} with {' '.join(VENV_PACKAGES)}: pip compiles llama.cpp for this CPU, "
         f"which takes about 10 minutes the first time ...")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    env = dict(os.environ)
    if _cpu_has_amx() and "CMAKE_ARGS" not in env:
        # ggml's AMX path (on with GGML_NATIVE where the CPU has AMX) segfaulted in the first
        # Q8_0/Q4_0 llama_decode on the development VM (2026-12-02): build for the same vector
        # extensions without AMX. Our kernels do not use AMX either.
        env["CMAKE_ARGS"] = NO_AMX_CMAKE_ARGS
        _log(f"this CPU has AMX: building llama.cpp with CMAKE_ARGS={env['CMAKE_ARGS']}")
    subprocess.run([venv_python(venv), "-m", "pip", "install", *VENV_PACKAGES], check=True, env=env)
    if not _venv_ready(venv):
        raise RuntimeError(f"{venv} was created but cannot import llama_cpp/gguf; see pip's output")
    return venv_python(venv)


class LlamaWorker:
    """llama_worker.py in a subprocess; call(cmd, **args) -> reply dict (raises on error)."""

    def __init__(self, python: str):
        self.proc = subprocess.Popen([python, WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)

    def call(self, cmd: str, **args) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"llama worker exited (code {self.proc.wait()}) during {cmd!r}")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise RuntimeError(f"llama worker, {cmd!r}: {reply['error']}\n{reply.get('trace', '')}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def gguf_path(f32_oelm: str, ftype: str) -> str:
    """Cache path of the GGUF of the same weights, next to our f32 .oelm (same name key)."""
    stem = os.path.splitext(f32_oelm)[0]
    head, sep, tail = stem.rpartition("-f32-")
    return f"{head}-gguf-{ftype}-{tail}.gguf" if sep else f"{stem}-gguf-{ftype}.gguf"


def ensure_ggufs(worker: LlamaWorker, ckpt_dir: str, tokenizer: str, f32_oelm: str, ftypes,
                 threads: int) -> dict:
    """{ftype: path}: the F32 GGUF written by our converter from the HF checkpoint, and the
    others made from it by llama.cpp's own quantizer (llama_model_quantize, default
    parameters: what llama-quantize gives its users)."""
    paths = {"F32": gguf_path(f32_oelm, "F32")}
    if not os.path.exists(paths["F32"]):
        _log(f"converting {ckpt_dir} to {paths['F32']} ...")
        worker.call("convert", ckpt=ckpt_dir, tokenizer=tokenizer, out=paths["F32"])
    for ft in ftypes:
        if ft == "F32":
            continue
        paths[ft] = gguf_path(f32_oelm, ft)
        if not os.path.exists(paths[ft]):
            _log(f"llama.cpp quantizing to {ft}: {paths[ft]} ...")
            worker.call("quantize", src=paths["F32"], dst=paths[ft], ftype=ft, threads=threads)
    return paths


# llama-server, built once from llama.cpp as vendored in the llama-cpp-python sdist (the same
# llama.cpp version as the venv's), for the CPU vector extensions of this VM without AMX
# (see ensure_venv), with the HTTP server and nothing else. Built by `ensure_llama_server`;
# never in CI.
LLAMA_SERVER_CMAKE_ARGS = NO_AMX_CMAKE_ARGS.split() + [
    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON"]


def _sdist_dir(cache: str) -> str:
    """The unpacked llama-cpp-python sdist under cache/sdist, downloaded by pip if missing."""
    import glob
    import tarfile

    version = LLAMA_CPP_PYTHON.split("==")[1]
    sdist = os.path.join(cache, "sdist")
    unpacked = os.path.join(sdist, f"llama_cpp_python-{version}")
    if os.path.isdir(os.path.join(unpacked, "vendor", "llama.cpp", "tools", "server")):
        return unpacked
    tars = glob.glob(os.path.join(sdist, f"llama_cpp_python-{version}.tar.gz"))
    if not tars:
        _log(f"downloading the {LLAMA_CPP_PYTHON} sdist into {sdist} ...")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        LLAMA_CPP_PYTHON, "-d", sdist], check=True)
        tars = glob.glob(os.path.join(sdist, f"llama_cpp_python-{version}.tar.gz"))
        if not tars:
            raise RuntimeError(f"pip download left no llama_cpp_python-{version}.tar.gz in {sdist}")
    with tarfile.open(tars[0]) as t:
        t.extractall(sdist, filter="data")
    if not os.path.isdir(os.path.join(unpacked, "vendor", "llama.cpp", "tools", "server")):
        raise RuntimeError(f"{tars[0]} has no vendor/llama.cpp/tools/server")
    return unpacked


def ensure_llama_server(path: str = "auto", cache_dir: str | None = None, jobs: int = 2) -> str:
    """Path of a llama-server binary. `path`: an existing binary, or "auto": the one built in
    <cache>/llama-server-<version>/bin, building it when missing (CMake + the llama-server target
    only, `jobs` parallel compiles; about 15 minutes at -j2 on the 2-core development VM)."""
    if path != "auto":
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"--llama-server {path!r} is not an executable file; give the path "
                                    f"of llama.cpp's llama-server binary, or 'auto' to build one")
        return os.path.abspath(path)
    from openelm_rt.demo import default_cache_dir

    cache = os.path.abspath(cache_dir or default_cache_dir())
    version = LLAMA_CPP_PYTHON.split("==")[1]
    build = os.path.join(cache, f"llama-server-{version}")
    binary = os.path.join(build, "bin", "llama-server")
    if os.access(binary, os.X_OK):
        return binary
    src = os.path.join(_sdist_dir(cache), "vendor", "llama.cpp")
    _log(f"building llama-server from {src} into {build} (-j{jobs}; takes minutes) ...")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", src, "-B", build, *gen, *LLAMA_SERVER_CMAKE_ARGS], check=True)
    subprocess.run(["cmake", "--build", build, "--target", "llama-server", "-j", str(jobs)], check=True)
    if not os.access(binary, os.X_OK):
        raise RuntimeError(f"the llama-server build finished but {binary} is missing")
    return binary


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Build llama.cpp's llama-server for bench_serve.py.")
    ap.add_argument("what", choices=["build-server"])
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("-j", "--jobs", type=int, default=2)
    a = ap.parse_args()
    print(ensure_llama_server("auto", a.cache_dir, a.jobs))
