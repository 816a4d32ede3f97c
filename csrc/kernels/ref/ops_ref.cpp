// Reference element-wise and attention kernels (RMSNorm, RoPE, attention, SwiGLU,
// row widening) and the reference kernel table.
#include <cmath>
#include <vector>

#include "common/half.h"
#include "kernels/kernels.h"

namespace oelm {

void rmsnorm_ref(const float* x, const float* w, int64_t n, float eps, float* y) {
  // Sum of squares in double: the reference should not be the least accurate path.
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * double(x[i]);
  const float inv = float(1.0 / std::sqrt(ss / double(n) + double(eps)));
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] * inv) * w[i];
}

void rope_ref(float* x, int64_t n_heads, int64_t hd, const float* cos, const float* sin) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < n_heads; ++h) {
    float* v = x + h * hd;
    for (int64_t j = 0; j < half; ++j) {
      const float a = v[j], b = v[j + half];
      // rotate_half(x) = concat(-x[half:], x[:half]); x*cos + rotate_half(x)*sin
      v[j] = a * cos[j] - b * sin[j];
      v[j + half] = b * cos[j] + a * sin[j];
    }
  }
}

namespace {
// Online softmax (flash-attention style): one pass over keys, running max m and normaliser
// l, accumulator rescaled when the max grows; no score vector is stored. key(s) / value(s)
// give position s's rows as f32.
template <typename KeyFn, typename ValueFn>
void attend_row(const float* q, int64_t n_kv, int64_t hd, float scale, float* out, KeyFn key, ValueFn value) {
  thread_local std::vector<float> acc;
  acc.assign(size_t(hd), 0.0f);
  float m = -INFINITY, l = 0.0f;
  for (int64_t s = 0; s < n_kv; ++s) {
    const float* ks = key(s);
    float dot = 0.0f;
    for (int64_t d = 0; d < hd; ++d) dot += q[d] * ks[d];
    const float score = dot * scale;
    if (score > m) {
      const float corr = std::exp(m - score);  // exp(-inf) = 0 on the first key
      l *= corr;
      for (int64_t d = 0; d < hd; ++d) acc[size_t(d)] *= corr;
      m = score;
    }
    const float p = std::exp(score - m);
    l += p;
    const float* vs = value(s);
    for (int64_t d = 0; d < hd; ++d) acc[size_t(d)] += p * vs[d];
  }
  const float inv = 1.0f / l;
  for (int64_t d = 0; d < hd; ++d) out[d] = acc[size_t(d)] * inv;
}

// Position s's value row (row-major) or key (16-position groups, dimension-major) of a paged
// cache (kernels.h, KvView) as f32, in buf.
float kv_elem(const KvView& kv, const void* base, int64_t at) {
  return kv.type == KvType::f32 ? static_cast<const float*>(base)[at] : f16_to_f32(static_cast<const uint16_t*>(base)[at]);
}
const float* kv_value(const KvView& kv, int64_t s, int64_t hd, float* buf) {
  const int64_t off = int64_t(kv.table[s / kv.block]) * kv.stride + (s % kv.block) * hd;
  for (int64_t d = 0; d < hd; ++d) buf[d] = kv_elem(kv, kv.v, off + d);
  return buf;
}
const float* kv_key(const KvView& kv, int64_t s, int64_t hd, float* buf) {
  const int64_t r = s % kv.block;
  const int64_t off = int64_t(kv.table[s / kv.block]) * kv.stride + (r / kKvAlign) * kKvAlign * hd + r % kKvAlign;
  for (int64_t d = 0; d < hd; ++d) buf[d] = kv_elem(kv, kv.k, off + d * kKvAlign);
  return buf;
}
}  // namespace

void attention_ref(const float* q, const float* k, const float* v, int64_t n_kv, int64_t hd,
                   float scale, float* out) {
  attend_row(q, n_kv, hd, scale, out, [&](int64_t s) { return k + s * hd; }, [&](int64_t s) { return v + s * hd; });
}

void attention_tile_ref(const float* q, int64_t ldq, int64_t n_tok, int64_t n_grp, int64_t pos0, const KvView& kv,
                        int64_t hd, float scale, float* out, int64_t ldo) {
  std::vector<float> kb(static_cast<size_t>(hd)), vb(static_cast<size_t>(hd));
  for (int64_t t = 0; t < n_tok; ++t)
    for (int64_t g = 0; g < n_grp; ++g)
      attend_row(q + t * ldq + g * hd, pos0 + t + 1, hd, scale, out + t * ldo + g * hd,
                 [&](int64_t s) { return kv_key(kv, s, hd, kb.data()); },
                 [&](int64_t s) { return kv_value(kv, s, hd, vb.data()); });
}

void swiglu_ref(const float* gate, const float* up, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const float g = gate[j];
    out[j] = g / (1.0f + std::exp(-g)) * up[j];  // SiLU(g) * up
  }
}

namespace {
void row_f32(const void* W, int64_t, int64_t K, int64_t row, float* out) {
  const float* r = static_cast<const float*>(W) + row * K;
  for (int64_t i = 0; i < K; ++i) out[i] = r[i];
}
template <float (*Widen)(uint16_t)>
void row_16bit(const void* W, int64_t, int64_t K, int64_t row, float* out) {
  const uint16_t* r = static_cast<const uint16_t*>(W) + row * K;
  for (int64_t i = 0; i < K; ++i) out[i] = Widen(r[i]);
}
}  // namespace

const KernelTable& ref_kernels() {
  static const KernelTable table = {
      "ref",
      {matmul_f32_ref, matmul_f16_ref, matmul_bf16_ref, nullptr, nullptr, nullptr},
      {nullptr, nullptr, matmul_bf16_xbf16_ref, nullptr, nullptr, nullptr},
      {nullptr, nullptr, nullptr, nullptr, qmatmul_q8_ref, qmatmul_q4_ref, qmatmul_q6_ref, qmatmul_q5_ref,
       qmatmul_q4k_ref},
      {row_f32, row_16bit<f16_to_f32>, row_16bit<bf16_to_f32>, nullptr, row_to_f32_q8_ref, row_to_f32_q4_ref,
       row_to_f32_q6_ref, row_to_f32_q5_ref, row_to_f32_q4k_ref},
      quantize_row_ref,
      rmsnorm_ref,
      rope_ref,
      attention_ref,
      attention_tile_ref,
      swiglu_ref,
      nullptr,  // pack_f32: matmul[f32 / f16 / bf16] only
      {},       // matmul_packed
      {},       // matmul_xbf16_packed
  };
  return table;
}

}  // namespace oelm
