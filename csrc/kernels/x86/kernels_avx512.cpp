// The "avx512" kernel variant (see kernels_x86.inc).
#define OELM_X86_VARIANT avx512
#define OELM_X86_TARGET "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq"
#define OELM_X86_512 1
#define OELM_X86_VNNI 0
#include "kernels/x86/kernels_x86.inc"
