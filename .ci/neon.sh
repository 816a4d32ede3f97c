#!/usr/bin/env bash
# SIMD kernel checks, called from .ci/run: cross-builds the C++ core, kernel_check and the
# C API tests for aarch64 with Debian's cross compiler and runs them under qemu-user:
# every NEON kernel against the scalar reference, a CPU without the dot product falling
# back to ref (and forcing neon there refused with a message), and the C API suite
# (tests/cpp, logits and generations equal to the Python path's) with neon forced, which
# runs the whole model on the NEON kernels. Then kernel_check natively (the x86 variants
# this machine supports), built in tests/cpp/run.sh's build directory. Installs the cross
# compiler and qemu when missing; needs python3 that can import openelm_rt (for the C API
# test fixtures), as tests/cpp/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

missing=()
command -v aarch64-linux-gnu-g++ >/dev/null || missing+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
if ((${#missing[@]})); then
  echo "-- installing ${missing[*]}"
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
installed=$SECONDS

gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
echo "-- aarch64 cross build (core, kernel_check, C library and its tests)"
cross=build/ci-aarch64
cmake -S . -B "$cross" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DOPENELM_RT_PYTHON=OFF \
      -DCMAKE_TOOLCHAIN_FILE=cmake/toolchains/aarch64-linux-gnu.cmake >/dev/null
cmake --build "$cross" --target all kernel_check -j2 >/dev/null
built=$SECONDS
qemu=(qemu-aarch64 -L /usr/aarch64-linux-gnu)
check=$cross/kernel_check

echo "-- kernel_check under qemu-aarch64 -cpu max (NEON with dot product)"
"${qemu[@]}" -cpu max "$check"

# ref itself was checked (against FORMAT.md) in the run above; here only the choice matters.
echo "-- kernel_check --dispatch-only under qemu-aarch64 -cpu cortex-a53 (no dot product: dispatch must fall back to ref)"
out=$("${qemu[@]}" -cpu cortex-a53 "$check" --dispatch-only)
echo "$out" | tail -n 1
grep -q "select_kernels() picks ref" <<<"$out" || { echo "$out"; echo "FAIL: auto did not pick ref on cortex-a53"; exit 1; }

echo "-- OPENELM_RT_KERNELS=neon on cortex-a53 must be refused with a message, not crash"
rc=0
out=$(OPENELM_RT_KERNELS=neon "${qemu[@]}" -cpu cortex-a53 "$check" 2>&1) || rc=$?
echo "$out" | tail -n 1
if [ "$rc" -ne 2 ] || ! grep -q "kernel variant 'neon' is compiled in but this CPU cannot run it" <<<"$out"; then
  echo "FAIL: expected exit 2 and the InvalidArgument message, got exit $rc"
  exit 1
fi

echo "-- C API tests under qemu-aarch64 -cpu max with OPENELM_RT_KERNELS=neon (the model on NEON)"
data=$(mktemp -d "${TMPDIR:-/tmp}/openelm_rt_neon.XXXXXX")
trap 'rm -rf "$data"' EXIT
python3 tests/cpp/make_fixtures.py "$data" >/dev/null
# The toolchain file's CMAKE_CROSSCOMPILING_EMULATOR makes ctest run the tests in qemu.
if ! out=$(cd "$cross" && OELM_TEST_DATA="$data" QEMU_CPU=max OPENELM_RT_KERNELS=neon ctest -j2 --output-on-failure 2>&1); then
  echo "$out"
  exit 1
fi
grep "tests passed" <<<"$out"
emulated=$SECONDS

echo "-- kernel_check, native"
# In tests/cpp/run.sh's build directory, configured as it configures it: the core compiled
# here is the one run.sh's C library then links (each is compiled once in .ci/run).
native="${OELM_CPP_BUILD_DIR:-build/cpp}"
gen_native=("${gen[@]}")
[ -f "$native/CMakeCache.txt" ] && gen_native=()  # keep the generator it was made with
cmake -S . -B "$native" "${gen_native[@]}" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$native" --target kernel_check -j2 >/dev/null
"$native/kernel_check"

echo "-- SIMD kernel checks took $((SECONDS - start)) s (install $((installed - start)) s, cross build" \
     "$((built - installed)) s, qemu $((emulated - built)) s, native $((SECONDS - emulated)) s)"
