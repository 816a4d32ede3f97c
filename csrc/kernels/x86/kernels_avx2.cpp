// The "avx2" kernel variant (see kernels_x86.inc).
#define OELM_X86_VARIANT avx2
#define OELM_X86_TARGET "avx2,fma,f16c"
#define OELM_X86_512 0
#define OELM_X86_VNNI 0
#include "kernels/x86/kernels_x86.inc"
