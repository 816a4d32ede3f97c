// Run-time choice of kernel variant: one binary carries every variant its target
// architecture can have (x86-64: avx512bf16, avx512vnni, avx512, avx2; aarch64: neon) plus the
// scalar reference "ref", and picks the best one the CPU supports. The environment
// variable OPENELM_RT_KERNELS=<name> forces a variant (tests use it to cover every
// variant the machine can run); forcing one the CPU cannot run is an error, never a crash.
#pragma once
#include <string>
#include <vector>

#include "kernels/kernels.h"

namespace oelm {

struct KernelVariant {
  const char* name;
  const KernelTable& (*table)();
  bool (*cpu_supports)();
};

// Every variant compiled into this binary, fastest first; "ref" is always last.
const std::vector<KernelVariant>& compiled_kernel_variants();

// Names of the compiled variants this CPU can run, fastest first.
std::vector<std::string> supported_kernel_variants();

// The variant named `name` ("auto" = the fastest supported). Throws InvalidArgument
// naming the choices if it is unknown, not compiled in, or not supported by this CPU.
const KernelTable& kernels_by_name(const std::string& name);

// OPENELM_RT_KERNELS if set (and not empty), else "auto".
const KernelTable& select_kernels();

// Per-architecture variant tables (defined only where compiled; see dispatch.cpp).
const KernelTable& avx2_kernels();
const KernelTable& avx512_kernels();
const KernelTable& avx512vnni_kernels();
const KernelTable& avx512bf16_kernels();
const KernelTable& neon_kernels();

}  // namespace oelm
