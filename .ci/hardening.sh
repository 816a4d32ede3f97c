#!/usr/bin/env bash
# Hardening checks, called from .ci/run after the package is installed (issue 19):
#   1. one clang build with AddressSanitizer + UndefinedBehaviorSanitizer (every report fatal)
#      and libFuzzer coverage: the C API tests (ctest, the fixtures of tests/cpp; stress_engine
#      included), kernel_check (the fastest variant, the only x86 one compiled in, and the
#      reference, on every 8th OpenELM shape), the five fuzz
#      targets of tests/fuzz, and the Python extension: a subset of the Python tests (loader,
#      tokenizer, session errors, non-finite logits, server request fuzzing) with the ASan
#      runtime preloaded into python3;
#   2. the engine stress test (tests/cpp/stress_engine) under ThreadSanitizer;
#   3. each fuzz target for $OELM_FUZZ_SECONDS (default 30) from the seed corpus that
#      tests/fuzz/make_seeds.py generates, two at a time (fuzz_flash, the fifth, alone). A
#      crash, leak, sanitizer report or timeout fails CI and prints the reproducer (base64) and
#      how to replay it.
# Installs Debian's clang 14 and its runtimes when missing. Needs python3 that can import
# openelm_rt (fixtures and seeds), cmake and ninja. Long campaigns: tests/fuzz/README.md.
# Measured on the 2-core dev machine on 2026-12-03 (before the kernel_check stride): 719 s in
# all: ASan build 256 s (one x86 variant; 524 s with all four), ASan tests 307 s (kernel_check
# ~200 s of it), TSan build 59 s, stress_engine 3 s, fuzzing 94 s; plus the clang install.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
secs="${OELM_FUZZ_SECONDS:-30}"
jobs="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
CLANG_VERSION="${OELM_CLANG_VERSION:-14}"
cc="clang-$CLANG_VERSION" cxx="clang++-$CLANG_VERSION"

if ! command -v "$cxx" >/dev/null || ! "$cxx" -print-file-name=libclang_rt.fuzzer-x86_64.a | grep -q /; then
  echo "-- installing clang-$CLANG_VERSION libclang-rt-$CLANG_VERSION-dev"
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "clang-$CLANG_VERSION" \
    "libclang-rt-$CLANG_VERSION-dev" >/dev/null
fi
installed=$SECONDS

gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
work=$(mktemp -d "${TMPDIR:-/tmp}/openelm_rt_hardening.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "-- fixtures and seed corpora"
python3 tests/cpp/make_fixtures.py "$work/data" >/dev/null
python3 tests/fuzz/make_seeds.py "$work/seeds"

# The sanitizer builds compile in only the x86 kernel variant this CPU runs (the fastest it
# supports, which the installed package reports): clang 14 with ASan + UBSan takes ~4 minutes of
# CPU per AVX-512 variant, and .ci/neon.sh checks every variant natively.
x86=$(python3 -c 'import openelm_rt._core as c; print(c.Backend.kernel_variants()[0])')
case $x86 in avx2 | avx512 | avx512vnni | avx512bf16) ;; *) x86="" ;; esac
echo "-- x86 kernel variant in the sanitizer builds: ${x86:-none (ref only)}"

echo "-- ASan + UBSan build (clang $CLANG_VERSION): C API tests, kernel_check, fuzz targets, Python extension"
python3 -m pybind11 --cmakedir >/dev/null 2>&1 || python3 -m pip install --quiet --root-user-action=ignore pybind11
asan=build/ci-asan
CC=$cc CXX=$cxx cmake -S . -B "$asan" "${gen[@]}" -DOPENELM_RT_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DOPENELM_RT_X86_KERNELS="$x86" \
  -DOPENELM_RT_PYTHON=ON -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" \
  -DOPENELM_RT_C_LIBRARY=ON -DOPENELM_RT_TESTS=ON -DOPENELM_RT_FUZZ=ON \
  -DOPENELM_RT_SANITIZE=address,undefined >/dev/null
cmake --build "$asan" --target all kernel_check -j "$jobs" >/dev/null
built_asan=$SECONDS

export ASAN_OPTIONS="abort_on_error=1:detect_leaks=1:strict_string_checks=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
echo "-- ctest under ASan + UBSan"
if ! out=$(cd "$asan" && OELM_TEST_DATA="$work/data" ctest -j "$jobs" --output-on-failure 2>&1); then
  echo "$out"
  exit 1
fi
grep "tests passed" <<<"$out"
# The fastest variant this CPU runs (the only one compiled in) and the reference, on every 8th
# OpenELM shape and all the small and odd ones: the instrumented harness takes ~200 s for all
# 211 shapes, ~60 s for these; .ci/neon.sh checks every variant on every shape natively.
echo "-- kernel_check under ASan + UBSan (OPENELM_RT_KERNELS=auto, --shape-stride 8)"
OPENELM_RT_KERNELS=auto "$asan/kernel_check" --shape-stride 8 | tail -n 1

# The Python extension (built above from the same objects: only module.cpp is new), loaded into the stock
# interpreter with the ASan runtime preloaded (the interpreter itself is not instrumented, so
# leak checks stay off), and the tests of the layers that take untrusted input from Python:
# loader, tokenizer, session errors, non-finite logits, the server's request fuzzing (not the
# Ctrl-C test: its child interpreter, preloaded too, runs minutes under ASan).
echo "-- Python tests under ASan + UBSan (the extension built with the sanitizers)"
mkdir -p "$work/pyasan"
cp -r python/openelm_rt "$work/pyasan/"
rm -f "$work/pyasan/openelm_rt/"_core*.so
cp "$asan"/_core*.so "$work/pyasan/openelm_rt/"
pyasan=(env ASAN_OPTIONS="detect_leaks=0:abort_on_error=1" OELM_SERVE_FUZZ_EXAMPLES="${OELM_SERVE_FUZZ_EXAMPLES:-60}"
        LD_PRELOAD="$("$cxx" -print-file-name=libclang_rt.asan-x86_64.so)" PYTHONPATH="$work/pyasan")
"${pyasan[@]}" python3 -c 'import sys, openelm_rt._core as c; assert c.__file__.startswith(sys.argv[1]), c.__file__' \
  "$work/pyasan"
if ! "${pyasan[@]}" python3 -m pytest -q -p no:cacheprovider tests/test_loader.py tests/test_tokenizer.py \
       tests/test_session_errors.py tests/test_nonfinite.py tests/test_serve_fuzz.py \
       -k "not ctrl_c" 2>&1 | tail -n 30; then
  echo "FAIL: the Python tests under ASan + UBSan (a sanitizer report aborts the interpreter)"
  exit 1
fi
ran_asan=$SECONDS

echo "-- ThreadSanitizer build: stress_engine (engine thread, submitters, cancellers, pollers)"
tsan=build/ci-tsan
CC=$cc CXX=$cxx cmake -S . -B "$tsan" "${gen[@]}" -DOPENELM_RT_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo -DOPENELM_RT_PYTHON=OFF \
  -DOPENELM_RT_X86_KERNELS="$x86" \
  -DOPENELM_RT_C_LIBRARY=ON -DOPENELM_RT_TESTS=ON -DOPENELM_RT_SANITIZE=thread >/dev/null
cmake --build "$tsan" --target stress_engine -j "$jobs" >/dev/null
built_tsan=$SECONDS
TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1" "$tsan/tests/cpp/stress_engine" "$work/data/model.oelm"
ran_tsan=$SECONDS

echo "-- fuzzing: each target ${secs} s from its seeds, two at a time"
export OELM_FUZZ_TOKENIZER="$work/seeds/tokenizer.model"
fuzz_one() {  # TARGET: runs it, and on a finding prints the reproducer
  local t=$1 corpus="$work/corpus/$1" art="$work/artifacts/$1/"
  mkdir -p "$corpus" "$art"
  local dict=()
  case $t in fuzz_model | fuzz_json | fuzz_flash) dict=(-dict=tests/fuzz/oelm.dict) ;; esac
  local seeds="$work/seeds/${t#fuzz_}"
  if ! "$asan/tests/fuzz/$t" "$corpus" "$seeds" "${dict[@]}" -max_total_time="$secs" -timeout=20 \
       -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$art" >"$work/$t.log" 2>&1; then
    echo "FAIL: $t found a crash, leak, timeout or sanitizer report:"
    tail -n 60 "$work/$t.log"
    for f in "$art"*; do
      [ -f "$f" ] || continue
      echo "reproducer $(basename "$f") ($(wc -c <"$f") bytes), base64:"
      base64 -w 100 "$f" | head -c 20000
      echo
      echo "replay: base64 -d > repro <<'EOF' ... EOF; build/ci-asan/tests/fuzz/$t repro (tests/fuzz/README.md)"
    done
    return 1
  fi
  local runs cov
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$work/$t.log" | grep -o '[0-9]*$' || echo "?")
  cov=$(grep -o 'cov: [0-9]*' "$work/$t.log" | tail -n 1 || true)
  echo "$t: $runs executions in ${secs} s, $cov, corpus $(ls "$corpus" | wc -l) files"
}
fail=0
fuzz_one fuzz_model & p1=$!
fuzz_one fuzz_json & p2=$!
wait $p1 || fail=1
wait $p2 || fail=1
fuzz_one fuzz_spm & p1=$!
fuzz_one fuzz_tokenizer & p2=$!
wait $p1 || fail=1
wait $p2 || fail=1
fuzz_one fuzz_flash || fail=1
[ "$fail" -eq 0 ] || exit 1

echo "-- hardening took $((SECONDS - start)) s (install $((installed - start)) s, ASan build" \
     "$((built_asan - installed)) s, ASan tests $((ran_asan - built_asan)) s, TSan build" \
     "$((built_tsan - ran_asan)) s, TSan run $((ran_tsan - built_tsan)) s, fuzzing $((SECONDS - ran_tsan)) s)"
