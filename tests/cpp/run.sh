#!/usr/bin/env bash
# The C/C++ side of the tests, as CI runs it: builds libopenelm_rt with plain CMake
# (Release, no Python), installs it into a temporary prefix, makes the test fixtures
# with the Python exporter and runs ctest on them.
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

echo "== build libopenelm_rt (plain CMake, Release) =="
cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j "$jobs"

echo "== install into a temporary prefix =="
cmake --install "$build" --prefix "$work/prefix" >/dev/null
find "$work/prefix" -type f -o -type l | sed "s|$work/prefix/||" | sort

echo "== fixtures: a tiny model from the Python exporter, and the Python path's results =="
python3 tests/cpp/make_fixtures.py "$work/data"

echo "== ctest =="
(cd "$build" && OELM_TEST_DATA="$work/data" ctest -j "$jobs" --output-on-failure)
