// Kernel signatures and the table a backend dispatches through.
// Kernels are pure functions on raw buffers: no allocation, no threads, no model
// knowledge. `_ref` kernels (kernels/ref/) are plain fp32 loops, the truth every
// faster variant (SIMD, CUDA) is tested against. Threading is the backend's job:
// each kernel takes the sub-range of outputs it should produce.
#pragma once
#include <cstdint>

#include "format/oelm_file.h"

namespace oelm {

// y[t*ldy + n] = sum_k x[t*K + k] * W[n*K + k] for t in [0,T), n in [n0,n1).
// W is row-major [N, K] in the weight dtype; x is [T, K] f32.
using matmul_fn = void (*)(const float* x, int64_t T, int64_t K, const void* W, int64_t n0,
                           int64_t n1, float* y, int64_t ldy);

// y[i] = x[i] / sqrt(mean(x^2) + eps) * w[i], i in [0, n). y may alias x.
using rmsnorm_fn = void (*)(const float* x, const float* w, int64_t n, float eps, float* y);

// Rotate-half RoPE in place on n_heads heads of width hd laid out contiguously
// (head h at x + h*hd): pairs (j, j + hd/2) rotate by angle (cos[j], sin[j]).
using rope_fn = void (*)(float* x, int64_t n_heads, int64_t hd, const float* cos,
                         const float* sin);

// Causal attention of one query head over n_kv cached positions, online softmax:
// out[d] = sum_s softmax_s(scale * q.k_s) v_s[d]. k and v are [n_kv, hd] contiguous.
using attention_fn = void (*)(const float* q, const float* k, const float* v, int64_t n_kv,
                              int64_t hd, float scale, float* out);

// out[j] = silu(gate[j]) * up[j], j in [0, n).
using swiglu_fn = void (*)(const float* gate, const float* up, int64_t n, float* out);

// Widens n elements of a weight row (embedding lookup) to f32.
using row_to_f32_fn = void (*)(const void* row, int64_t n, float* out);

struct KernelTable {
  const char* name;
  matmul_fn matmul[3];  // indexed by DType: f32, f16, bf16
  row_to_f32_fn row_to_f32[3];
  rmsnorm_fn rmsnorm;
  rope_fn rope;
  attention_fn attention;
  swiglu_fn swiglu;
};

// The scalar reference kernels.
const KernelTable& ref_kernels();

void matmul_f32_ref(const float*, int64_t, int64_t, const void*, int64_t, int64_t, float*, int64_t);
void matmul_f16_ref(const float*, int64_t, int64_t, const void*, int64_t, int64_t, float*, int64_t);
void matmul_bf16_ref(const float*, int64_t, int64_t, const void*, int64_t, int64_t, float*, int64_t);
void rmsnorm_ref(const float* x, const float* w, int64_t n, float eps, float* y);
void rope_ref(float* x, int64_t n_heads, int64_t hd, const float* cos, const float* sin);
void attention_ref(const float* q, const float* k, const float* v, int64_t n_kv, int64_t hd,
                   float scale, float* out);
void swiglu_ref(const float* gate, const float* up, int64_t n, float* out);

}  // namespace oelm
