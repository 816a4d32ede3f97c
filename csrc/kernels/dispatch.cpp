// Variant registry and CPU feature detection (see dispatch.h).
#include "kernels/dispatch.h"

#include <cstdlib>

#include "common/error.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

namespace oelm {

namespace {

bool always() { return true; }

#if defined(__x86_64__) || defined(_M_X64)
// F16C (CPUID leaf 1, ECX bit 29) read directly: clang before 15 does not know
// __builtin_cpu_supports("f16c"), and the fuzzers and sanitizer builds use Debian's clang 14.
bool cpuid_f16c() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
}
// (maybe_unused: a build may leave variants out, see OPENELM_RT_X86_KERNELS.)
// __builtin_cpu_supports("avx2") also checks that the OS saves the YMM registers (XGETBV),
// which F16C needs as well.
[[maybe_unused]] bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpuid_f16c();
}
[[maybe_unused]] bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
[[maybe_unused]] bool has_avx512vnni() { return has_avx512() && __builtin_cpu_supports("avx512vnni"); }
[[maybe_unused]] bool has_avx512bf16() { return has_avx512vnni() && __builtin_cpu_supports("avx512bf16"); }
#endif

#if defined(__aarch64__)
bool has_neon_dotprod() {
#if defined(__linux__)
  return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
  return true;  // every Apple arm64 CPU has the dot-product extension
#else
  return false;
#endif
}
#endif

std::string join_names(const std::vector<std::string>& v) {
  std::string s;
  for (const std::string& n : v) s += (s.empty() ? "" : ", ") + n;
  return s;
}

}  // namespace

const std::vector<KernelVariant>& compiled_kernel_variants() {
  static const std::vector<KernelVariant> v = {
// Fastest first; each x86 variant only where CMake compiled it in (OPENELM_RT_X86_KERNELS).
#if defined(OELM_HAVE_X86_AVX512BF16)
      {"avx512bf16", avx512bf16_kernels, has_avx512bf16},
#endif
#if defined(OELM_HAVE_X86_AVX512VNNI)
      {"avx512vnni", avx512vnni_kernels, has_avx512vnni},
#endif
#if defined(OELM_HAVE_X86_AVX512)
      {"avx512", avx512_kernels, has_avx512},
#endif
#if defined(OELM_HAVE_X86_AVX2)
      {"avx2", avx2_kernels, has_avx2},
#endif
#if defined(OELM_HAVE_NEON_KERNELS)
      {"neon", neon_kernels, has_neon_dotprod},
#endif
      {"ref", ref_kernels, always},
  };
  return v;
}

std::vector<std::string> supported_kernel_variants() {
  std::vector<std::string> out;
  for (const KernelVariant& k : compiled_kernel_variants())
    if (k.cpu_supports()) out.push_back(k.name);
  return out;
}

const KernelTable& kernels_by_name(const std::string& name) {
  const std::vector<KernelVariant>& all = compiled_kernel_variants();
  if (name == "auto" || name.empty()) {
    for (const KernelVariant& k : all)
      if (k.cpu_supports()) return k.table();
  }
  for (const KernelVariant& k : all) {
    if (name != k.name) continue;
    if (!k.cpu_supports())
      throw InvalidArgument("kernel variant '" + name + "' is compiled in but this CPU cannot run it; "
                            "supported here: " + join_names(supported_kernel_variants()));
    return k.table();
  }
  std::vector<std::string> compiled;
  for (const KernelVariant& k : all) compiled.push_back(k.name);
  throw InvalidArgument("unknown kernel variant '" + name + "'; this build has: " + join_names(compiled) +
                        " (supported by this CPU: " + join_names(supported_kernel_variants()) + "), or auto");
}

const KernelTable& select_kernels() {
  const char* env = std::getenv("OPENELM_RT_KERNELS");
  try {
    return kernels_by_name(env ? env : "auto");
  } catch (const InvalidArgument& e) {
    throw InvalidArgument(std::string("OPENELM_RT_KERNELS: ") + e.what());
  }
}

}  // namespace oelm
