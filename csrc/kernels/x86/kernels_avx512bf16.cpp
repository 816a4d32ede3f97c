// The "avx512bf16" kernel variant (see kernels_x86.inc): avx512vnni plus AVX-512 BF16 dot products
// (vdpbf16ps) for bf16 weights with bf16-rounded activations.
#define OELM_X86_VARIANT avx512bf16
#define OELM_X86_TARGET "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16"
#define OELM_X86_512 1
#define OELM_X86_VNNI 1
#define OELM_X86_BF16 1
#include "kernels/x86/kernels_x86.inc"
