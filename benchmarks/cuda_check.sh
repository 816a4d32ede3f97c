#!/usr/bin/env bash
# The CUDA backend's one prepared check, for a GPU machine with nothing else: builds the
# project with CUDA, runs the CUDA tests (every kernel against the CPU scalar reference, the
# whole model against the CPU backend: tests/cpp/cuda_check.cpp and tests/test_cuda.py), runs
# compute-sanitizer memcheck on a short test, and prints the benchmark table
# (benchmarks/bench_cuda.py). Logs go under $OUT (default build/cuda_check_out); the summary,
# one line per stage with its status and seconds, is $OUT/summary.txt. Sized for 8 minutes on
# an H200 with 16 cores; every stage has its own time limit.
#
#   OUT=/some/dir bash benchmarks/cuda_check.sh          # on the GPU machine, repository root
#   bash benchmarks/cuda_check.sh --prepare              # beforehand, on a machine with network
#
# Offline: the Python tests and the benchmark need the package's Python dependencies
# (numpy, sentencepiece) and pybind11 to build the module. Where the GPU machine lacks
# sentencepiece or pybind11 (the bare image has numpy, PyTorch, pytest, CMake, ninja, CUDA),
# --prepare downloads their wheels into build/cuda_wheels (for CPython 3.9-3.13); carry that
# path to the GPU machine and this script installs them from it, without network, into a
# virtual environment (build/cuda_venv, with the system's packages visible). Without them
# the C++ stages still run (cuda_check on the kernels; the model files need the exporter).
set -uo pipefail
cd "$(dirname "$0")/.."
wheels=build/cuda_wheels

if [[ "${1:-}" == "--prepare" ]]; then
  mkdir -p "$wheels"
  for v in 3.9 3.10 3.11 3.12 3.13; do
    python3 -m pip download --quiet --only-binary=:all: --python-version "$v" --platform manylinux2014_x86_64 \
      --platform manylinux_2_17_x86_64 -d "$wheels" "sentencepiece>=0.2.0" || echo "no sentencepiece wheel for $v"
  done
  python3 -m pip download --quiet --only-binary=:all: -d "$wheels" "pybind11>=2.12"
  ls -la "$wheels"
  exit 0
fi

OUT="${OUT:-build/cuda_check_out}"
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: >"$summary"
jobs="$(nproc)"
t_start=$(date +%s)
failed=0

# stage NAME LIMIT_S CMD...: runs CMD with its output in $OUT/NAME.log, records status and time.
stage() {
  local name="$1" limit="$2"
  shift 2
  local t0 rc
  t0=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  local line
  line=$(printf '%-22s rc=%-3s %4ss  (log: %s)' "$name" "$rc" "$(($(date +%s) - t0))" "$OUT/$name.log")
  echo "$line" | tee -a "$summary"
  if [[ $rc -ne 0 ]]; then
    failed=1
    tail -n 25 "$OUT/$name.log" | sed 's/^/    /'
  fi
  return $rc
}

{
  echo "cuda_check.sh at $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
  nvcc --version | tail -n 1
  python3 --version
} | tee -a "$summary"

# --- Python environment: the system's, plus sentencepiece / pybind11 from carried wheels.
py=python3
if ! python3 -c "import sentencepiece, pybind11" >/dev/null 2>&1; then
  if [[ -d "$wheels" ]]; then
    stage venv 120 bash -c "python3 -m venv --system-site-packages build/cuda_venv &&
      build/cuda_venv/bin/python -m pip install --no-index --find-links $wheels sentencepiece pybind11"
    [[ -x build/cuda_venv/bin/python ]] && py=build/cuda_venv/bin/python
  else
    echo "sentencepiece or pybind11 missing and no $wheels: Python stages will be skipped" | tee -a "$summary"
  fi
fi
have_py=0
$py -c "import numpy, sentencepiece, pybind11" >/dev/null 2>&1 && have_py=1

# --- Build: the C library, its tests, cuda_check, and (with pybind11) the Python module in place.
cfg=(-S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DOPENELM_RT_CUDA=ON)  # sm_90 + compute_80 PTX
if [[ $have_py == 1 ]]; then
  cfg+=(-DOPENELM_RT_DEV=ON "-Dpybind11_DIR=$($py -m pybind11 --cmakedir)" "-DPython_EXECUTABLE=$(command -v $py)")
else
  cfg+=(-DOPENELM_RT_PYTHON=OFF -DOPENELM_RT_C_LIBRARY=ON)
fi
stage configure 120 cmake "${cfg[@]}" &&
  stage build 300 cmake --build build/gpu -j "$jobs" --target all cuda_check kernel_check
built=$?

models=build/cuda_models
if [[ $built -eq 0 ]]; then
  # --- The tiny test models (f32, f16, bf16, q8, q4), then the whole CUDA check on them.
  if [[ $have_py == 1 ]]; then
    stage tiny_models 120 env PYTHONPATH=python $py benchmarks/bench_cuda.py --make-tiny "$models"
  fi
  stage cuda_check 240 build/gpu/cuda_check $(ls "$models"/random-tiny-*.oelm 2>/dev/null)
  grep -E "^device:|passed|^model " "$OUT/cuda_check.log" | sed 's/^/    /' | tee -a "$summary"
  # --- compute-sanitizer memcheck: the kernels on odd sizes and one model.
  if command -v compute-sanitizer >/dev/null 2>&1; then
    stage memcheck 240 compute-sanitizer --tool memcheck --leak-check full --error-exitcode 9 \
      build/gpu/cuda_check --quick $(ls "$models"/random-tiny-q8.oelm 2>/dev/null)
    grep -E "ERROR SUMMARY|passed" "$OUT/memcheck.log" | sed 's/^/    /' | tee -a "$summary"
  else
    echo "compute-sanitizer not on PATH (it is in the CUDA toolkit's bin/)" | tee -a "$summary"
    failed=1
  fi
  # --- The Python side on the GPU, and the CPU kernels' own check as a control.
  if [[ $have_py == 1 ]]; then
    stage pytest_cuda 180 env PYTHONPATH=python $py -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs
    tail -n 3 "$OUT/pytest_cuda.log" | sed 's/^/    /' | tee -a "$summary"
  fi
  stage kernel_check_cpu 120 build/gpu/kernel_check
  # --- Benchmark (time left permitting: everything above must finish first).
  if [[ $have_py == 1 ]]; then
    left=$((470 - ($(date +%s) - t_start)))
    if [[ $left -gt 60 ]]; then
      stage bench $left env PYTHONPATH=python $py benchmarks/bench_cuda.py --models-dir "$models" \
        --presets 270M 1_1B --dtypes bf16 q8 --repeats 2
      grep "^|" "$OUT/bench.log" | tee -a "$summary"
    else
      echo "bench: skipped, ${left}s left of the 8 minutes" | tee -a "$summary"
    fi
  fi
fi
echo "total $(($(date +%s) - t_start))s; $([[ $failed == 0 ]] && echo PASSED || echo FAILED)" | tee -a "$summary"
exit $failed
