// The "avx2" kernel variant: kernels_x86.inc compiled for avx2, fma, f16c.
// The instruction set is enabled only for the functions below (after every #include), so
// nothing this file shares with the rest of the program (inline functions of headers) is
// compiled with it; dispatch.cpp calls avx2_kernels() only on a CPU that has it.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/half.h"
#include "kernels/dispatch.h"
#include "kernels/kernels.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
// GCC 12 warns inside its own AVX-512 headers (their _mm512_undefined_* idiom).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx2,fma,f16c")
#endif

#define OELM_X86_512 0
#define OELM_X86_VNNI 0

namespace oelm {
namespace {
#include "kernels/x86/kernels_x86.inc"
}  // namespace

const KernelTable& avx2_kernels() {
  static const KernelTable table = make_table("avx2");
  return table;
}

}  // namespace oelm

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
