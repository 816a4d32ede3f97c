// The CUDA backend's kernels, as host functions that launch them on a stream. Every pointer
// is device memory unless it says otherwise. Each kernel names, next to its launcher, the
// CPU scalar reference (kernels/ref/) it must agree with; tests/cpp/cuda_check.cpp checks
// every one against it on fresh random inputs, outputs poisoned first.
//
// Launchers check the launch (cudaGetLastError) and throw oelm::CudaError; errors that happen
// while a kernel runs surface at the next synchronisation, which the executor checks too.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "format/oelm_file.h"
#include "kernels/kernels.h"

namespace oelm {

// A CUDA call failed: the call, where, and the CUDA error's name and text.
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] void throw_cuda_error(cudaError_t e, const char* call, const char* file, int line);

// Every CUDA runtime call goes through this: a failure throws CudaError naming the call.
#define OELM_CUDA_CHECK(call)                                                     \
  do {                                                                            \
    const cudaError_t oelm_cuda_status_ = (call);                                 \
    if (oelm_cuda_status_ != cudaSuccess)                                         \
      ::oelm::throw_cuda_error(oelm_cuda_status_, #call, __FILE__, __LINE__);     \
  } while (0)

namespace cuda {

// Tokens per pass of the matrix-vector kernels; larger steps use the tiled GEMM (float
// weights) or several passes over the weights (quantized ones).
constexpr int64_t kGemvTokens = 8;

// x[t, 0:D] = row tokens[t] of E [V, D] (any weight dtype) as f32.       CPU: row_to_f32_*
void embed(const void* E, DType dt, int64_t V, int64_t D, const int32_t* tokens, int64_t T, float* x,
           cudaStream_t s);

// y[i, :] = rmsnorm(x[r, :]) * w with r = rows ? rows[i] : i, for i < n.   CPU: rmsnorm_ref
void rmsnorm_rows(const float* x, int64_t ldx, const int32_t* rows, int64_t n, const float* w, int64_t D, float eps,
                  float* y, int64_t ldy, cudaStream_t s);

// Where a layer's KV cache lives: element d of position r of block b, kv head h, at
// ((b * n_kv + h) * block + r) * hd + d, for keys and values alike (row-major, unlike the
// CPU's 16-position key groups: the device layout is the backend's own).
struct DevKv {
  void* k;
  void* v;
  int64_t n_kv;
  int64_t block;
  KvType type;
};

// Per token t of qkv [T, (nq + 2 nkv) hd]: the per-head RMSNorm of q and k heads (when
// q_norm / k_norm are given), rotate-half RoPE at position pos[t] on them, and the token's
// keys and values stored at row slot_row[t] of block slot_block[t].
//                                                  CPU: rmsnorm_ref, rope_ref, store_kv
void qkv_post(float* qkv, int64_t T, int64_t nq, int64_t nkv, int64_t hd, const float* q_norm, const float* k_norm,
              float eps, const float* rope_cos, const float* rope_sin, const int32_t* pos, const int32_t* slot_block,
              const int32_t* slot_row, const DevKv& kv, cudaStream_t s);

// Causal attention: query head g of token t (qkv + t*ldq + g*hd) over positions 0..pos[t] of
// kv head g / (nq / nkv), whose blocks are tables[table_off[t] + p / block]; output at
// out + t*ldo + g*hd.                                                CPU: attention_tile_ref
void attention(const float* qkv, int64_t ldq, int64_t T, int64_t nq, int64_t nkv, int64_t hd, float scale,
               const int32_t* pos, const int32_t* table_off, const int32_t* tables, const DevKv& kv, float* out,
               int64_t ldo, cudaStream_t s);

// act[t, j] = silu(gu[t, j]) * gu[t, F + j] for j < F.                       CPU: swiglu_ref
void swiglu(const float* gu, int64_t T, int64_t F, float* act, cudaStream_t s);

// Activation rows quantized for the integer kernels: q [T][Kp] int8, d [T][Kp/32].
//                                                                     CPU: quantize_row_ref
void quantize_rows(const float* x, int64_t T, int64_t K, int8_t* q, float* d, cudaStream_t s);

// Scratch a matmul with weights of this dtype needs for T rows of K (quantized activations).
int64_t matmul_scratch_bytes(DType dt, int64_t T, int64_t K);

// y[t*ldy + n] (= or, if accumulate, +=) x[t, :] . W[n, :] for t < T, n < N; W [N, K] as the
// file stores it. Float weights: f32 arithmetic (CPU: matmul_*_ref); q8/q4: the activations
// quantized first and the integer block sums of the CPU's qmatmul (CPU: qmatmul_q*_ref,
// bit for bit: same integer sums, same fma order). scratch: matmul_scratch_bytes(dt, T, K).
void matmul(const float* x, int64_t T, int64_t K, const void* W, DType dt, int64_t N, float* y, int64_t ldy,
            bool accumulate, void* scratch, cudaStream_t s);

}  // namespace cuda
}  // namespace oelm
