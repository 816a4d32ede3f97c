// The "neon" kernel variant: aarch64 Advanced SIMD plus the ARMv8.2 dot-product
// extension (sdot), picked by dispatch.cpp when the CPU reports HWCAP_ASIMDDP.
// Each kernel computes what its _ref sibling computes (contract in kernels.h); how close
// it must come is stated per kernel in tests/cpp/kernel_check.cpp. No threads, no
// allocation beyond thread-local scratch, no model knowledge.
#include <arm_neon.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "common/half.h"
#include "kernels/kernels.h"

// sdot (ARMv8.2 dot product) is enabled by this attribute on the few functions that use
// it (the quantized panel kernel); everything else is baseline ARMv8-A Advanced SIMD. No
// -march flag for the file: inline functions from headers compiled with it could be the
// copy the linker keeps for every caller, including on CPUs without sdot; and all the
// attributed functions have internal linkage.
#if defined(__clang__)
#define OELM_DOTPROD __attribute__((target("dotprod")))
#else
// GCC's arm_neon.h declares sdot for armv8.2-a+dotprod ("+dotprod" alone does not let a
// caller inline it); every CPU with the dot product (HWCAP_ASIMDDP) implements ARMv8.2-A.
#define OELM_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#endif

namespace oelm {
namespace {

// ----------------------------------------------------------------------------- f32 / f16 / bf16 matmul

// Weight loaders: 8 or 4 consecutive weights widened to f32 (widening is exact for all three).
struct W_f32 {
  using elem = float;
  static float32x4x2_t load8(const float* p) { return {{vld1q_f32(p), vld1q_f32(p + 4)}}; }
  static float32x4_t load4(const float* p) { return vld1q_f32(p); }
  static float at(const float* p) { return *p; }
};
struct W_f16 {
  using elem = uint16_t;
  static float32x4x2_t load8(const uint16_t* p) {
    const float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(p));
    return {{vcvt_f32_f16(vget_low_f16(h)), vcvt_high_f32_f16(h)}};
  }
  static float32x4_t load4(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
  static float at(const uint16_t* p) { return f16_to_f32(*p); }
};
struct W_bf16 {  // bf16 is the top half of an f32: shift left by 16
  using elem = uint16_t;
  static float32x4x2_t load8(const uint16_t* p) {
    const uint16x8_t u = vld1q_u16(p);
    return {{vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(u), 16)),
             vreinterpretq_f32_u32(vshll_high_n_u16(u, 16))}};
  }
  static float32x4_t load4(const uint16_t* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
  static float at(const uint16_t* p) { return bf16_to_f32(*p); }
};

// The register tile: R rows of W (stride K) dotted with TT token rows of x (stride K), so
// each weight vector loaded is used TT times and each activation vector R times.
// Writes y[t*ldy + r]. Accumulators: R*TT vectors (at most 16), each fed two fmla per step.
template <class WL, int R, int TT>
inline void dot_tile(const float* x, int64_t K, const typename WL::elem* w, float* y, int64_t ldy) {
  float32x4_t acc[TT][R];
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = vdupq_n_f32(0.0f);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    float32x4x2_t wv[R];
    for (int r = 0; r < R; ++r) wv[r] = WL::load8(w + r * K + k);
    for (int t = 0; t < TT; ++t) {
      const float32x4_t x0 = vld1q_f32(x + t * K + k), x1 = vld1q_f32(x + t * K + k + 4);
      for (int r = 0; r < R; ++r) {
        acc[t][r] = vfmaq_f32(acc[t][r], x0, wv[r].val[0]);
        acc[t][r] = vfmaq_f32(acc[t][r], x1, wv[r].val[1]);
      }
    }
  }
  if (k + 4 <= K) {
    float32x4_t wv[R];
    for (int r = 0; r < R; ++r) wv[r] = WL::load4(w + r * K + k);
    for (int t = 0; t < TT; ++t) {
      const float32x4_t x0 = vld1q_f32(x + t * K + k);
      for (int r = 0; r < R; ++r) acc[t][r] = vfmaq_f32(acc[t][r], x0, wv[r]);
    }
    k += 4;
  }
  for (int t = 0; t < TT; ++t)
    for (int r = 0; r < R; ++r) {
      float s = vaddvq_f32(acc[t][r]);
      for (int64_t j = k; j < K; ++j) s += x[t * K + j] * WL::at(w + r * K + j);
      y[t * ldy + r] = s;
    }
}

// A run of rows [n0, n1) for TT tokens: tiles of R rows, then single rows.
template <class WL, int R, int TT>
void rows_tile(const float* x, int64_t K, const typename WL::elem* W, int64_t n0, int64_t n1, float* y,
               int64_t ldy) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) dot_tile<WL, R, TT>(x, K, W + n * K, y + n, ldy);
  for (; n < n1; ++n) dot_tile<WL, 1, TT>(x, K, W + n * K, y + n, ldy);
}

// Decode (T <= 4): every row's weights are read once from memory and used by all T tokens
// while in registers. One token gets 8 rows per tile so that 8 accumulators hide the fmla
// latency; more tokens fill the tile with 4 rows.
template <class WL>
void gemv(const float* x, int64_t T, int64_t K, const typename WL::elem* W, int64_t n0, int64_t n1,
          float* y, int64_t ldy) {
  switch (T) {
    case 1: rows_tile<WL, 8, 1>(x, K, W, n0, n1, y, ldy); break;
    case 2: rows_tile<WL, 4, 2>(x, K, W, n0, n1, y, ldy); break;
    case 3: rows_tile<WL, 4, 3>(x, K, W, n0, n1, y, ldy); break;
    default: rows_tile<WL, 4, 4>(x, K, W, n0, n1, y, ldy); break;
  }
}

constexpr int64_t kRowBlock = 16;  // rows whose weights stay in cache while all tokens pass

// Prefill: W is read in blocks of kRowBlock rows; all tokens pass over a block in 4x4
// register tiles (4 rows x 4 tokens: 8 loads feed 32 fmla), so W streams from memory once.
template <class WL>
void gemm_f32_blocked(const float* x, int64_t T, int64_t K, const typename WL::elem* W, int64_t n0,
                      int64_t n1, float* y, int64_t ldy) {
  for (int64_t nb = n0; nb < n1; nb += kRowBlock) {
    const int64_t ne = std::min(n1, nb + kRowBlock);
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) rows_tile<WL, 4, 4>(x + t * K, K, W, nb, ne, y + t * ldy, ldy);
    switch (T - t) {
      case 1: rows_tile<WL, 4, 1>(x + t * K, K, W, nb, ne, y + t * ldy, ldy); break;
      case 2: rows_tile<WL, 4, 2>(x + t * K, K, W, nb, ne, y + t * ldy, ldy); break;
      case 3: rows_tile<WL, 4, 3>(x + t * K, K, W, nb, ne, y + t * ldy, ldy); break;
      default: break;
    }
  }
}

constexpr int64_t kWidenInDotMaxTokens = 4;  // as in matmul_ref.cpp: decode widens in the dot

void matmul_f32_neon(const float* x, int64_t T, int64_t K, const void* W, int64_t n0, int64_t n1, float* y,
                     int64_t ldy) {
  const float* w = static_cast<const float*>(W);
  if (T <= kWidenInDotMaxTokens)
    gemv<W_f32>(x, T, K, w, n0, n1, y, ldy);
  else
    gemm_f32_blocked<W_f32>(x, T, K, w, n0, n1, y, ldy);
}

// 16-bit weights: decode widens inside the dot; prefill widens a block of rows to f32 once
// and reuses it for every token (widening per 4-token tile would repeat it T/4 times).
template <class WL>
void matmul_16bit_neon(const float* x, int64_t T, int64_t K, const void* W, int64_t n0, int64_t n1, float* y,
                       int64_t ldy) {
  const uint16_t* w = static_cast<const uint16_t*>(W);
  if (T <= kWidenInDotMaxTokens) {
    gemv<WL>(x, T, K, w, n0, n1, y, ldy);
    return;
  }
  thread_local std::vector<float> block;
  block.resize(size_t(kRowBlock * K));
  for (int64_t nb = n0; nb < n1; nb += kRowBlock) {
    const int64_t ne = std::min(n1, nb + kRowBlock);
    const uint16_t* src = w + nb * K;
    const int64_t count = (ne - nb) * K;  // the block's rows are contiguous
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) {
      const float32x4x2_t v = WL::load8(src + i);
      vst1q_f32(block.data() + i, v.val[0]);
      vst1q_f32(block.data() + i + 4, v.val[1]);
    }
    for (; i < count; ++i) block[size_t(i)] = WL::at(src + i);
    // Rows of the widened block are indexed from nb: shift the base so row n is at (n - nb) * K.
    gemm_f32_blocked<W_f32>(x, T, K, block.data() - nb * K, nb, ne, y, ldy);
  }
}

void matmul_f16_neon(const float* x, int64_t T, int64_t K, const void* W, int64_t n0, int64_t n1, float* y,
                     int64_t ldy) {
  matmul_16bit_neon<W_f16>(x, T, K, W, n0, n1, y, ldy);
}
void matmul_bf16_neon(const float* x, int64_t T, int64_t K, const void* W, int64_t n0, int64_t n1, float* y,
                      int64_t ldy) {
  matmul_16bit_neon<W_bf16>(x, T, K, W, n0, n1, y, ldy);
}

// ----------------------------------------------------------------------------- block-quantized

// One quantized weight block (32 columns of 16 rows) against TT tokens' activation blocks,
// accumulated into isum[t][j] (rows 4j..4j+3). FORMAT.md puts 4 consecutive weights of each
// of the 16 rows in 64 bytes: a 16-byte vector holds 4 weights of 4 rows, exactly the lanes
// of sdot, whose "laneq" form broadcasts the matching 4 activations.
template <int TT>
struct QBlock {
  int32x4_t isum[TT][4];
  int8x16_t xq[TT][2];  // activations of the block: columns 0..15, 16..31

  // q8: byte 64 g + 16 j + 4 r' + c' is row 4j + r', column 4g + c'; u = q + 128, and
  // u ^ 0x80 reinterpreted as int8 is q.
  template <int G>
  OELM_DOTPROD void q8_group(const uint8_t* wb) {
    for (int j = 0; j < 4; ++j) {
      const int8x16_t w = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(wb + 64 * G + 16 * j), vdupq_n_u8(0x80)));
      for (int t = 0; t < TT; ++t) isum[t][j] = vdotq_laneq_s32(isum[t][j], w, xq[t][G / 4], G % 4);
    }
  }
  template <int... G>
  OELM_DOTPROD void q8(const uint8_t* wb, std::integer_sequence<int, G...>) {
    (q8_group<G>(wb), ...);
  }

  // q4: byte 64 g + 16 j + 4 r' + c' holds column 4g + c' (low nibble) and 16 + 4g + c'
  // (high nibble) of row 4j + r'. The nibbles u = q + 8 are in [0, 15], valid int8 as they
  // are: isum starts at -8 * s (s = sum of the activation block) and adds u . x, which is
  // (u - 8) . x exactly, one subtraction per block instead of one per weight vector.
  template <int G>
  OELM_DOTPROD void q4_group(const uint8_t* wb) {
    for (int j = 0; j < 4; ++j) {
      const uint8x16_t u = vld1q_u8(wb + 64 * G + 16 * j);
      const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(u, vdupq_n_u8(0x0F)));
      const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(u, 4));
      for (int t = 0; t < TT; ++t) {
        isum[t][j] = vdotq_laneq_s32(isum[t][j], lo, xq[t][0], G);
        isum[t][j] = vdotq_laneq_s32(isum[t][j], hi, xq[t][1], G);
      }
    }
  }
  template <int... G>
  OELM_DOTPROD void q4(const uint8_t* wb, std::integer_sequence<int, G...>) {
    (q4_group<G>(wb), ...);
  }

  // q6 / q5: q4's nibbles, plus HB = 2 / 1 high bits per weight in the lines after them: those of
  // nibble vector v = 2 g + half at bits [HB v % 8, + HB) of the same byte of high line HB v / 8
  // (FORMAT.md). u = q + (16 << (HB - 1)) is in [0, 63], valid int8 as it is (isum starts at
  // -offset * s, as for q4).
  template <int HB, int G>
  OELM_DOTPROD void qhi_group(const uint8_t* wb) {
    constexpr int b0 = HB * 2 * G, b1 = HB * (2 * G + 1);
    const uint8x16_t m = vdupq_n_u8((1 << HB) - 1);
    for (int j = 0; j < 4; ++j) {
      const uint8x16_t u = vld1q_u8(wb + 64 * G + 16 * j);
      const uint8x16_t h0 = vld1q_u8(wb + kQNibbleBytes + 64 * (b0 / 8) + 16 * j);
      const uint8x16_t h1 = vld1q_u8(wb + kQNibbleBytes + 64 * (b1 / 8) + 16 * j);
      const uint8x16_t u0 = vorrq_u8(vandq_u8(u, vdupq_n_u8(0x0F)),
                                     vshlq_n_u8(vandq_u8(vshlq_u8(h0, vdupq_n_s8(-(b0 % 8))), m), 4));
      const uint8x16_t u1 = vorrq_u8(vshrq_n_u8(u, 4),
                                     vshlq_n_u8(vandq_u8(vshlq_u8(h1, vdupq_n_s8(-(b1 % 8))), m), 4));
      const int8x16_t lo = vreinterpretq_s8_u8(u0), hi = vreinterpretq_s8_u8(u1);
      for (int t = 0; t < TT; ++t) {
        isum[t][j] = vdotq_laneq_s32(isum[t][j], lo, xq[t][0], G);
        isum[t][j] = vdotq_laneq_s32(isum[t][j], hi, xq[t][1], G);
      }
    }
  }
  template <int HB, int... G>
  OELM_DOTPROD void qhi(const uint8_t* wb, std::integer_sequence<int, G...>) {
    (qhi_group<HB, G>(wb), ...);
  }
};

// Bits per weight of the block types (8: q8, 6: q6, 5: q5, 4: q4): bytes of a block and the
// offset u - q.
constexpr int64_t q_block_bytes(int bits) {
  return bits == 8 ? kQ8BlockBytes : bits == 6 ? kQ6BlockBytes : bits == 5 ? kQ5BlockBytes : kQ4BlockBytes;
}
constexpr int32_t q_offset(int bits) { return bits == 8 ? 0 : 1 << (bits - 1); }  // q8: u ^ 0x80 is q

// One panel (16 rows) for TT tokens starting at token t0: out[t][r] for r < 16. Per block b
// (ascending), the exact integer sum, then acc = fma(float(isum) * x.d, w.d, acc): the same
// operations in the same order as the contract, so results equal the reference bit for bit.
// TT <= 2 keeps isum, acc, activations and weights within the 32 vector registers.
template <int Bits, int TT>
OELM_DOTPROD void qpanel(const QActs& x, int64_t t0, const uint8_t* panel, float out[][16]) {
  const int64_t Kp = x.Kp, nb = Kp / kQBlock;
  const int64_t block_bytes = q_block_bytes(Bits);  // 16 binary16 scales, then weights
  float32x4_t acc[TT][4];
  for (int t = 0; t < TT; ++t)
    for (int j = 0; j < 4; ++j) acc[t][j] = vdupq_n_f32(0.0f);
  QBlock<TT> q;
  for (int64_t b = 0; b < nb; ++b) {
    for (int t = 0; t < TT; ++t) {
      const int8_t* xb = x.q + (t0 + t) * Kp + b * kQBlock;
      q.xq[t][0] = vld1q_s8(xb);
      q.xq[t][1] = vld1q_s8(xb + 16);
      const int32x4_t init = vdupq_n_s32(-q_offset(Bits) * x.s[(t0 + t) * nb + b]);
      for (int j = 0; j < 4; ++j) q.isum[t][j] = init;
    }
    const uint16_t* wd = reinterpret_cast<const uint16_t*>(panel + b * block_bytes);
    const uint8_t* wb = panel + b * block_bytes + kQScaleBytes;
    if constexpr (Bits == 4)
      q.q4(wb, std::make_integer_sequence<int, 4>{});
    else if constexpr (Bits == 8)
      q.q8(wb, std::make_integer_sequence<int, 8>{});
    else
      q.template qhi<Bits - 4>(wb, std::make_integer_sequence<int, 4>{});
    const float16x8_t d01 = vreinterpretq_f16_u16(vld1q_u16(wd));
    const float16x8_t d23 = vreinterpretq_f16_u16(vld1q_u16(wd + 8));
    const float32x4_t d[4] = {vcvt_f32_f16(vget_low_f16(d01)), vcvt_high_f32_f16(d01),
                              vcvt_f32_f16(vget_low_f16(d23)), vcvt_high_f32_f16(d23)};
    for (int t = 0; t < TT; ++t) {
      const float xd = x.d[(t0 + t) * nb + b];
      for (int j = 0; j < 4; ++j)
        acc[t][j] = vfmaq_f32(acc[t][j], vmulq_n_f32(vcvtq_f32_s32(q.isum[t][j]), xd), d[j]);
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int j = 0; j < 4; ++j) vst1q_f32(out[t] + 4 * j, acc[t][j]);
}

// q4k (FORMAT.md): per super-block, the 16 rows' d and dmin; per block the nibbles' exact integer
// sums (q4's, without the offset), then the contract's two fmas with d * sc and -(dmin * m) (both
// exact in f32): the reference's operations in its order, so the results are bitwise equal.
template <int TT>
OELM_DOTPROD void q4k_panel(const QActs& x, int64_t t0, const uint8_t* panel, float out[][16]) {
  const int64_t Kp = x.Kp, nb = Kp / kQBlock, S = q4k_subs(nb), SB = q4k_super_bytes(S);
  float32x4_t acc[TT][4];
  for (int t = 0; t < TT; ++t)
    for (int j = 0; j < 4; ++j) acc[t][j] = vdupq_n_f32(0.0f);
  QBlock<TT> q;
  auto widen16 = [](const uint16_t* p, float32x4_t v[4]) {
    const float16x8_t a = vreinterpretq_f16_u16(vld1q_u16(p)), b = vreinterpretq_f16_u16(vld1q_u16(p + 8));
    v[0] = vcvt_f32_f16(vget_low_f16(a));
    v[1] = vcvt_high_f32_f16(a);
    v[2] = vcvt_f32_f16(vget_low_f16(b));
    v[3] = vcvt_high_f32_f16(b);
  };
  auto to_f32 = [](uint8x16_t u, float32x4_t v[4]) {
    const uint16x8_t lo = vmovl_u8(vget_low_u8(u)), hi = vmovl_high_u8(u);
    v[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo)));
    v[1] = vcvtq_f32_u32(vmovl_high_u16(lo));
    v[2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi)));
    v[3] = vcvtq_f32_u32(vmovl_high_u16(hi));
  };
  for (int64_t sb = 0; sb < nb / S; ++sb) {
    const uint8_t* sup = panel + sb * SB;
    float32x4_t d[4], dmin[4];
    widen16(reinterpret_cast<const uint16_t*>(sup), d);
    widen16(reinterpret_cast<const uint16_t*>(sup + 2 * kQRows), dmin);
    for (int64_t jb = 0; jb < S; ++jb) {
      const int64_t b = sb * S + jb;
      for (int t = 0; t < TT; ++t) {
        const int8_t* xb = x.q + (t0 + t) * Kp + b * kQBlock;
        q.xq[t][0] = vld1q_s8(xb);
        q.xq[t][1] = vld1q_s8(xb + 16);
        for (int j = 0; j < 4; ++j) q.isum[t][j] = vdupq_n_s32(0);
      }
      q.q4(sup + kQ4kHeadBytes + kQ4kScaleBytes * S + kQNibbleBytes * jb, std::make_integer_sequence<int, 4>{});
      const uint8_t* sm = sup + kQ4kHeadBytes + kQ4kScaleBytes * jb;
      const uint8x16_t a = vld1q_u8(sm);
      const uint8x8_t mb = vld1_u8(sm + 16);
      const uint8x16_t mlo = vcombine_u8(vand_u8(mb, vdup_n_u8(0x0F)), vshr_n_u8(mb, 4));
      float32x4_t sc[4], m[4];
      to_f32(vandq_u8(a, vdupq_n_u8(63)), sc);
      to_f32(vorrq_u8(vshlq_n_u8(vshrq_n_u8(a, 6), 4), mlo), m);
      float32x4_t dsc[4], ndm[4];
      for (int j = 0; j < 4; ++j) {
        dsc[j] = vmulq_f32(d[j], sc[j]);
        ndm[j] = vnegq_f32(vmulq_f32(dmin[j], m[j]));
      }
      for (int t = 0; t < TT; ++t) {
        const float xd = x.d[(t0 + t) * nb + b];
        const float xs = float(x.s[(t0 + t) * nb + b]) * xd;
        for (int j = 0; j < 4; ++j) {
          acc[t][j] = vfmaq_f32(acc[t][j], vmulq_n_f32(vcvtq_f32_s32(q.isum[t][j]), xd), dsc[j]);
          acc[t][j] = vfmaq_f32(acc[t][j], vdupq_n_f32(xs), ndm[j]);
        }
      }
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int j = 0; j < 4; ++j) vst1q_f32(out[t] + 4 * j, acc[t][j]);
}

// Panels [n0/16, ceil(n1/16)), tokens in pairs; rows >= n1 of the last panel are computed
// (padding rows have scale 0) but not stored.
// Bits 0: q4k (q4k_panel).
template <int Bits>
void qmatmul_neon(const QActs& x, int64_t T, const void* W, int64_t N, int64_t n0, int64_t n1, float* y,
                  int64_t ldy) {
  const int64_t panel_bytes = Bits == 0 ? q4k_panel_bytes(x.Kp) : x.Kp / kQBlock * q_block_bytes(Bits);
  const uint8_t* base = static_cast<const uint8_t*>(W);
  float out[2][16];
  for (int64_t p0 = n0; p0 < n1; p0 += kQRows) {
    const uint8_t* panel = base + (p0 / kQRows) * panel_bytes;
    const int64_t rows = std::min<int64_t>(kQRows, n1 - p0);
    for (int64_t t = 0; t < T; t += 2) {
      const int tt = T - t >= 2 ? 2 : 1;
      if constexpr (Bits == 0) {
        if (tt == 2)
          q4k_panel<2>(x, t, panel, out);
        else
          q4k_panel<1>(x, t, panel, out);
      } else if (tt == 2) {
        qpanel<Bits, 2>(x, t, panel, out);
      } else {
        qpanel<Bits, 1>(x, t, panel, out);
      }
      for (int i = 0; i < tt; ++i) std::memcpy(y + (t + i) * ldy + p0, out[i], size_t(rows) * sizeof(float));
    }
  }
}

void qmatmul_q8_neon(const QActs& x, int64_t T, const void* W, int64_t N, int64_t n0, int64_t n1, float* y,
                     int64_t ldy) {
  qmatmul_neon<8>(x, T, W, N, n0, n1, y, ldy);
}
void qmatmul_q4_neon(const QActs& x, int64_t T, const void* W, int64_t N, int64_t n0, int64_t n1, float* y,
                     int64_t ldy) {
  qmatmul_neon<4>(x, T, W, N, n0, n1, y, ldy);
}
void qmatmul_q6_neon(const QActs& x, int64_t T, const void* W, int64_t N, int64_t n0, int64_t n1, float* y,
                     int64_t ldy) {
  qmatmul_neon<6>(x, T, W, N, n0, n1, y, ldy);
}
void qmatmul_q5_neon(const QActs& x, int64_t T, const void* W, int64_t N, int64_t n0, int64_t n1, float* y,
                     int64_t ldy) {
  qmatmul_neon<5>(x, T, W, N, n0, n1, y, ldy);
}
void qmatmul_q4k_neon(const QActs& x, int64_t T, const void* W, int64_t N, int64_t n0, int64_t n1, float* y,
                      int64_t ldy) {
  qmatmul_neon<0>(x, T, W, N, n0, n1, y, ldy);
}

// d = amax / 127, q = nearbyint(x * (127 / amax)): the same two f32 roundings as the
// contract, and vcvtnq rounds to nearest, ties to even, as nearbyint does in the default
// rounding mode, so q, d and s are bitwise those of the reference.
void quantize_row_neon(const float* x, int64_t K, int8_t* q, float* d, int32_t* s) {
  const int64_t nb = q_padded_k(K) / kQBlock;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t k0 = b * kQBlock;
    float buf[kQBlock];
    const float* src = x + k0;
    if (K - k0 < kQBlock) {  // the last, partial block: pad with zeros
      std::memset(buf, 0, sizeof buf);
      std::memcpy(buf, src, size_t(K - k0) * sizeof(float));
      src = buf;
    }
    float32x4_t v[8];
    for (int i = 0; i < 8; ++i) v[i] = vld1q_f32(src + 4 * i);
    float32x4_t m = vabsq_f32(v[0]);
    for (int i = 1; i < 8; ++i) m = vmaxq_f32(m, vabsq_f32(v[i]));
    const float amax = vmaxvq_f32(m);  // FMAX propagates a NaN: amax is NaN or inf if any value is
    int8_t* qb = q + k0;
    if (!(amax <= FLT_MAX) || !(127.0f / amax <= FLT_MAX)) {  // kernels.h: NaN d, or an all-zero / tiny block
      std::memset(qb, 0, kQBlock);
      d[b] = amax <= FLT_MAX ? 0.0f : std::numeric_limits<float>::quiet_NaN();
      s[b] = 0;
      continue;
    }
    d[b] = amax / 127.0f;
    const float inv = 127.0f / amax;
    int32x4_t sum = vdupq_n_s32(0);
    for (int i = 0; i < 8; i += 2) {
      const int32x4_t a = vcvtnq_s32_f32(vmulq_n_f32(v[i], inv));
      const int32x4_t c = vcvtnq_s32_f32(vmulq_n_f32(v[i + 1], inv));
      sum = vaddq_s32(sum, vaddq_s32(a, c));
      const int16x8_t h = vcombine_s16(vmovn_s32(a), vmovn_s32(c));  // |q| <= 127: narrowing is exact
      vst1_s8(qb + 4 * i, vmovn_s16(h));
    }
    s[b] = vaddvq_s32(sum);
  }
}

// ----------------------------------------------------------------------------- row lookup

void row_f32_neon(const void* W, int64_t, int64_t K, int64_t row, float* out) {
  std::memcpy(out, static_cast<const float*>(W) + row * K, size_t(K) * sizeof(float));
}

template <class WL>
void row_16bit_neon(const void* W, int64_t, int64_t K, int64_t row, float* out) {
  const uint16_t* r = static_cast<const uint16_t*>(W) + row * K;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const float32x4x2_t v = WL::load8(r + k);
    vst1q_f32(out + k, v.val[0]);
    vst1q_f32(out + k + 4, v.val[1]);
  }
  for (; k < K; ++k) out[k] = WL::at(r + k);
}

// Row `row` of a block-quantized matrix: d * q per column (exact in f32: an 11-bit scale
// times an integer of at most 8 bits). Gathers the row's 4-byte groups out of the panel.
template <int Bits>
void row_q_neon(const void* W, int64_t, int64_t K, int64_t row, float* out) {
  const int64_t Kp = q_padded_k(K), nb = Kp / kQBlock;
  const int64_t block_bytes = q_block_bytes(Bits);
  const uint8_t* panel = static_cast<const uint8_t*>(W) + (row / kQRows) * nb * block_bytes;
  const int64_t r = row % kQRows;
  for (int64_t b = 0; b < nb; ++b) {
    const uint16_t* wd = reinterpret_cast<const uint16_t*>(panel + b * block_bytes);
    const uint8_t* wq = panel + b * block_bytes + kQScaleBytes;
    int8_t qv[kQBlock];
    if (Bits != 8) {
      const int hb = Bits - 4;
      for (int g = 0; g < 4; ++g)
        for (int c = 0; c < 4; ++c) {
          const int64_t byte = 4 * r + c;
          const uint8_t u = wq[64 * g + byte];
          int lo = u & 0x0F, hi = u >> 4;
          if (hb > 0) {  // q6 / q5: the high bits of vectors 2 g and 2 g + 1 (FORMAT.md)
            const int b0 = hb * 2 * g, b1 = hb * (2 * g + 1);
            lo |= ((wq[kQNibbleBytes + 64 * (b0 / 8) + byte] >> (b0 % 8)) & ((1 << hb) - 1)) << 4;
            hi |= ((wq[kQNibbleBytes + 64 * (b1 / 8) + byte] >> (b1 % 8)) & ((1 << hb) - 1)) << 4;
          }
          qv[4 * g + c] = int8_t(lo - q_offset(Bits));
          qv[16 + 4 * g + c] = int8_t(hi - q_offset(Bits));
        }
    } else {
      for (int g = 0; g < 8; ++g)
        for (int c = 0; c < 4; ++c) qv[4 * g + c] = int8_t(wq[64 * g + 4 * r + c] ^ 0x80);
    }
    const float scale = f16_to_f32(wd[r]);
    const int64_t n = std::min<int64_t>(kQBlock, K - b * kQBlock);
    float vals[kQBlock];
    for (int i = 0; i < kQBlock; i += 8) {
      const int16x8_t w16 = vmovl_s8(vld1_s8(qv + i));
      vst1q_f32(vals + i, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(w16))), scale));
      vst1q_f32(vals + i + 4, vmulq_n_f32(vcvtq_f32_s32(vmovl_high_s16(w16)), scale));
    }
    std::memcpy(out + b * kQBlock, vals, size_t(n) * sizeof(float));
  }
}

// ----------------------------------------------------------------------------- element-wise ops

// Sum of squares in double as in rmsnorm_ref (an f32 product is exact in f64, so the fma
// is the reference's multiply-add); only the order of the f64 additions differs, so the
// scale almost always rounds to the same float, and y = (x * inv) * w is the same arithmetic.
void rmsnorm_neon(const float* x, const float* w, int64_t n, float eps, float* y) {
  float64x2_t a0 = vdupq_n_f64(0.0), a1 = vdupq_n_f64(0.0);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const float32x4_t v = vld1q_f32(x + i);
    const float64x2_t lo = vcvt_f64_f32(vget_low_f32(v)), hi = vcvt_high_f64_f32(v);
    a0 = vfmaq_f64(a0, lo, lo);
    a1 = vfmaq_f64(a1, hi, hi);
  }
  double ss = vaddvq_f64(vaddq_f64(a0, a1));
  for (; i < n; ++i) ss += double(x[i]) * double(x[i]);
  const float inv = float(1.0 / std::sqrt(ss / double(n) + double(eps)));
  i = 0;
  for (; i + 4 <= n; i += 4)
    vst1q_f32(y + i, vmulq_f32(vmulq_n_f32(vld1q_f32(x + i), inv), vld1q_f32(w + i)));
  for (; i < n; ++i) y[i] = (x[i] * inv) * w[i];
}

// Rotate-half RoPE, 4 pairs at a time; separate multiplies and adds (no fma) as written in rope_ref.
void rope_neon(float* x, int64_t n_heads, int64_t hd, const float* cos, const float* sin) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < n_heads; ++h) {
    float* v = x + h * hd;
    int64_t j = 0;
    for (; j + 4 <= half; j += 4) {
      const float32x4_t a = vld1q_f32(v + j), b = vld1q_f32(v + j + half);
      const float32x4_t c = vld1q_f32(cos + j), s = vld1q_f32(sin + j);
      vst1q_f32(v + j, vsubq_f32(vmulq_f32(a, c), vmulq_f32(b, s)));
      vst1q_f32(v + j + half, vaddq_f32(vmulq_f32(b, c), vmulq_f32(a, s)));
    }
    for (; j < half; ++j) {
      const float a = v[j], b = v[j + half];
      v[j] = a * cos[j] - b * sin[j];
      v[j + half] = b * cos[j] + a * sin[j];
    }
  }
}

// exp(x) on 4 lanes: x = n ln2 + r with |r| <= ln2/2, exp(r) by a degree-5 polynomial,
// 2^n put into the exponent bits. The algorithm and coefficients of Arm's
// optimized-routines v_expf (polynomial error 1.45 ulp + 0.5 ulp of rounding; subnormal
// results and overflow to inf handled by splitting 2^n). Measured under qemu against
// double-precision exp on every 97th float in [-104, 104]: at most 1.875 ulp (libm's
// expf: 0.501). x is first clamped to [-104, 104], where exp is already 0 or inf in f32,
// so that +-inf inputs give inf and 0, not NaN.
inline float32x4_t exp_neon(float32x4_t x) {
  x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-104.0f)), vdupq_n_f32(104.0f));
  const float32x4_t shift = vdupq_n_f32(0x1.8p23f);
  const float32x4_t z = vfmaq_f32(shift, x, vdupq_n_f32(0x1.715476p+0f));  // round(x / ln2) in the low bits
  const float32x4_t n = vsubq_f32(z, shift);
  float32x4_t r = vfmaq_f32(x, n, vdupq_n_f32(-0x1.62e4p-1f));  // ln2, hi and lo parts
  r = vfmaq_f32(r, n, vdupq_n_f32(-0x1.7f7d1cp-20f));
  const uint32x4_t e = vshlq_n_u32(vreinterpretq_u32_f32(z), 23);
  const float32x4_t scale = vreinterpretq_f32_u32(vaddq_u32(e, vdupq_n_u32(0x3f800000)));
  const float32x4_t r2 = vmulq_f32(r, r);
  const float32x4_t p = vfmaq_f32(vdupq_n_f32(0x1.573e2ep-5f), vdupq_n_f32(0x1.0e4020p-7f), r);
  float32x4_t qq = vfmaq_f32(vdupq_n_f32(0x1.fffdb6p-2f), vdupq_n_f32(0x1.555e66p-3f), r);
  qq = vfmaq_f32(qq, p, r2);
  const float32x4_t poly = vfmaq_f32(vmulq_f32(vdupq_n_f32(0x1.ffffecp-1f), r), qq, r2);  // exp(r) - 1
  const uint32x4_t big = vcagtq_f32(n, vdupq_n_f32(126.0f));
  if (vmaxvq_u32(big) == 0) return vfmaq_f32(scale, poly, scale);
  // |n| > 126: 2^n is not a normal float; build it as s1 * s2.
  const uint32x4_t b = vandq_u32(vclezq_f32(n), vdupq_n_u32(0x82000000u));
  const float32x4_t s1 = vreinterpretq_f32_u32(vaddq_u32(vdupq_n_u32(0x7f000000u), b));
  const float32x4_t s2 = vreinterpretq_f32_u32(vsubq_u32(e, b));
  const uint32x4_t huge = vcagtq_f32(n, vdupq_n_f32(192.0f));
  const uint32x4_t r_huge = vreinterpretq_u32_f32(vmulq_f32(s1, s1));
  const uint32x4_t r_big = vreinterpretq_u32_f32(vmulq_f32(vfmaq_f32(s2, poly, s2), s1));
  const uint32x4_t r_norm = vreinterpretq_u32_f32(vfmaq_f32(scale, poly, scale));
  return vreinterpretq_f32_u32(
      vbslq_u32(huge, r_huge, vbslq_u32(big, r_big, r_norm)));
}

inline float dot_neon(const float* a, const float* b, int64_t n) {
  float32x4_t s0 = vdupq_n_f32(0.0f), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
    s1 = vfmaq_f32(s1, vld1q_f32(a + i + 4), vld1q_f32(b + i + 4));
    s2 = vfmaq_f32(s2, vld1q_f32(a + i + 8), vld1q_f32(b + i + 8));
    s3 = vfmaq_f32(s3, vld1q_f32(a + i + 12), vld1q_f32(b + i + 12));
  }
  for (; i + 4 <= n; i += 4) s0 = vfmaq_f32(s0, vld1q_f32(a + i), vld1q_f32(b + i));
  float s = vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Online softmax exactly as attention_ref (one pass, running max m and normaliser l); the
// q.k dot and the rescale / accumulate over head_dim are vectorized. The exps are one per
// key (std::exp, as the reference), not worth a vector exp.
void attention_neon(const float* q, const float* k, const float* v, int64_t n_kv, int64_t hd, float scale,
                    float* out) {
  thread_local std::vector<float> acc_buf;
  acc_buf.assign(size_t(hd), 0.0f);
  float* acc = acc_buf.data();
  float m = -INFINITY, l = 0.0f;
  for (int64_t s = 0; s < n_kv; ++s) {
    const float score = dot_neon(q, k + s * hd, hd) * scale;
    if (score > m) {
      const float corr = std::exp(m - score);  // exp(-inf) = 0 on the first key
      l *= corr;
      int64_t d = 0;
      for (; d + 4 <= hd; d += 4) vst1q_f32(acc + d, vmulq_n_f32(vld1q_f32(acc + d), corr));
      for (; d < hd; ++d) acc[d] *= corr;
      m = score;
    }
    const float p = std::exp(score - m);
    l += p;
    const float* vs = v + s * hd;
    int64_t d = 0;
    for (; d + 4 <= hd; d += 4) vst1q_f32(acc + d, vfmaq_n_f32(vld1q_f32(acc + d), vld1q_f32(vs + d), p));
    for (; d < hd; ++d) acc[d] += p * vs[d];
  }
  const float inv = 1.0f / l;
  int64_t d = 0;
  for (; d + 4 <= hd; d += 4) vst1q_f32(out + d, vmulq_n_f32(vld1q_f32(acc + d), inv));
  for (; d < hd; ++d) out[d] = acc[d] * inv;
}

// Flash attention over a tile (kernels.h, attention_tile_fn): query rows (t-major) in blocks
// of kQB, keys in blocks of kKB. Each key row is loaded once for all query rows of the block
// (scores), then each row's online-softmax state moves to the block's max, and each value
// row is loaded once for all query rows. Same result as attention_neon row by row up to
// rounding: the max moves per block instead of per key, and exp is exp_neon. Key blocks
// start at multiples of kKB from position 0 whatever the tile holds (a row's result does not
// depend on the other rows), and kKB divides the KV block size, so the kKB keys of a step
// are contiguous rows of one KV block. E: the cache's element type (float, or uint16_t
// binary16 widened exactly).
inline float32x4_t load_kv4(const float* p) { return vld1q_f32(p); }
inline float32x4_t load_kv4(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }

template <typename E>
void attention_tile_neon_typed(const float* q, int64_t ldq, int64_t n_tok, int64_t n_grp, int64_t pos0,
                               const KvView& kv, int64_t hd, float scale, float* out, int64_t ldo) {
  constexpr int kQB = 4, kKB = 16;
  static_assert(kKvAlign % kKB == 0, "a key block must not cross a KV block");
  constexpr int64_t kMaxHd = 256;
  const E* kbase = static_cast<const E*>(kv.k);
  const E* vbase = static_cast<const E*>(kv.v);
  const int64_t nv = hd / 4, rows = n_tok * n_grp;
  for (int64_t r0 = 0; r0 < rows; r0 += kQB) {
    const int nr = int(std::min<int64_t>(kQB, rows - r0));
    float qs[kQB][kMaxHd];  // scaled queries, broadcast element by element
    float32x4_t acc[kQB][kMaxHd / 4];
    float m[kQB], l[kQB];
    int64_t last[kQB];  // the last key each row may see (causal)
    for (int i = 0; i < nr; ++i) {
      const int64_t t = (r0 + i) / n_grp, g = (r0 + i) % n_grp;
      for (int64_t c = 0; c < nv; ++c) {
        vst1q_f32(&qs[i][4 * c], vmulq_n_f32(vld1q_f32(q + t * ldq + g * hd + 4 * c), scale));
        acc[i][c] = vdupq_n_f32(0.0f);
      }
      m[i] = -INFINITY;
      l[i] = 0.0f;
      last[i] = pos0 + t;
    }
    const int64_t n_keys = last[nr - 1] + 1;  // rows are t-major: the last row sees the most
    for (int64_t s0 = 0; s0 < n_keys; s0 += kKB) {
      const int ns = int(std::min<int64_t>(kKB, n_keys - s0));
      const int64_t off = int64_t(kv.table[s0 / kv.block]) * kv.stride + (s0 % kv.block) * hd;
      // The 16 keys' element d is one run of 16 (kernels.h, KvView): 16 scores per row are hd
      // multiply-adds of four vectors, no horizontal sums.
      float32x4_t sc[kQB][4];
      for (int i = 0; i < kQB; ++i)
        for (int c = 0; c < 4; ++c) sc[i][c] = vdupq_n_f32(0.0f);
      for (int64_t d = 0; d < hd; ++d) {
        const E* kd = kbase + off + d * kKB;
        const float32x4_t k0 = load_kv4(kd), k1 = load_kv4(kd + 4), k2 = load_kv4(kd + 8), k3 = load_kv4(kd + 12);
        for (int i = 0; i < nr; ++i) {
          const float qd = qs[i][d];
          sc[i][0] = vfmaq_n_f32(sc[i][0], k0, qd);
          sc[i][1] = vfmaq_n_f32(sc[i][1], k1, qd);
          sc[i][2] = vfmaq_n_f32(sc[i][2], k2, qd);
          sc[i][3] = vfmaq_n_f32(sc[i][3], k3, qd);
        }
      }
      float p[kQB][kKB];
      for (int i = 0; i < nr; ++i)
        for (int c = 0; c < 4; ++c) vst1q_f32(&p[i][4 * c], sc[i][c]);
      int valid[kQB];
      for (int i = 0; i < nr; ++i) {
        valid[i] = int(std::max<int64_t>(0, std::min<int64_t>(ns, last[i] - s0 + 1)));
        if (valid[i] == 0) continue;
        float mx = p[i][0];
        for (int j = 1; j < valid[i]; ++j) mx = std::max(mx, p[i][j]);
        if (mx > m[i]) {
          const float corr = std::exp(m[i] - mx);  // 0 on the first block (m = -inf)
          l[i] *= corr;
          for (int64_t c = 0; c < nv; ++c) acc[i][c] = vmulq_n_f32(acc[i][c], corr);
          m[i] = mx;
        }
        for (int j = valid[i]; j < kKB; ++j) p[i][j] = -INFINITY;  // masked: exp gives 0
        float32x4_t sum = vdupq_n_f32(0.0f);
        for (int j = 0; j < kKB; j += 4) {
          const float32x4_t e = exp_neon(vsubq_f32(vld1q_f32(&p[i][j]), vdupq_n_f32(m[i])));
          vst1q_f32(&p[i][j], e);
          sum = vaddq_f32(sum, e);
        }
        l[i] += vaddvq_f32(sum);
      }
      for (int j = 0; j < ns; ++j) {
        const E* vs = vbase + off + j * hd;
        for (int64_t c = 0; c < nv; ++c) {
          const float32x4_t vc = load_kv4(vs + 4 * c);
          for (int i = 0; i < nr; ++i)
            if (j < valid[i]) acc[i][c] = vfmaq_n_f32(acc[i][c], vc, p[i][j]);
        }
      }
    }
    for (int i = 0; i < nr; ++i) {
      const int64_t t = (r0 + i) / n_grp, g = (r0 + i) % n_grp;
      const float inv = 1.0f / l[i];
      for (int64_t c = 0; c < nv; ++c) vst1q_f32(out + t * ldo + g * hd + 4 * c, vmulq_n_f32(acc[i][c], inv));
    }
  }
}

void attention_tile_neon(const float* q, int64_t ldq, int64_t n_tok, int64_t n_grp, int64_t pos0, const KvView& kv,
                         int64_t hd, float scale, float* out, int64_t ldo) {
  if (hd > 256 || hd % 4 || kv.block % 16)
    attention_tile_ref(q, ldq, n_tok, n_grp, pos0, kv, hd, scale, out, ldo);
  else if (kv.type == KvType::f16)
    attention_tile_neon_typed<uint16_t>(q, ldq, n_tok, n_grp, pos0, kv, hd, scale, out, ldo);
  else
    attention_tile_neon_typed<float>(q, ldq, n_tok, n_grp, pos0, kv, hd, scale, out, ldo);
}

// out = g / (1 + exp(-g)) * up, in the reference's order; the only difference is exp_neon
// (< 2 ulp) against libm's expf: measured, out moves by at most ~5u relative.
void swiglu_neon(const float* gate, const float* up, int64_t n, float* out) {
  const float32x4_t one = vdupq_n_f32(1.0f);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float32x4_t g = vld1q_f32(gate + j);
    const float32x4_t silu = vdivq_f32(g, vaddq_f32(one, exp_neon(vnegq_f32(g))));
    vst1q_f32(out + j, vmulq_f32(silu, vld1q_f32(up + j)));
  }
  for (; j < n; ++j) {
    const float g = gate[j];
    out[j] = g / (1.0f + std::exp(-g)) * up[j];
  }
}

}  // namespace
}  // namespace oelm

namespace oelm {

const KernelTable& neon_kernels() {
  static const KernelTable table = {
      "neon",
      {matmul_f32_neon, matmul_f16_neon, matmul_bf16_neon, nullptr, nullptr, nullptr},
      {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr},  // no bf16 dot products (BFDOT) yet
      {nullptr, nullptr, nullptr, nullptr, qmatmul_q8_neon, qmatmul_q4_neon, qmatmul_q6_neon, qmatmul_q5_neon,
       qmatmul_q4k_neon},
      {row_f32_neon, row_16bit_neon<W_f16>, row_16bit_neon<W_bf16>, nullptr, row_q_neon<8>, row_q_neon<4>,
       row_q_neon<6>, row_q_neon<5>, row_to_f32_q4k_ref},
      quantize_row_neon,
      rmsnorm_neon,
      rope_neon,
      attention_neon,
      attention_tile_neon,
      swiglu_neon,
      nullptr,  // pack_f32: matmul[f32 / f16 / bf16] only
      {},       // matmul_packed
      {},       // matmul_xbf16_packed
  };
  return table;
}

}  // namespace oelm
