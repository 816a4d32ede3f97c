// The "avx512vnni" kernel variant (see kernels_x86.inc).
#define OELM_X86_VARIANT avx512vnni
#define OELM_X86_TARGET "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"
#define OELM_X86_512 1
#define OELM_X86_VNNI 1
#include "kernels/x86/kernels_x86.inc"
