#!/usr/bin/env bash
# SIMD kernel checks, called from .ci/run: cross-builds the C++ core and kernel_check for
# aarch64 with Debian's cross compiler and runs it under qemu-user (every NEON kernel
# against the scalar reference), proves that a CPU without the dot product falls back to
# ref and that forcing neon there is a clear error, then runs kernel_check natively (the
# x86 variants this machine supports). Installs the cross compiler and qemu when missing.
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
build_check() {  # build_check DIR [cmake args...]: configures DIR and builds only kernel_check
  local dir=$1
  shift
  cmake -S . -B "$dir" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DOPENELM_RT_PYTHON=OFF \
        -DOPENELM_RT_C_LIBRARY=OFF -DOPENELM_RT_TESTS=OFF "$@" >/dev/null
  cmake --build "$dir" --target kernel_check -j2 >/dev/null
}

echo "-- aarch64 cross build"
build_check build/ci-aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/toolchains/aarch64-linux-gnu.cmake
built=$SECONDS
qemu=(qemu-aarch64 -L /usr/aarch64-linux-gnu)
check=build/ci-aarch64/kernel_check

echo "-- kernel_check under qemu-aarch64 -cpu max (NEON with dot product)"
"${qemu[@]}" -cpu max "$check"

echo "-- kernel_check under qemu-aarch64 -cpu cortex-a53 (no dot product: dispatch must fall back to ref)"
out=$("${qemu[@]}" -cpu cortex-a53 "$check")
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
emulated=$SECONDS

echo "-- kernel_check, native"
build_check build/ci-native
build/ci-native/kernel_check

echo "-- SIMD kernel checks took $((SECONDS - start)) s (install $((installed - start)) s, cross build" \
     "$((built - installed)) s, qemu $((emulated - built)) s, native $((SECONDS - emulated)) s)"
