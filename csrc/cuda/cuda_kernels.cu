// The CUDA backend's kernels (cuda_kernels.h). Each is written to be checked by reading:
// one thread block or warp per output row or head, f32 accumulation, the CPU scalar reference
// it agrees with named above it. Index arithmetic that can exceed 2^31 is done in int64_t.
//
// Every kernel computes a row's result from that row's inputs alone, in an order that does not
// depend on how many rows the launch has: a sequence's logits must not depend on what else is
// in the step (executor.h), bit for bit. That is why there is no separate tiled GEMM for
// prefill: its summation order would differ from the decode kernel's.
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "common/error.h"
#include "cuda/cuda_kernels.h"

namespace oelm {
namespace cuda {

namespace {

constexpr unsigned kFull = 0xFFFFFFFFu;

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// Sum or max over the whole block (blockDim.x a multiple of 32, at most 1024), returned to
// every thread. red: 32 floats of shared memory. Every thread of the block must call it.
template <bool Max>
__device__ float block_reduce(float v, float* red) {
  v = Max ? warp_max(v) : warp_sum(v);
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  __syncthreads();  // red may still be read by the previous call
  if (lane == 0) red[w] = v;
  __syncthreads();
  float r = red[0];
  for (int i = 1; i < nw; ++i) r = Max ? fmaxf(r, red[i]) : r + red[i];
  return r;
}

__device__ __forceinline__ float f16_bits_to_f32(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ float bf16_bits_to_f32(uint16_t h) { return __uint_as_float(uint32_t(h) << 16); }

// Element (n, k) of a weight matrix W [N, K] as the file stores it, widened to f32 (exact for
// every dtype, as the CPU's row_to_f32; q: FORMAT.md's panel layout, see qmatmul_ref.cpp).
template <int DT>
__device__ float weight_at(const uint8_t* W, int64_t K, int64_t n, int64_t k) {
  if (DT == int(DType::f32)) return reinterpret_cast<const float*>(W)[n * K + k];
  if (DT == int(DType::f16)) return f16_bits_to_f32(reinterpret_cast<const uint16_t*>(W)[n * K + k]);
  if (DT == int(DType::bf16)) return bf16_bits_to_f32(reinterpret_cast<const uint16_t*>(W)[n * K + k]);
  const int64_t BB = DT == int(DType::q8) ? kQ8BlockBytes : kQ4BlockBytes;
  const int64_t Kp = (K + kQBlock - 1) / kQBlock * kQBlock, b = k / kQBlock, c = k % kQBlock, r = n % kQRows;
  const uint8_t* block = W + (n / kQRows) * (Kp / kQBlock) * BB + b * BB;
  const float scale = f16_bits_to_f32(uint16_t(block[2 * r] | (block[2 * r + 1] << 8)));
  int q;
  if (DT == int(DType::q8)) {
    q = int(block[kQScaleBytes + 64 * (c / 4) + 4 * r + c % 4]) - 128;
  } else {
    const uint8_t byte = block[kQScaleBytes + 64 * ((c % 16) / 4) + 4 * r + c % 4];
    q = int(c < 16 ? byte & 0x0F : byte >> 4) - 8;
  }
  return scale * float(q);
}

// ------------------------------------------------------------------------------- embedding
// CPU: row_to_f32_* (ops_ref.cpp, qmatmul_ref.cpp)
template <int DT>
__global__ void embed_kernel(const uint8_t* E, int64_t D, const int32_t* tokens, float* x) {
  const int64_t t = blockIdx.x;
  const int64_t row = tokens[t];
  for (int64_t k = threadIdx.x; k < D; k += blockDim.x) x[t * D + k] = weight_at<DT>(E, D, row, k);
}

// --------------------------------------------------------------------------------- RMSNorm
// CPU: rmsnorm_ref -- sum of squares in double, inv = float(1 / sqrt(ss / n + eps)),
// y = (x * inv) * w.
__global__ void rmsnorm_kernel(const float* x, int64_t ldx, const int32_t* rows, const float* w, int64_t D, float eps,
                               float* y, int64_t ldy) {
  __shared__ double red[32];
  const int64_t i = blockIdx.x;
  const float* xr = x + (rows ? int64_t(rows[i]) : i) * ldx;
  double ss = 0;
  for (int64_t k = threadIdx.x; k < D; k += blockDim.x) ss += double(xr[k]) * double(xr[k]);
  ss = warp_sum(ss);
  const int lane = threadIdx.x & 31, wi = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) red[wi] = ss;
  __syncthreads();
  double tot = 0;
  for (int j = 0; j < nw; ++j) tot += red[j];
  const float inv = float(1.0 / sqrt(tot / double(D) + double(eps)));
  // y may alias x only when rows is null (each thread rewrites the elements it read).
  for (int64_t k = threadIdx.x; k < D; k += blockDim.x) y[i * ldy + k] = __fmul_rn(__fmul_rn(xr[k], inv), w[k]);
}

// ----------------------------------------------------- q/k norm, RoPE, KV store (one warp)
// CPU: rmsnorm_ref on each q and k head, rope_ref, CpuExecutor::store_kv. One warp per
// (token, head); heads 0..nq-1 are queries, then nkv keys, then nkv values (qkv's layout).
template <bool F16>
__global__ void qkv_post_kernel(float* qkv, int64_t ldq, int nq, int nkv, int hd, const float* q_norm,
                                const float* k_norm, float eps, const float* rope_cos, const float* rope_sin,
                                const int32_t* pos, const int32_t* slot_block, const int32_t* slot_row, void* kc,
                                void* vc, int64_t block) {
  const int64_t t = blockIdx.x;
  const int h = blockIdx.y, lane = threadIdx.x, half = hd / 2;
  float* v = qkv + t * ldq + int64_t(h) * hd;
  const bool is_q = h < nq, is_k = !is_q && h < nq + nkv;
  if (is_q || is_k) {
    const float* nw = is_q ? q_norm : k_norm;
    float inv = 1.0f;
    if (nw) {
      double ss = 0;
      for (int d = lane; d < hd; d += 32) ss += double(v[d]) * double(v[d]);
      ss = warp_sum(ss);
      inv = float(1.0 / sqrt(ss / double(hd) + double(eps)));
    }
    const float* cs = rope_cos + int64_t(pos[t]) * half;
    const float* sn = rope_sin + int64_t(pos[t]) * half;
    for (int j = lane; j < half; j += 32) {  // the pair (j, j + half) belongs to this lane alone
      float a = v[j], b = v[j + half];
      if (nw) {
        a = __fmul_rn(__fmul_rn(a, inv), nw[j]);
        b = __fmul_rn(__fmul_rn(b, inv), nw[j + half]);
      }
      // rotate_half: x * cos + rotate_half(x) * sin, unfused as the reference rounds it
      v[j] = __fsub_rn(__fmul_rn(a, cs[j]), __fmul_rn(b, sn[j]));
      v[j + half] = __fadd_rn(__fmul_rn(b, cs[j]), __fmul_rn(a, sn[j]));
    }
    __syncwarp();
    if (is_q) return;
  }
  // A key (rotated above) or a value: store it.
  const int kvh = is_k ? h - nq : h - nq - nkv;
  const int64_t at = ((int64_t(slot_block[t]) * nkv + kvh) * block + slot_row[t]) * hd;
  void* cache = is_k ? kc : vc;
  for (int d = lane; d < hd; d += 32) {
    if (F16) static_cast<__half*>(cache)[at + d] = __float2half_rn(v[d]);  // RNE, as f32_to_f16
    else static_cast<float*>(cache)[at + d] = v[d];
  }
}

// ----------------------------------------------------------------------------- attention
// CPU: attention_tile_ref (attend_row: online softmax). One block of kChunk threads per
// (token, query head). Per chunk of kChunk positions: thread i scores position c0 + i, then
// the block's max and sum update the running max m and normaliser l, and thread d rescales
// and accumulates the values for dimension d (d = threadIdx.x, + kChunk, ...).
constexpr int kChunk = 128;

template <bool F16>
__device__ __forceinline__ float kv_load(const void* c, int64_t at) {
  return F16 ? __half2float(static_cast<const __half*>(c)[at]) : static_cast<const float*>(c)[at];
}

template <bool F16>
__global__ void __launch_bounds__(kChunk) attention_kernel(const float* qkv, int64_t ldq, int nq, int nkv, int hd,
                                                           float scale, const int32_t* pos, const int32_t* table_off,
                                                           const int32_t* tables, const void* kc, const void* vc,
                                                           int64_t block, float* out, int64_t ldo) {
  extern __shared__ float sm[];  // q [hd], acc [hd], p [kChunk], red [32]
  float* q = sm;
  float* acc = q + hd;
  float* pr = acc + hd;
  float* red = pr + kChunk;
  const int64_t t = blockIdx.x;
  const int g = blockIdx.y, tid = threadIdx.x;
  const int kvh = g / (nq / nkv);
  const float* qg = qkv + t * ldq + int64_t(g) * hd;
  for (int d = tid; d < hd; d += kChunk) {
    q[d] = qg[d];
    acc[d] = 0.0f;
  }
  __syncthreads();
  const int64_t last = pos[t];  // attends positions 0 .. last
  const int32_t* table = tables + table_off[t];
  auto row_at = [&](int64_t p) { return ((int64_t(table[p / block]) * nkv + kvh) * block + p % block) * hd; };
  float m = -INFINITY, l = 0.0f;
  for (int64_t c0 = 0; c0 <= last; c0 += kChunk) {
    const int64_t p = c0 + tid;
    float score = -INFINITY;
    if (p <= last) {
      const int64_t at = row_at(p);
      float dot = 0.0f;
      for (int d = 0; d < hd; ++d) dot += q[d] * kv_load<F16>(kc, at + d);
      score = dot * scale;
    }
    const float m_new = fmaxf(m, block_reduce<true>(score, red));  // finite: position c0 is valid
    const float e = p <= last ? expf(score - m_new) : 0.0f;
    pr[tid] = e;
    const float esum = block_reduce<false>(e, red);  // its barriers also publish pr
    const float alpha = expf(m - m_new);             // exp(-inf) = 0 on the first chunk
    l = l * alpha + esum;
    m = m_new;
    const int n = int(last - c0 + 1 < kChunk ? last - c0 + 1 : kChunk);
    for (int d = tid; d < hd; d += kChunk) {
      float a = acc[d] * alpha;
      for (int j = 0; j < n; ++j) a += pr[j] * kv_load<F16>(vc, row_at(c0 + j) + d);
      acc[d] = a;
    }
    __syncthreads();  // pr is rewritten by the next chunk
  }
  const float inv = 1.0f / l;
  for (int d = tid; d < hd; d += kChunk) out[t * ldo + int64_t(g) * hd + d] = acc[d] * inv;
}

// ---------------------------------------------------------------------------------- SwiGLU
// CPU: swiglu_ref -- g / (1 + exp(-g)) * up.
__global__ void swiglu_kernel(const float* gu, int64_t T, int64_t F, float* act) {
  const int64_t n = T * F;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / F, j = i % F;
    const float g = gu[t * 2 * F + j];
    act[i] = g / (1.0f + expf(-g)) * gu[t * 2 * F + F + j];
  }
}

// ------------------------------------------------------------------ activation quantization
// CPU: quantize_row_ref. One warp per block of 32 values: d = amax / 127, q = rint(x * 127 /
// amax) (round half to even, as nearbyint), zeros for an all-zero block and for the padding.
__global__ void quantize_kernel(const float* x, int64_t K, int64_t Kp, int8_t* q, float* d) {
  const int64_t t = blockIdx.x, nb = Kp / kQBlock;
  const int64_t b = int64_t(blockIdx.y) * (blockDim.x / 32) + threadIdx.x / 32;
  if (b >= nb) return;  // the whole warp
  const int64_t k = b * kQBlock + (threadIdx.x & 31);
  const float v = k < K ? x[t * K + k] : 0.0f;
  const float amax = warp_max(fabsf(v));
  int8_t qv = 0;
  if (amax != 0.0f) qv = int8_t(rintf(v * (127.0f / amax)));
  q[t * Kp + k] = qv;
  if ((threadIdx.x & 31) == 0) d[t * nb + b] = amax == 0.0f ? 0.0f : amax / 127.0f;
}

// ------------------------------------------------------------------- float-weight matvec
// CPU: matmul_f32_ref / matmul_f16_ref / matmul_bf16_ref. One warp per output row n, tokens
// in chunks of kGemvTokens (blockIdx.y): lane l reads 16 bytes of the row at a time (4 f32 or
// 8 16-bit weights, widened in registers), multiplies them by the same columns of each
// token's x, and the 32 lane sums are added by a fixed shuffle tree.
template <int DT>
__device__ __forceinline__ void load16(const uint8_t* p, float* w) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  if (DT == int(DType::f32)) {
    w[0] = __uint_as_float(u.x);
    w[1] = __uint_as_float(u.y);
    w[2] = __uint_as_float(u.z);
    w[3] = __uint_as_float(u.w);
    return;
  }
  const uint32_t words[4] = {u.x, u.y, u.z, u.w};
  for (int i = 0; i < 4; ++i) {
    const uint16_t lo = uint16_t(words[i] & 0xFFFFu), hi = uint16_t(words[i] >> 16);
    w[2 * i] = DT == int(DType::f16) ? f16_bits_to_f32(lo) : bf16_bits_to_f32(lo);
    w[2 * i + 1] = DT == int(DType::f16) ? f16_bits_to_f32(hi) : bf16_bits_to_f32(hi);
  }
}

template <int DT>
__global__ void gemv_kernel(const float* x, int64_t T, int64_t K, const uint8_t* W, int64_t N, float* y, int64_t ldy,
                            bool accumulate, bool vec) {
  constexpr int kVec = DT == int(DType::f32) ? 4 : 8;  // weights per 16-byte load
  constexpr int kBytes = DT == int(DType::f32) ? 4 : 2;
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (n >= N) return;  // the whole warp
  const int64_t t0 = int64_t(blockIdx.y) * kGemvTokens;
  const int nt = int(T - t0 < kGemvTokens ? T - t0 : kGemvTokens);
  float acc[kGemvTokens];
#pragma unroll
  for (int t = 0; t < kGemvTokens; ++t) acc[t] = 0.0f;
  if (vec) {  // K % kVec == 0, W and x 16-byte aligned (checked by the launcher)
    const uint8_t* row = W + n * K * kBytes;
    for (int64_t k = int64_t(lane) * kVec; k < K; k += 32 * kVec) {
      float w[kVec];
      load16<DT>(row + k * kBytes, w);
#pragma unroll
      for (int t = 0; t < kGemvTokens; ++t) {
        if (t < nt) {
          const float4* xv = reinterpret_cast<const float4*>(x + (t0 + t) * K + k);
#pragma unroll
          for (int i = 0; i < kVec / 4; ++i) {
            const float4 a = xv[i];
            acc[t] += w[4 * i] * a.x + w[4 * i + 1] * a.y + w[4 * i + 2] * a.z + w[4 * i + 3] * a.w;
          }
        }
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += 32) {
      const float w = weight_at<DT>(W, K, n, k);
#pragma unroll
      for (int t = 0; t < kGemvTokens; ++t)
        if (t < nt) acc[t] += w * x[(t0 + t) * K + k];
    }
  }
#pragma unroll
  for (int t = 0; t < kGemvTokens; ++t) {
    if (t < nt) {
      const float s = warp_sum(acc[t]);
      if (lane == 0) {
        float* out = y + (t0 + t) * ldy + n;
        *out = accumulate ? *out + s : s;
      }
    }
  }
}

// --------------------------------------------------------------- block-quantized matvec
// CPU: qmatmul_q8_ref / qmatmul_q4_ref, bit for bit. One warp per panel of 16 rows (FORMAT.md):
// lane l takes row r = l % 16 and half h = l / 16 of each 32-column block. In a block the
// weights of column c sit 4 to a 32-bit word: q8 word (c / 4) of row r at 32 + 64 (c / 4) + 4 r
// (bytes stored as q + 128), q4 word ((c % 16) / 4) (low nibbles: c < 16, high: c >= 16; stored
// as q + 8). The half-block integer sums (dp4a: four int8 products per instruction) are joined
// by one shuffle into the block's exact isum, then acc = fma(isum * x.d, w.d, acc) in block
// order, as the reference.
template <int QT>
__global__ void qgemv_kernel(const int8_t* xq, const float* xd, int64_t T, int64_t Kp, const uint8_t* W, int64_t N,
                             float* y, int64_t ldy, bool accumulate) {
  constexpr int64_t BB = QT == 8 ? kQ8BlockBytes : kQ4BlockBytes;
  const int lane = threadIdx.x & 31, r = lane & 15, h = lane >> 4;
  const int64_t panel = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (panel * kQRows >= N) return;  // the whole warp
  const int64_t nb = Kp / kQBlock;
  const int64_t t0 = int64_t(blockIdx.y) * kGemvTokens;
  const int nt = int(T - t0 < kGemvTokens ? T - t0 : kGemvTokens);
  const uint8_t* P = W + panel * nb * BB;
  float acc[kGemvTokens];
#pragma unroll
  for (int t = 0; t < kGemvTokens; ++t) acc[t] = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = P + b * BB;
    const float ws = f16_bits_to_f32(*reinterpret_cast<const uint16_t*>(blk + 2 * r));
    // This lane's weight words, as signed bytes: q8 words 4h .. 4h+3; q4 words 2h, 2h+1, each
    // giving 4 low-nibble columns (4 cc ..) and 4 high-nibble ones (16 + 4 cc ..).
    int wq[4];
    if (QT == 8) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
        wq[i] = int(*reinterpret_cast<const uint32_t*>(blk + kQScaleBytes + 64 * (4 * h + i) + 4 * r) ^ 0x80808080u);
    } else {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const uint32_t u = *reinterpret_cast<const uint32_t*>(blk + kQScaleBytes + 64 * (2 * h + i) + 4 * r);
        wq[2 * i] = int(__vsub4(u & 0x0F0F0F0Fu, 0x08080808u));
        wq[2 * i + 1] = int(__vsub4((u >> 4) & 0x0F0F0F0Fu, 0x08080808u));
      }
    }
#pragma unroll
    for (int t = 0; t < kGemvTokens; ++t) {
      if (t < nt) {  // nt is the same for the whole warp: the shuffle below is uniform
        const int8_t* xb = xq + (t0 + t) * Kp + b * kQBlock;
        int isum = 0;
        if (QT == 8) {
#pragma unroll
          for (int i = 0; i < 4; ++i) isum = __dp4a(wq[i], *reinterpret_cast<const int*>(xb + 4 * (4 * h + i)), isum);
        } else {
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int cc = 2 * h + i;
            isum = __dp4a(wq[2 * i], *reinterpret_cast<const int*>(xb + 4 * cc), isum);
            isum = __dp4a(wq[2 * i + 1], *reinterpret_cast<const int*>(xb + 16 + 4 * cc), isum);
          }
        }
        isum += __shfl_xor_sync(kFull, isum, 16);  // the other half of the block, same row
        acc[t] = fmaf(float(isum) * xd[(t0 + t) * nb + b], ws, acc[t]);
      }
    }
  }
  const int64_t n = panel * kQRows + r;
  if (h != 0 || n >= N) return;
#pragma unroll
  for (int t = 0; t < kGemvTokens; ++t) {
    if (t < nt) {
      float* out = y + (t0 + t) * ldy + n;
      *out = accumulate ? *out + acc[t] : acc[t];
    }
  }
}

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw_cuda_error(e, what, __FILE__, __LINE__);
}

unsigned grid_of(int64_t n, int64_t per) { return unsigned((n + per - 1) / per); }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

// ------------------------------------------------------------------------------ launchers

bool kernels_loadable(std::string* why) {
  cudaFuncAttributes a;
  const cudaError_t e = cudaFuncGetAttributes(&a, rmsnorm_kernel);
  if (e == cudaSuccess) return true;
  (void)cudaGetLastError();
  if (why)
    *why = std::string("the CUDA device cannot run this build's kernels (") + cudaGetErrorName(e) + ": " +
           cudaGetErrorString(e) + "); rebuild with -DOPENELM_RT_CUDA_ARCHITECTURES set to its compute capability";
  return false;
}

void embed(const void* E, DType dt, int64_t V, int64_t D, const int32_t* tokens, int64_t T, float* x,
           cudaStream_t s) {
  if (T <= 0) return;
  const uint8_t* e = static_cast<const uint8_t*>(E);
  switch (dt) {
    case DType::f32: embed_kernel<int(DType::f32)><<<unsigned(T), 256, 0, s>>>(e, D, tokens, x); break;
    case DType::f16: embed_kernel<int(DType::f16)><<<unsigned(T), 256, 0, s>>>(e, D, tokens, x); break;
    case DType::bf16: embed_kernel<int(DType::bf16)><<<unsigned(T), 256, 0, s>>>(e, D, tokens, x); break;
    case DType::q8: embed_kernel<int(DType::q8)><<<unsigned(T), 256, 0, s>>>(e, D, tokens, x); break;
    case DType::q4: embed_kernel<int(DType::q4)><<<unsigned(T), 256, 0, s>>>(e, D, tokens, x); break;
    default: throw InvalidArgument(std::string("cuda embed: no kernel for ") + dtype_name(dt));
  }
  check_launch("embed_kernel");
}

void rmsnorm_rows(const float* x, int64_t ldx, const int32_t* rows, int64_t n, const float* w, int64_t D, float eps,
                  float* y, int64_t ldy, cudaStream_t s) {
  if (n <= 0) return;
  rmsnorm_kernel<<<unsigned(n), 256, 0, s>>>(x, ldx, rows, w, D, eps, y, ldy);
  check_launch("rmsnorm_kernel");
}

void qkv_post(float* qkv, int64_t T, int64_t nq, int64_t nkv, int64_t hd, const float* q_norm, const float* k_norm,
              float eps, const float* rope_cos, const float* rope_sin, const int32_t* pos, const int32_t* slot_block,
              const int32_t* slot_row, const DevKv& kv, cudaStream_t s) {
  if (T <= 0) return;
  const dim3 grid{unsigned(T), unsigned(nq + 2 * nkv)};
  const int64_t ldq = (nq + 2 * nkv) * hd;
  if (kv.type == KvType::f16)
    qkv_post_kernel<true><<<grid, 32, 0, s>>>(qkv, ldq, int(nq), int(nkv), int(hd), q_norm, k_norm, eps, rope_cos,
                                             rope_sin, pos, slot_block, slot_row, kv.k, kv.v, kv.block);
  else
    qkv_post_kernel<false><<<grid, 32, 0, s>>>(qkv, ldq, int(nq), int(nkv), int(hd), q_norm, k_norm, eps, rope_cos,
                                              rope_sin, pos, slot_block, slot_row, kv.k, kv.v, kv.block);
  check_launch("qkv_post_kernel");
}

void attention(const float* qkv, int64_t ldq, int64_t T, int64_t nq, int64_t nkv, int64_t hd, float scale,
               const int32_t* pos, const int32_t* table_off, const int32_t* tables, const DevKv& kv, float* out,
               int64_t ldo, cudaStream_t s) {
  if (T <= 0) return;
  const dim3 grid{unsigned(T), unsigned(nq)};
  const size_t smem = size_t(2 * hd + kChunk + 32) * sizeof(float);
  if (kv.type == KvType::f16)
    attention_kernel<true><<<grid, kChunk, smem, s>>>(qkv, ldq, int(nq), int(nkv), int(hd), scale, pos, table_off,
                                                      tables, kv.k, kv.v, kv.block, out, ldo);
  else
    attention_kernel<false><<<grid, kChunk, smem, s>>>(qkv, ldq, int(nq), int(nkv), int(hd), scale, pos, table_off,
                                                       tables, kv.k, kv.v, kv.block, out, ldo);
  check_launch("attention_kernel");
}

void swiglu(const float* gu, int64_t T, int64_t F, float* act, cudaStream_t s) {
  if (T <= 0 || F <= 0) return;
  const int64_t blocks = std::min<int64_t>((T * F + 255) / 256, 65536);
  swiglu_kernel<<<unsigned(blocks), 256, 0, s>>>(gu, T, F, act);
  check_launch("swiglu_kernel");
}

void quantize_rows(const float* x, int64_t T, int64_t K, int8_t* q, float* d, cudaStream_t s) {
  if (T <= 0) return;
  const int64_t Kp = q_padded_k(K), nb = Kp / kQBlock;
  quantize_kernel<<<dim3(unsigned(T), grid_of(nb, 8)), 256, 0, s>>>(x, K, Kp, q, d);
  check_launch("quantize_kernel");
}

namespace {
int64_t round_up_256(int64_t n) { return (n + 255) / 256 * 256; }
}  // namespace

int64_t matmul_scratch_bytes(DType dt, int64_t T, int64_t K) {
  if (!dtype_is_quantized(dt)) return 0;
  const int64_t Kp = q_padded_k(K);
  return round_up_256(T * Kp) + round_up_256(T * (Kp / kQBlock) * int64_t(sizeof(float)));
}

void matmul(const float* x, int64_t T, int64_t K, const void* W, DType dt, int64_t N, float* y, int64_t ldy,
            bool accumulate, void* scratch, cudaStream_t s) {
  if (T <= 0 || N <= 0) return;
  const uint8_t* w = static_cast<const uint8_t*>(W);
  constexpr int kWarps = 8;  // rows (or panels) per block of 256 threads
  const unsigned chunks = grid_of(T, kGemvTokens);
  if (dtype_is_quantized(dt)) {
    const int64_t Kp = q_padded_k(K);
    int8_t* xq = static_cast<int8_t*>(scratch);
    float* xd = reinterpret_cast<float*>(static_cast<uint8_t*>(scratch) + round_up_256(T * Kp));
    quantize_rows(x, T, K, xq, xd, s);
    const dim3 grid{grid_of(q_padded_n(N) / kQRows, kWarps), chunks};
    if (dt == DType::q8) qgemv_kernel<8><<<grid, 32 * kWarps, 0, s>>>(xq, xd, T, Kp, w, N, y, ldy, accumulate);
    else qgemv_kernel<4><<<grid, 32 * kWarps, 0, s>>>(xq, xd, T, Kp, w, N, y, ldy, accumulate);
    check_launch("qgemv_kernel");
    return;
  }
  const dim3 grid{grid_of(N, kWarps), chunks};
  const int vec_width = dt == DType::f32 ? 4 : 8;
  const bool vec = K % vec_width == 0 && aligned16(W) && aligned16(x);
  switch (dt) {
    case DType::f32:
      gemv_kernel<int(DType::f32)><<<grid, 32 * kWarps, 0, s>>>(x, T, K, w, N, y, ldy, accumulate, vec);
      break;
    case DType::f16:
      gemv_kernel<int(DType::f16)><<<grid, 32 * kWarps, 0, s>>>(x, T, K, w, N, y, ldy, accumulate, vec);
      break;
    case DType::bf16:
      gemv_kernel<int(DType::bf16)><<<grid, 32 * kWarps, 0, s>>>(x, T, K, w, N, y, ldy, accumulate, vec);
      break;
    default: throw InvalidArgument(std::string("cuda matmul: no kernel for ") + dtype_name(dt));
  }
  check_launch("gemv_kernel");
}

}  // namespace cuda
}  // namespace oelm
