// Reference matmul y = x @ W^T for f32, f16 and bf16 weights.
// Plain loops with eight independent partial sums: the compiler keeps them in
// vector lanes without reassociating anything, so results are reproducible and
// identical for any split of the output rows across threads.
#include <algorithm>
#include <vector>

#include "common/half.h"
#include "kernels/kernels.h"

namespace oelm {

namespace {

inline float dot_ref(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

// Rows of W are processed in blocks: for each token, the block's rows are dotted with
// that token's activations. The block (kRowBlock x K weights) stays in cache while all
// tokens pass over it, so a prefill reads W once instead of re-reading x per row.
constexpr int64_t kRowBlock = 16;

template <typename RowPtr>
void matmul_blocked(const float* x, int64_t T, int64_t K, RowPtr row, int64_t n0, int64_t n1, float* y,
                    int64_t ldy) {
  for (int64_t nb = n0; nb < n1; nb += kRowBlock) {
    const int64_t ne = std::min(n1, nb + kRowBlock);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = nb; n < ne; ++n) y[t * ldy + n] = dot_ref(x + t * K, row(nb, n), K);
  }
}

// dot_ref with the 16-bit operand widened on the fly. Widening is exact, so this is
// the same arithmetic in the same order as widening first: results are bitwise equal.
template <float (*Widen)(uint16_t)>
inline float dot_widen(const float* a, const uint16_t* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * Widen(b[i + j]);
  float tail = 0;
  for (; i < n; ++i) tail += a[i] * Widen(b[i]);
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
}

// Up to this many tokens (decode), each weight is widened inside the dot product;
// beyond it (prefill), a widened block is reused by enough tokens to pay for itself.
constexpr int64_t kWidenInDotMaxTokens = 4;

// 16-bit weights: widen a block of rows to f32 once, then reuse it for every token.
template <float (*Widen)(uint16_t)>
void matmul_16bit(const float* x, int64_t T, int64_t K, const void* W, int64_t n0, int64_t n1,
                  float* y, int64_t ldy) {
  const uint16_t* w = static_cast<const uint16_t*>(W);
  if (T <= kWidenInDotMaxTokens) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t t = 0; t < T; ++t) y[t * ldy + n] = dot_widen<Widen>(x + t * K, w + n * K, K);
    return;
  }
  thread_local std::vector<float> block;
  block.resize(size_t(kRowBlock * K));
  for (int64_t nb = n0; nb < n1; nb += kRowBlock) {
    const int64_t ne = std::min(n1, nb + kRowBlock);
    for (int64_t n = nb; n < ne; ++n)
      for (int64_t k = 0; k < K; ++k) block[size_t((n - nb) * K + k)] = Widen(w[n * K + k]);
    matmul_blocked(x, T, K, [&](int64_t b, int64_t n) { return block.data() + (n - b) * K; }, nb, ne, y, ldy);
  }
}

}  // namespace

// bf16 activations and weights: both widened exactly, then the f32 reference dot product.
void matmul_bf16_xbf16_ref(const uint16_t* x, int64_t T, int64_t K, const void* W, int64_t n0, int64_t n1,
                           float* y, int64_t ldy) {
  const uint16_t* w = static_cast<const uint16_t*>(W);
  std::vector<float> xf(static_cast<size_t>(K));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) xf[size_t(k)] = bf16_to_f32(x[t * K + k]);
    for (int64_t n = n0; n < n1; ++n) y[t * ldy + n] = dot_widen<bf16_to_f32>(xf.data(), w + n * K, K);
  }
}

void matmul_f32_ref(const float* x, int64_t T, int64_t K, const void* W, int64_t n0, int64_t n1,
                    float* y, int64_t ldy) {
  const float* w = static_cast<const float*>(W);
  matmul_blocked(x, T, K, [&](int64_t, int64_t n) { return w + n * K; }, n0, n1, y, ldy);
}

void matmul_f16_ref(const float* x, int64_t T, int64_t K, const void* W, int64_t n0, int64_t n1,
                    float* y, int64_t ldy) {
  matmul_16bit<f16_to_f32>(x, T, K, W, n0, n1, y, ldy);
}

void matmul_bf16_ref(const float* x, int64_t T, int64_t K, const void* W, int64_t n0, int64_t n1,
                     float* y, int64_t ldy) {
  matmul_16bit<bf16_to_f32>(x, T, K, W, n0, n1, y, ldy);
}

}  // namespace oelm
