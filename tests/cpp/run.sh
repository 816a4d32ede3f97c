#!/usr/bin/env bash
# The C/C++ side of the tests, as CI runs it: builds libopenelm_rt with plain CMake
# (Release, no Python), installs it into a temporary prefix, builds examples/ and the
# README's example against the installed package with find_package, makes a tiny model
# and test fixtures with the Python exporter, checks that the examples print what the
# Python path generates, and runs ctest.
# Needs cmake >= 3.18, a C and a C++ compiler, and python3 that can import openelm_rt
# (after `pip install .`, or PYTHONPATH=python with a development build).
# The build directory (default build/cpp, or $OELM_CPP_BUILD_DIR) is kept, so a second
# run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/../.."
jobs="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
build="${OELM_CPP_BUILD_DIR:-build/cpp}"
work="$(mktemp -d "${TMPDIR:-/tmp}/openelm_rt_cpp.XXXXXX")"
trap 'rm -rf "$work"' EXIT
if ! command -v cmake >/dev/null 2>&1; then
  echo "cmake is not on PATH; install it (e.g. python3 -m pip install cmake ninja)" >&2
  exit 1
fi
generator=()
if command -v ninja >/dev/null 2>&1; then generator=(-G Ninja); fi
# A build directory made before (by .ci/neon.sh's native kernel_check, or an earlier run)
# keeps the generator it was made with.
if [ -f "$build/CMakeCache.txt" ]; then generator=(); fi

echo "== build libopenelm_rt (plain CMake, Release) =="
cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j "$jobs"

echo "== install into a temporary prefix =="
cmake --install "$build" --prefix "$work/prefix" >/dev/null
find "$work/prefix" -type f -o -type l | sed "s|$work/prefix/||" | sort

echo "== examples/ and the README's example, built against the installed package =="
cmake -S examples -B "$work/examples" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/examples" -j "$jobs"
# The README's "Use from C/C++" CMake lines and main.c, verbatim.
readme_block() {  # the first ```$1 block of that section
  awk -v fence="\`\`\`$1" '/^## Use from C\/C\+\+/ {s = 1} s && $0 == fence {on = 1; next}
                            on && /^```/ {exit} on {print}' README.md
}
mkdir -p "$work/readme"
{ echo "cmake_minimum_required(VERSION 3.18)"; echo "project(readme_example C)"; readme_block cmake; } \
  > "$work/readme/CMakeLists.txt"
readme_block c > "$work/readme/main.c"
cmake -S "$work/readme" -B "$work/readme/build" "${generator[@]}" -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/readme/build"

echo "== fixtures: a tiny model from the Python exporter, and the Python path's results =="
python3 tests/cpp/make_fixtures.py "$work/data"

echo "== the examples print what the Python path generates =="
model="$work/data/model.oelm"
python_says() {  # PROMPT ECHO_PROMPT(0|1) MAX_NEW [KEY=VALUE ...]: what Session.generate gives
  python3 - "$model" "$@" <<'PY'
import sys, openelm_rt
model, prompt, echo, n, *kw = sys.argv[1:]
kwargs = {k: (float(v) if "." in v else int(v)) for k, v in (a.split("=") for a in kw)}
with openelm_rt.Session(model) as s:
    r = s.generate(prompt, max_new_tokens=int(n), **kwargs)
sys.stdout.write((prompt if echo == "1" else "") + r.text)
PY
}
check_output() {  # NAME EXPECTED_FILE COMMAND...
  local name="$1" expected="$2"; shift 2
  "$@" > "$work/$name.out"
  if ! cmp -s "$expected" "$work/$name.out"; then
    echo "$name printed something other than the Python path:" >&2
    diff "$expected" "$work/$name.out" >&2 || true
    exit 1
  fi
  echo "$name: $(wc -c < "$work/$name.out") bytes, same as the Python path"
}
python_says "Once upon a time" 1 24 > "$work/expect_c.txt"
check_output simple_c "$work/expect_c.txt" "$work/examples/simple_c" "$model" "Once upon a time" 24
python_says "Once upon a time" 1 24 temperature=0.7 top_p=0.9 seed=42 > "$work/expect_cpp.txt"
check_output simple_cpp "$work/expect_cpp.txt" "$work/examples/simple_cpp" "$model" "Once upon a time" 24
python_says "Once upon a time" 0 64 > "$work/expect_readme.txt"
check_output readme_example "$work/expect_readme.txt" "$work/readme/build/app" "$model"

echo "== ctest =="
(cd "$build" && OELM_TEST_DATA="$work/data" ctest -j "$jobs" --output-on-failure)
