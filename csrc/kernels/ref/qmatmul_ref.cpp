// Reference kernels for the block-quantized weight types q8_b32r16i, q6_b32r16i, q5_b32r16i and q4_b32r16i
// (layout: docs/FORMAT.md; contract: kernels.h): activation quantization, the integer
// matmul, and row decoding. Plain loops that read one weight at a time through the
// layout formulas, no intrinsics: the truth the SIMD variants are tested against.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>

#include "common/half.h"
#include "kernels/kernels.h"

namespace oelm {

namespace {

// Start of the panel holding row n: nb = Kp / 32 blocks of BlockBytes.
template <int64_t BlockBytes>
const uint8_t* panel_of(const void* W, int64_t Kp, int64_t n) {
  return static_cast<const uint8_t*>(W) + (n / kQRows) * (Kp / kQBlock) * BlockBytes;
}

// Scale of row r (within its panel), block b: the block's bytes 2 r, 2 r + 1.
template <int64_t BlockBytes>
float scale_at(const uint8_t* panel, int64_t r, int64_t b) {
  uint16_t h;
  std::memcpy(&h, panel + BlockBytes * b + 2 * r, sizeof h);
  return f16_to_f32(h);
}

// Weight integer q of row r, column k = 32 b + c, as FORMAT.md places it.
int32_t q8_at(const uint8_t* panel, int64_t r, int64_t k) {
  const int64_t b = k / kQBlock, c = k % kQBlock;
  return int32_t(panel[kQ8BlockBytes * b + kQScaleBytes + 64 * (c / 4) + 4 * r + c % 4]) - 128;
}

int32_t q4_at(const uint8_t* panel, int64_t r, int64_t k) {
  const int64_t b = k / kQBlock, c = k % kQBlock;
  const uint8_t byte = panel[kQ4BlockBytes * b + kQScaleBytes + 64 * ((c % 16) / 4) + 4 * r + c % 4];
  return int32_t(c < 16 ? byte & 0x0F : byte >> 4) - 8;
}

// q6 / q5 (HB = 2 / 1 high bits): the low 4 bits of u where q4 keeps its nibble; vector
// v = 2 ((c % 16) / 4) + c / 16 (the 64-byte nibble line, low or high nibbles) has its high bits
// at bits [HB v % 8, + HB) of byte 4 r + c % 4 of high line HB v / 8; u = q + 16 << (HB - 1).
template <int HB>
int32_t qhi_at(const uint8_t* panel, int64_t r, int64_t k) {
  constexpr int64_t kBytes = HB == 2 ? kQ6BlockBytes : kQ5BlockBytes;
  const int64_t b = k / kQBlock, c = k % kQBlock, line = (c % 16) / 4, byte = 4 * r + c % 4;
  const uint8_t* blk = panel + kBytes * b + kQScaleBytes;
  const uint8_t nib = blk[64 * line + byte];
  const int32_t lo = c < 16 ? nib & 0x0F : nib >> 4;
  const int64_t bit = HB * (2 * line + c / 16);
  const int32_t hi = (blk[kQNibbleBytes + 64 * (bit / 8) + byte] >> (bit % 8)) & ((1 << HB) - 1);
  return (lo | hi << 4) - (16 << (HB - 1));
}

template <int64_t BlockBytes, int32_t (*QAt)(const uint8_t*, int64_t, int64_t)>
void qmatmul_ref(const QActs& x, int64_t T, const void* W, int64_t N, int64_t n0, int64_t n1, float* y,
                 int64_t ldy) {
  const int64_t Kp = x.Kp, nb = Kp / kQBlock;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* panel = panel_of<BlockBytes>(W, Kp, n);
    const int64_t r = n % kQRows;
    for (int64_t t = 0; t < T; ++t) {
      const int8_t* xq = x.q + t * Kp;
      const float* xd = x.d + t * nb;
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t isum = 0;  // |isum| <= 32 * 127 * 127: exact in int32 and in float
        for (int64_t k = b * kQBlock; k < (b + 1) * kQBlock; ++k) isum += QAt(panel, r, k) * int32_t(xq[k]);
        acc = std::fmaf(float(isum) * xd[b], scale_at<BlockBytes>(panel, r, b), acc);
      }
      y[t * ldy + n] = acc;
    }
  }
}

template <int64_t BlockBytes, int32_t (*QAt)(const uint8_t*, int64_t, int64_t)>
void row_to_f32_quant(const void* W, int64_t N, int64_t K, int64_t row, float* out) {
  const int64_t Kp = q_padded_k(K);
  const uint8_t* panel = panel_of<BlockBytes>(W, Kp, row);
  const int64_t r = row % kQRows;
  // An 11-bit scale times an integer of at most 8 bits: exact in float.
  for (int64_t k = 0; k < K; ++k) out[k] = scale_at<BlockBytes>(panel, r, k / kQBlock) * float(QAt(panel, r, k));
}

// q4k (FORMAT.md): row r of the panel, block b = S * sb + j of super-block sb.
struct Q4kAt {
  const uint8_t* sup;  // the super-block
  int64_t S, r, j;
  float d() const { return f16_at(sup + 2 * r); }
  float dmin() const { return f16_at(sup + 2 * kQRows + 2 * r); }
  int32_t sc() const { return sup[kQ4kHeadBytes + kQ4kScaleBytes * j + r] & 63; }
  int32_t m() const {
    const uint8_t* s = sup + kQ4kHeadBytes + kQ4kScaleBytes * j;
    return (s[r] >> 6) << 4 | ((s[16 + r % 8] >> (4 * (r / 8))) & 15);
  }
  int32_t u(int64_t c) const {  // column c of the block
    const uint8_t byte = sup[kQ4kHeadBytes + kQ4kScaleBytes * S + kQNibbleBytes * j + 64 * ((c % 16) / 4) + 4 * r + c % 4];
    return c < 16 ? byte & 0x0F : byte >> 4;
  }
  static float f16_at(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, sizeof h);
    return f16_to_f32(h);
  }
};

Q4kAt q4k_at(const void* W, int64_t Kp, int64_t n, int64_t b) {
  const int64_t S = q4k_subs(Kp / kQBlock);
  const uint8_t* panel = static_cast<const uint8_t*>(W) + (n / kQRows) * q4k_panel_bytes(Kp);
  return {panel + (b / S) * q4k_super_bytes(S), S, n % kQRows, b % S};
}

}  // namespace

void qmatmul_q4k_ref(const QActs& x, int64_t T, const void* W, int64_t N, int64_t n0, int64_t n1, float* y,
                     int64_t ldy) {
  const int64_t Kp = x.Kp, nb = Kp / kQBlock;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t t = 0; t < T; ++t) {
      const int8_t* xq = x.q + t * Kp;
      const float* xd = x.d + t * nb;
      const int32_t* xs = x.s + t * nb;
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        const Q4kAt w = q4k_at(W, Kp, n, b);
        int32_t isum = 0;  // |isum| <= 32 * 15 * 127
        for (int64_t c = 0; c < kQBlock; ++c) isum += w.u(c) * int32_t(xq[b * kQBlock + c]);
        // An 11-bit d times a 6-bit integer: exact in float, as is dmin * m.
        acc = std::fmaf(float(isum) * xd[b], w.d() * float(w.sc()), acc);
        acc = std::fmaf(float(xs[b]) * xd[b], -(w.dmin() * float(w.m())), acc);
      }
      y[t * ldy + n] = acc;
    }
}

void row_to_f32_q4k_ref(const void* W, int64_t N, int64_t K, int64_t row, float* out) {
  const int64_t Kp = q_padded_k(K);
  for (int64_t k = 0; k < K; ++k) {
    const Q4kAt w = q4k_at(W, Kp, row, k / kQBlock);
    out[k] = w.d() * float(w.sc()) * float(w.u(k % kQBlock)) - w.dmin() * float(w.m());
  }
}

void quantize_row_ref(const float* x, int64_t K, int8_t* q, float* d, int32_t* s) {
  const int64_t Kp = q_padded_k(K);
  for (int64_t b = 0; b < Kp / kQBlock; ++b) {
    const int64_t k0 = b * kQBlock, k1 = std::min(K, k0 + kQBlock);
    float amax = 0.0f;
    bool finite = true;
    for (int64_t k = k0; k < k1; ++k) {
      const float a = std::fabs(x[k]);
      if (!(a <= FLT_MAX)) finite = false;  // NaN or infinity
      else amax = std::max(amax, a);
    }
    int32_t sum = 0;
    if (!finite || !(127.0f / amax <= FLT_MAX)) {  // non-finite (d = NaN), or all zero / tiny (d = 0)
      d[b] = finite ? 0.0f : std::numeric_limits<float>::quiet_NaN();
      for (int64_t k = k0; k < k0 + kQBlock; ++k) q[k] = 0;
    } else {
      d[b] = amax / 127.0f;
      const float inv = 127.0f / amax;
      for (int64_t k = k0; k < k0 + kQBlock; ++k) {
        // |x * inv| <= 127 up to one rounding, so the nearest integer fits in int8.
        q[k] = k < K ? int8_t(std::nearbyint(x[k] * inv)) : int8_t(0);
        sum += q[k];
      }
    }
    s[b] = sum;
  }
}

void qmatmul_q8_ref(const QActs& x, int64_t T, const void* W, int64_t N, int64_t n0, int64_t n1, float* y,
                    int64_t ldy) {
  qmatmul_ref<kQ8BlockBytes, q8_at>(x, T, W, N, n0, n1, y, ldy);
}

void qmatmul_q4_ref(const QActs& x, int64_t T, const void* W, int64_t N, int64_t n0, int64_t n1, float* y,
                    int64_t ldy) {
  qmatmul_ref<kQ4BlockBytes, q4_at>(x, T, W, N, n0, n1, y, ldy);
}

void qmatmul_q6_ref(const QActs& x, int64_t T, const void* W, int64_t N, int64_t n0, int64_t n1, float* y,
                    int64_t ldy) {
  qmatmul_ref<kQ6BlockBytes, qhi_at<2>>(x, T, W, N, n0, n1, y, ldy);
}

void qmatmul_q5_ref(const QActs& x, int64_t T, const void* W, int64_t N, int64_t n0, int64_t n1, float* y,
                    int64_t ldy) {
  qmatmul_ref<kQ5BlockBytes, qhi_at<1>>(x, T, W, N, n0, n1, y, ldy);
}

void row_to_f32_q6_ref(const void* W, int64_t N, int64_t K, int64_t row, float* out) {
  row_to_f32_quant<kQ6BlockBytes, qhi_at<2>>(W, N, K, row, out);
}

void row_to_f32_q5_ref(const void* W, int64_t N, int64_t K, int64_t row, float* out) {
  row_to_f32_quant<kQ5BlockBytes, qhi_at<1>>(W, N, K, row, out);
}

void row_to_f32_q8_ref(const void* W, int64_t N, int64_t K, int64_t row, float* out) {
  row_to_f32_quant<kQ8BlockBytes, q8_at>(W, N, K, row, out);
}

void row_to_f32_q4_ref(const void* W, int64_t N, int64_t K, int64_t row, float* out) {
  row_to_f32_quant<kQ4BlockBytes, q4_at>(W, N, K, row, out);
}

}  // namespace oelm
