// cuda_check: the CUDA backend against the CPU. Every kernel of csrc/cuda/cuda_kernels.h
// against its scalar reference (kernels/ref/) on fresh random inputs -- odd sizes, every
// weight matrix shape of the four OpenELM sizes (openelm_shapes.inc), outputs poisoned with
// NaN first so that an element a kernel fails to write cannot pass -- and then, for every
// .oelm file in the directories given, the whole model: logits of the CUDA executor against
// the CPU backend's (exact f32 activations), greedy tokens equal, and a sequence's logits
// bit for bit the same alone and batched with another.
//
//   cuda_check [--quick] [MODEL_DIR_OR_FILE ...]
//
// --quick leaves out the OpenELM matrix shapes (compute-sanitizer runs it: 10-100x slower).
//
// Exits 0 when everything passed, 1 on a failure, and 77 (ctest's "skipped") with a "SKIP"
// line where no CUDA device is usable (CI builds and runs it so; benchmarks/cuda_check.sh runs
// it on a GPU).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cinttypes>
#include <cstdarg>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <string>
#include <sys/stat.h>
#include <thread>
#include <vector>

#include "common/error.h"
#include "common/half.h"
#include "cuda/cuda_kernels.h"
#include "engine/runtime.h"
#include "kernels/kernels.h"
#include "model/cuda.h"
#include "rng.h"

using namespace oelm;

namespace {

constexpr double kU = 0x1p-24;  // unit roundoff of f32


// ------------------------------------------------------------------------- device buffers

template <typename T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) {
    OELM_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p), std::max<size_t>(n, 1) * sizeof(T)));
    OELM_CUDA_CHECK(cudaMemset(p, 0xFF, std::max<size_t>(n, 1) * sizeof(T)));  // poison: NaN for floats
  }
  explicit Dev(const std::vector<T>& h) : Dev(h.size()) { put(h); }
  ~Dev() { cudaFree(p); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  void put(const std::vector<T>& h) {
    OELM_CUDA_CHECK(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> get() const {
    OELM_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<T> h(n);
    OELM_CUDA_CHECK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
};

// ---------------------------------------------------------------------------------- report

int64_t g_cases = 0, g_failed = 0;

// |got - want| <= tol[i] (tol empty: bitwise) for every element; one call is one case.
bool compare(const std::string& what, const std::vector<float>& got, const std::vector<float>& want,
             const std::vector<double>& tol) {
  ++g_cases;
  int64_t bad = 0, first = -1;
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    bool ok;
    if (tol.empty()) {
      ok = std::memcmp(&got[i], &want[i], 4) == 0;
    } else {
      const double err = std::fabs(double(got[i]) - double(want[i]));
      ok = err <= tol[i];  // false for NaN (an unwritten, poisoned element)
      if (ok && tol[i] > 0) worst = std::max(worst, err / tol[i]);
    }
    if (!ok && bad++ == 0) first = int64_t(i);
  }
  if (got.size() != want.size()) bad = std::max<int64_t>(bad, 1);
  if (bad) {
    ++g_failed;
    std::printf("FAIL %s: %" PRId64 " of %zu differ; first at %" PRId64 ": got %.9g want %.9g tol %.3g\n",
                what.c_str(), bad, want.size(), first, first >= 0 ? double(got[size_t(first)]) : 0.0,
                first >= 0 ? double(want[size_t(first)]) : 0.0, (first >= 0 && !tol.empty()) ? tol[size_t(first)] : 0.0);
  }
  return bad == 0;
}

bool expect(const std::string& what, bool ok) {
  ++g_cases;
  if (!ok) {
    ++g_failed;
    std::printf("FAIL %s\n", what.c_str());
  }
  return ok;
}

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

// ---------------------------------------------------------------------------- weight data

// Random bytes of a weight matrix [N, K] of dtype dt, as the file stores it: finite values
// for the float types; for q8 / q4 random integers in range and random binary16 scales.
std::vector<uint8_t> random_weights(Rng& r, DType dt, int64_t N, int64_t K) {
  uint64_t bytes = 0;
  if (!tensor_bytes(dt, {N, K}, &bytes)) throw std::logic_error("bad weight shape");
  std::vector<uint8_t> w(static_cast<size_t>(bytes));
  if (dt == DType::f32) {
    for (size_t i = 0; i < w.size() / 4; ++i) {
      const float f = r.uniform(-1.0f, 1.0f);
      std::memcpy(&w[4 * i], &f, 4);
    }
  } else if (dt == DType::f16 || dt == DType::bf16) {
    for (size_t i = 0; i < w.size() / 2; ++i) {
      const float f = r.uniform(-1.0f, 1.0f);
      const uint16_t h = dt == DType::f16 ? f32_to_f16(f) : f32_to_bf16(f);
      std::memcpy(&w[2 * i], &h, 2);
    }
  } else {
    const int64_t BB = dt == DType::q8 ? kQ8BlockBytes : kQ4BlockBytes;
    for (size_t i = 0; i < w.size(); ++i) w[i] = uint8_t(dt == DType::q8 ? 1 + r.below(255) : r.below(256));
    for (size_t b = 0; b < w.size() / size_t(BB); ++b)  // every block's 16 scales: finite binary16
      for (int64_t s = 0; s < kQRows; ++s) {
        const uint16_t h = f32_to_f16(r.uniform(-0.05f, 0.05f));
        std::memcpy(&w[b * size_t(BB) + size_t(2 * s)], &h, 2);
      }
  }
  return w;
}

const char* dt_name(DType t) { return dtype_name(t); }

// ------------------------------------------------------------------------- kernel checks

void check_embed(Rng& r) {
  for (DType dt : {DType::f32, DType::f16, DType::bf16, DType::q8, DType::q4})
    for (int64_t D : {int64_t(1), int64_t(33), int64_t(1280), int64_t(2048)}) {
      const int64_t V = 37, T = 9;
      const std::vector<uint8_t> W = random_weights(r, dt, V, D);
      std::vector<int32_t> tok(static_cast<size_t>(T));
      for (auto& t : tok) t = int32_t(r.below(V));
      Dev<uint8_t> dW(W);
      Dev<int32_t> dtok(tok);
      Dev<float> dx(static_cast<size_t>(T * D));
      cuda::embed(dW.p, dt, V, D, dtok.p, T, dx.p, nullptr);
      std::vector<float> want(static_cast<size_t>(T * D));
      for (int64_t t = 0; t < T; ++t) ref_kernels().row_to_f32[int(dt)](W.data(), V, D, tok[size_t(t)], &want[size_t(t * D)]);
      compare(fmt("embed %s D=%" PRId64, dt_name(dt), D), dx.get(), want, {});
    }
}

void check_rmsnorm(Rng& r) {
  for (int64_t D : {int64_t(1), int64_t(33), int64_t(1280), int64_t(3072)}) {
    const int64_t T = 7, n = 4;
    std::vector<float> x(static_cast<size_t>(T * D)), w(static_cast<size_t>(D));
    for (auto& v : x) v = r.uniform(-3.0f, 3.0f);
    for (auto& v : w) v = r.uniform(-2.0f, 2.0f);
    std::vector<int32_t> rows = {6, 0, 3, 3};
    Dev<float> dx(x), dw(w), dy(static_cast<size_t>(n * D));
    Dev<int32_t> drows(rows);
    cuda::rmsnorm_rows(dx.p, D, drows.p, n, dw.p, D, 1e-6f, dy.p, D, nullptr);
    std::vector<float> want(static_cast<size_t>(n * D));
    std::vector<double> tol(want.size());
    for (int64_t i = 0; i < n; ++i) rmsnorm_ref(&x[size_t(rows[size_t(i)] * D)], w.data(), D, 1e-6f, &want[size_t(i * D)]);
    // The same double sum in another order: inv may differ by one rounding; then two products.
    for (size_t i = 0; i < want.size(); ++i) tol[i] = 4 * kU * std::fabs(want[i]);
    compare(fmt("rmsnorm rows D=%" PRId64, D), dy.get(), want, tol);
    // In place, all rows.
    cuda::rmsnorm_rows(dx.p, D, nullptr, T, dw.p, D, 1e-5f, dx.p, D, nullptr);
    std::vector<float> want2(x.size());
    std::vector<double> tol2(x.size());
    for (int64_t t = 0; t < T; ++t) rmsnorm_ref(&x[size_t(t * D)], w.data(), D, 1e-5f, &want2[size_t(t * D)]);
    for (size_t i = 0; i < want2.size(); ++i) tol2[i] = 4 * kU * std::fabs(want2[i]);
    compare(fmt("rmsnorm in place D=%" PRId64, D), dx.get(), want2, tol2);
  }
}

void check_swiglu(Rng& r) {
  for (int64_t F : {int64_t(1), int64_t(77), int64_t(5120)}) {
    const int64_t T = 5;
    std::vector<float> gu(static_cast<size_t>(T * 2 * F));
    for (auto& v : gu) v = r.uniform(-12.0f, 12.0f);
    Dev<float> dgu(gu), dact(static_cast<size_t>(T * F));
    cuda::swiglu(dgu.p, T, F, dact.p, nullptr);
    std::vector<float> want(static_cast<size_t>(T * F));
    std::vector<double> tol(want.size());
    for (int64_t t = 0; t < T; ++t) swiglu_ref(&gu[size_t(t * 2 * F)], &gu[size_t(t * 2 * F + F)], F, &want[size_t(t * F)]);
    for (size_t i = 0; i < want.size(); ++i) tol[i] = 8 * kU * std::fabs(want[i]) + 1e-37;  // expf: 2 ulp
    compare(fmt("swiglu F=%" PRId64, F), dact.get(), want, tol);
  }
}

void check_quantize(Rng& r) {
  for (int64_t K : {int64_t(1), int64_t(31), int64_t(32), int64_t(33), int64_t(1280), int64_t(3000)}) {
    const int64_t T = 6, Kp = q_padded_k(K), nb = Kp / kQBlock;
    std::vector<float> x(static_cast<size_t>(T * K));
    for (int64_t t = 0; t < T; ++t) {
      const float mag = std::ldexp(1.0f, int(r.below(20)) - 10);
      for (int64_t k = 0; k < K; ++k) x[size_t(t * K + k)] = mag * r.uniform(-1.0f, 1.0f);
      if (t % 3 == 1) std::fill(x.begin() + t * K, x.begin() + t * K + std::min<int64_t>(K, 32), 0.0f);
      if (t % 3 == 2) x[size_t(t * K + r.below(K))] = -2 * mag;
      if (t == 5) for (int64_t k = 0; k < K; ++k) x[size_t(t * K + k)] = float(k % 5) - 2.0f;  // ties x.5 after scaling
    }
    Dev<float> dx(x), dd(static_cast<size_t>(T * nb));
    Dev<int8_t> dq(static_cast<size_t>(T * Kp));
    cuda::quantize_rows(dx.p, T, K, dq.p, dd.p, nullptr);
    std::vector<int8_t> q(static_cast<size_t>(T * Kp));
    std::vector<float> d(static_cast<size_t>(T * nb));
    std::vector<int32_t> s(static_cast<size_t>(T * nb));
    for (int64_t t = 0; t < T; ++t) quantize_row_ref(&x[size_t(t * K)], K, &q[size_t(t * Kp)], &d[size_t(t * nb)], &s[size_t(t * nb)]);
    const std::vector<int8_t> gq = dq.get();
    std::vector<float> gqf(gq.begin(), gq.end()), qf(q.begin(), q.end());
    compare(fmt("quantize q K=%" PRId64, K), gqf, qf, {});
    compare(fmt("quantize d K=%" PRId64, K), dd.get(), d, {});
  }
}

// fn(n0, n1) over [0, N) in chunks of whole 16-row panels, one thread per chunk.
template <typename Fn>
void parallel_rows(int64_t N, Fn fn) {
  const int64_t threads = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t chunk = std::max<int64_t>(kQRows, ((N + threads - 1) / threads + kQRows - 1) / kQRows * kQRows);
  std::vector<std::thread> pool;
  for (int64_t n0 = 0; n0 < N; n0 += chunk) pool.emplace_back(fn, n0, std::min(N, n0 + chunk));
  for (std::thread& t : pool) t.join();
}

// y = x W^T (+ y0) for T tokens against the reference; every output column checked, the
// columns past N (ldy = N + 3) must keep their poison... which is NaN: they are compared as
// "still NaN".
void matmul_case(Rng& r, DType dt, int64_t N, int64_t K, int64_t T, bool accumulate, const char* label) {
  const std::vector<uint8_t> W = random_weights(r, dt, N, K);
  std::vector<float> x(static_cast<size_t>(T * K));
  for (auto& v : x) v = r.uniform(-1.0f, 1.0f);
  const int64_t ldy = N + 3;
  std::vector<float> y0(static_cast<size_t>(T * ldy), std::nanf(""));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = 0; n < N; ++n) y0[size_t(t * ldy + n)] = accumulate ? r.uniform(-4.0f, 4.0f) : std::nanf("");
  Dev<uint8_t> dW(W);
  Dev<float> dx(x), dy(y0);
  Dev<uint8_t> scratch(static_cast<size_t>(std::max<int64_t>(1, cuda::matmul_scratch_bytes(dt, T, K))));
  cuda::matmul(dx.p, T, K, dW.p, dt, N, dy.p, ldy, accumulate, scratch.p, nullptr);
  const std::vector<float> got = dy.get();

  const bool quant = dtype_is_quantized(dt);
  std::vector<float> ref(static_cast<size_t>(T * N)), want(static_cast<size_t>(T * N)), g(want.size());
  std::vector<double> tol(quant ? 0 : want.size());
  const int64_t Kp = q_padded_k(K), nb = Kp / kQBlock;
  std::vector<int8_t> q(static_cast<size_t>(T * Kp));
  std::vector<float> d(static_cast<size_t>(T * nb));
  std::vector<int32_t> s(static_cast<size_t>(T * nb));
  if (quant)  // the reference's own path: quantize the rows, integer matmul -- bit for bit
    for (int64_t t = 0; t < T; ++t) quantize_row_ref(&x[size_t(t * K)], K, &q[size_t(t * Kp)], &d[size_t(t * nb)], &s[size_t(t * nb)]);
  const QActs acts{q.data(), d.data(), s.data(), Kp};
  // The scalar reference over the rows, on every core (the big OpenELM shapes are GMACs).
  parallel_rows(N, [&](int64_t n0, int64_t n1) {
    if (quant) ref_kernels().qmatmul[int(dt)](acts, T, W.data(), N, n0, n1, ref.data(), N);
    else ref_kernels().matmul[int(dt)](x.data(), T, K, W.data(), n0, n1, ref.data(), N);
    std::vector<float> wrow(static_cast<size_t>(K));
    for (int64_t n = n0; n < n1; ++n) {
      if (!quant) ref_kernels().row_to_f32[int(dt)](W.data(), N, K, n, wrow.data());
      for (int64_t t = 0; t < T; ++t) {
        const size_t i = size_t(t * N + n);
        want[i] = accumulate ? y0[size_t(t * ldy + n)] + ref[i] : ref[i];
        g[i] = got[size_t(t * ldy + n)];
        if (!quant) {  // |error| of a K-term f32 dot product <= 2 K u sum |x_k w_k| (+ the add)
          double mag = 0;
          for (int64_t k = 0; k < K; ++k) mag += std::fabs(double(x[size_t(t * K + k)]) * wrow[size_t(k)]);
          tol[i] = 2.0 * double(K) * kU * mag + 2 * kU * std::fabs(want[i]);
        }
      }
    }
  });
  const std::string what = fmt("matmul %s %s N=%" PRId64 " K=%" PRId64 " T=%" PRId64 "%s", dt_name(dt), label, N, K, T,
                               accumulate ? " +=" : "");
  // q: same integer sums and fma order, and the add of y0 in f32 as the CPU's x += tmp.
  compare(what, g, want, tol);  // q: tol empty, bitwise
  bool pad_ok = true;  // columns N .. ldy-1 untouched
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = N; n < ldy; ++n) pad_ok = pad_ok && std::isnan(got[size_t(t * ldy + n)]);
  expect(what + " writes only its columns", pad_ok);
}

struct Shape {
  const char* model;
  int64_t N, K;
  const char* matrices;
};
const Shape kOpenElmShapes[] = {
#include "openelm_shapes.inc"
};

bool g_quick = false;  // --quick: odd sizes only, not every OpenELM shape (for compute-sanitizer)

void check_matmul(Rng& r) {
  for (DType dt : {DType::f32, DType::f16, DType::bf16, DType::q8, DType::q4}) {
    // Odd sizes and tails: K not a multiple of the 16-byte vector or of 32; N not of 16; T
    // over one and several token chunks.
    for (int64_t K : {int64_t(1), int64_t(7), int64_t(33), int64_t(100), int64_t(256)})
      for (int64_t N : {int64_t(1), int64_t(17), int64_t(40)})
        for (int64_t T : {int64_t(1), int64_t(3), int64_t(8), int64_t(9), int64_t(21)})
          matmul_case(r, dt, N, K, T, (N + T) % 2 == 1, "odd");
    // Every weight matrix shape of the OpenELM sizes, as decode uses them (T = 1; more tokens
    // run the same code per chunk of 8, checked above), with and without the accumulation.
    if (!g_quick)
      for (const Shape& s : kOpenElmShapes) matmul_case(r, dt, s.N, s.K, 1, s.K % 2 == 0, s.model);
  }
}

// q/k norm + RoPE + KV store, and attention over the paged cache, against the reference on
// the same inputs: positions spread over several blocks of a shuffled block table.
void check_attention_layer(Rng& r, int64_t nq, int64_t nkv, int64_t hd, bool qk_norm, KvType kvt, int64_t bs) {
  const int64_t T = 6, max_ctx = 300, n_blocks = (max_ctx + bs - 1) / bs + 3;
  const int64_t nqkv = (nq + 2 * nkv) * hd, half = hd / 2;
  const float eps = 1e-6f, scale = 1.0f / std::sqrt(float(hd));
  const std::string what = fmt("nq=%" PRId64 " nkv=%" PRId64 " hd=%" PRId64 "%s kv=%s bs=%" PRId64, nq, nkv, hd,
                               qk_norm ? " qk_norm" : "", kvt == KvType::f16 ? "f16" : "f32", bs);
  // One sequence: the step's tokens at positions n_past .. n_past + T - 1, the earlier
  // positions already in the cache (written through the same kernel, then checked).
  const int64_t n_past = 200 + r.below(80);
  std::vector<int32_t> table(static_cast<size_t>(n_blocks));
  for (int64_t i = 0; i < n_blocks; ++i) table[size_t(i)] = int32_t(i);
  for (int64_t i = n_blocks - 1; i > 0; --i) std::swap(table[size_t(i)], table[size_t(r.below(i + 1))]);
  std::vector<float> rc(static_cast<size_t>(max_ctx * half)), rs(static_cast<size_t>(max_ctx * half));
  for (int64_t j = 0; j < half; ++j)
    for (int64_t p = 0; p < max_ctx; ++p) {
      const float a = float(p) * float(1.0 / std::pow(10000.0, double(2 * j) / double(hd)));
      rc[size_t(p * half + j)] = std::cos(a);
      rs[size_t(p * half + j)] = std::sin(a);
    }
  std::vector<float> qn(static_cast<size_t>(hd)), kn(static_cast<size_t>(hd));
  for (auto& v : qn) v = r.uniform(0.5f, 1.5f);
  for (auto& v : kn) v = r.uniform(0.5f, 1.5f);
  Dev<float> drc(rc), drs(rs), dqn(qn), dkn(kn);
  Dev<int32_t> dtable(table);
  const size_t cache_elems = size_t(n_blocks * nkv * bs * hd);
  Dev<float> kc32(kvt == KvType::f32 ? cache_elems : 1), vc32(kvt == KvType::f32 ? cache_elems : 1);
  Dev<uint16_t> kc16(kvt == KvType::f16 ? cache_elems : 1), vc16(kvt == KvType::f16 ? cache_elems : 1);
  cuda::DevKv kv{kvt == KvType::f32 ? static_cast<void*>(kc32.p) : kc16.p,
                 kvt == KvType::f32 ? static_cast<void*>(vc32.p) : vc16.p, nkv, bs, kvt};
  // Reference state: every position's rotated key and value (as the cache holds them: f16
  // rounded for an f16 cache).
  std::vector<float> keys(static_cast<size_t>((n_past + T) * nkv * hd)), vals(keys.size());
  auto run_tokens = [&](int64_t p0, int64_t n, bool check) {
    std::vector<float> qkv(static_cast<size_t>(n * nqkv));
    for (auto& v : qkv) v = r.uniform(-2.0f, 2.0f);
    std::vector<int32_t> pos(static_cast<size_t>(n)), sb(static_cast<size_t>(n)), sr(static_cast<size_t>(n)), toff(static_cast<size_t>(n), 0);
    for (int64_t t = 0; t < n; ++t) {
      pos[size_t(t)] = int32_t(p0 + t);
      sb[size_t(t)] = table[size_t((p0 + t) / bs)];
      sr[size_t(t)] = int32_t((p0 + t) % bs);
    }
    Dev<float> dqkv(qkv);
    Dev<int32_t> dpos(pos), dsb(sb), dsr(sr), dtoff(toff);
    cuda::qkv_post(dqkv.p, n, nq, nkv, hd, qk_norm ? dqn.p : nullptr, qk_norm ? dkn.p : nullptr, eps, drc.p, drs.p,
                   dpos.p, dsb.p, dsr.p, kv, nullptr);
    // Reference: per token, norms and RoPE on the q and k heads.
    std::vector<float> want = qkv;
    for (int64_t t = 0; t < n; ++t) {
      float* q = &want[size_t(t * nqkv)];
      float* k = q + nq * hd;
      if (qk_norm) {
        for (int64_t i = 0; i < nq; ++i) rmsnorm_ref(q + i * hd, qn.data(), hd, eps, q + i * hd);
        for (int64_t i = 0; i < nkv; ++i) rmsnorm_ref(k + i * hd, kn.data(), hd, eps, k + i * hd);
      }
      rope_ref(q, nq, hd, &rc[size_t((p0 + t) * half)], &rs[size_t((p0 + t) * half)]);
      rope_ref(k, nkv, hd, &rc[size_t((p0 + t) * half)], &rs[size_t((p0 + t) * half)]);
      for (int64_t i = 0; i < nkv * hd; ++i) {
        float kk = k[i], vv = k[nkv * hd + i];
        if (kvt == KvType::f16) kk = f16_to_f32(f32_to_f16(kk)), vv = f16_to_f32(f32_to_f16(vv));
        keys[size_t((p0 + t) * nkv * hd + i)] = kk;
        vals[size_t((p0 + t) * nkv * hd + i)] = vv;
      }
    }
    const std::vector<float> got = dqkv.get();
    if (check) {
      std::vector<double> tol(want.size());
      // norm: inv within 1 rounding (sum order), RoPE unfused as the reference: a few ulps
      // of the rotated pair's magnitude
      for (size_t i = 0; i < want.size(); ++i) tol[i] = 16 * kU * (std::fabs(want[i]) + 2.0);
      compare("qkv_post " + what, got, want, tol);
    }
    // From here on the reference uses the kernel's q (and the cache holds the kernel's k, v):
    // attention is then checked on identical inputs.
    for (int64_t t = 0; t < n; ++t)
      for (int64_t i = 0; i < nkv * hd; ++i) {
        float kk = got[size_t(t * nqkv + nq * hd + i)], vv = got[size_t(t * nqkv + (nq + nkv) * hd + i)];
        if (kvt == KvType::f16) kk = f16_to_f32(f32_to_f16(kk)), vv = f16_to_f32(f32_to_f16(vv));
        keys[size_t((p0 + t) * nkv * hd + i)] = kk;
        vals[size_t((p0 + t) * nkv * hd + i)] = vv;
      }
    return got;
  };
  for (int64_t p = 0; p < n_past; p += 37) run_tokens(p, std::min<int64_t>(37, n_past - p), p == 0);
  const std::vector<float> qkv = run_tokens(n_past, T, true);

  // The cache's contents, read back through the layout, against the stored values.
  {
    std::vector<float> gk, wk;
    std::vector<float> kcache, vcache;
    if (kvt == KvType::f32) {
      kcache = kc32.get();
      vcache = vc32.get();
    } else {
      for (uint16_t h : kc16.get()) kcache.push_back(f16_to_f32(h));
      for (uint16_t h : vc16.get()) vcache.push_back(f16_to_f32(h));
    }
    for (int64_t p = 0; p < n_past + T; ++p)
      for (int64_t h = 0; h < nkv; ++h)
        for (int64_t d = 0; d < hd; ++d) {
          const size_t at = size_t(((int64_t(table[size_t(p / bs)]) * nkv + h) * bs + p % bs) * hd + d);
          gk.push_back(kcache[at]);
          gk.push_back(vcache[at]);
          wk.push_back(keys[size_t((p * nkv + h) * hd + d)]);
          wk.push_back(vals[size_t((p * nkv + h) * hd + d)]);
        }
    compare("kv store " + what, gk, wk, {});
  }

  // Attention of the step's T tokens.
  std::vector<int32_t> pos(static_cast<size_t>(T)), toff(static_cast<size_t>(T), 0);
  for (int64_t t = 0; t < T; ++t) pos[size_t(t)] = int32_t(n_past + t);
  Dev<float> dq(qkv), dout(static_cast<size_t>(T * nq * hd));
  Dev<int32_t> dpos(pos), dtoff(toff);
  cuda::attention(dq.p, nqkv, T, nq, nkv, hd, scale, dpos.p, dtoff.p, dtable.p, kv, dout.p, nq * hd, nullptr);
  std::vector<float> want(static_cast<size_t>(T * nq * hd));
  std::vector<double> tol(want.size());
  std::vector<float> K1, V1;
  const int64_t group = nq / nkv;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < nq; ++g) {
      const int64_t n_kv = n_past + t + 1, h = g / group;
      K1.assign(size_t(n_kv * hd), 0.0f);
      V1.assign(size_t(n_kv * hd), 0.0f);
      const float* qg = &qkv[size_t(t * nqkv + g * hd)];
      double vmax = 0, smax = 0;
      for (int64_t p = 0; p < n_kv; ++p) {
        double s = 0;
        for (int64_t d = 0; d < hd; ++d) {
          K1[size_t(p * hd + d)] = keys[size_t((p * nkv + h) * hd + d)];
          V1[size_t(p * hd + d)] = vals[size_t((p * nkv + h) * hd + d)];
          vmax = std::max(vmax, double(std::fabs(V1[size_t(p * hd + d)])));
          s += std::fabs(double(qg[d]) * K1[size_t(p * hd + d)]);
        }
        smax = std::max(smax, s * scale);
      }
      float* o = &want[size_t(t * nq * hd + g * hd)];
      attention_ref(qg, K1.data(), V1.data(), n_kv, hd, scale, o);
      // A score is an hd-term dot product (here fused multiply-adds, there not): error <=
      // 2 hd u sum|q k| scale; a softmax weight's relative error is at most twice the largest
      // score error; the weighted sum of n_kv values adds n_kv roundings of the largest value.
      const double tv = vmax * (2 * 2 * double(hd) * kU * smax + 2 * double(n_kv + hd) * kU);
      for (int64_t d = 0; d < hd; ++d) tol[size_t(t * nq * hd + g * hd + d)] = tv;
    }
  compare("attention " + what, dout.get(), want, tol);
}

void check_attention(Rng& r) {
  // The head layouts of the OpenELM sizes (GQA groups 1..4, hd 64) and odd ones.
  check_attention_layer(r, 3, 3, 64, true, KvType::f32, 16);
  check_attention_layer(r, 12, 3, 64, true, KvType::f32, 16);
  check_attention_layer(r, 20, 5, 64, true, KvType::f16, 16);
  check_attention_layer(r, 16, 4, 64, false, KvType::f32, 32);
  check_attention_layer(r, 4, 2, 128, true, KvType::f16, 48);
  check_attention_layer(r, 2, 1, 6, true, KvType::f32, 16);  // hd below a warp
}

// ------------------------------------------------------------------------ whole model

std::vector<std::string> model_files(const std::vector<std::string>& args) {
  std::vector<std::string> out;
  for (const std::string& a : args) {
    struct stat st;
    if (stat(a.c_str(), &st) != 0) {
      std::printf("FAIL %s: no such file or directory\n", a.c_str());
      ++g_failed;
      continue;
    }
    if (!S_ISDIR(st.st_mode)) {
      out.push_back(a);
      continue;
    }
    DIR* d = opendir(a.c_str());
    std::vector<std::string> here;
    while (dirent* e = d ? readdir(d) : nullptr) {
      const std::string n = e->d_name;
      if (n.size() > 5 && n.substr(n.size() - 5) == ".oelm") here.push_back(a + "/" + n);
    }
    if (d) closedir(d);
    std::sort(here.begin(), here.end());
    out.insert(out.end(), here.begin(), here.end());
  }
  return out;
}

// logits of `ids` evaluated in chunks (prefill of `prefill`, then one token at a time), every row.
std::vector<float> run_sequence(Runtime& rt, const std::vector<int32_t>& ids, int64_t prefill) {
  const int64_t V = rt.model().config().vocab_size;
  std::vector<float> out(ids.size() * size_t(V));
  const int32_t seq = rt.seq_new();
  for (int64_t i = 0; i < int64_t(ids.size());) {
    const int64_t n = i == 0 ? prefill : 1;
    rt.eval({{seq, ids.data() + i, n, Runtime::Logits::all}}, out.data() + i * V);
    i += n;
  }
  rt.seq_free(seq);
  return out;
}

void check_model(const std::string& path) {
  std::shared_ptr<Model> model = Model::load(path, false);
  const ModelConfig& c = model->config();
  const int64_t V = c.vocab_size;
  const std::string name = path.substr(path.find_last_of('/') + 1) + " (" + dtype_name(c.weights_dtype) + ")";
  for (KvType kvt : {KvType::f32, KvType::f16}) {
    RuntimeOptions o;
    o.max_context = 256;
    o.kv_type = kvt;
    o.kv_budget_bytes = 4 * kv_block_bytes(c, 16, kvt) * 16 + 1;  // 4 sequences of 256
    auto cpu_b = Backend::create("cpu", 0);
    cpu_b->set_exact(true);
    Runtime cpu(model, cpu_b, o), gpu(model, Backend::create("cuda", 1), o);
    Rng r(42);
    std::vector<int32_t> ids(64);
    for (auto& t : ids) t = int32_t(3 + r.below(V - 3));
    // Greedy continuation on the CPU, then both evaluate the same tokens.
    {
      std::vector<float> last(static_cast<size_t>(V));
      const int32_t s = cpu.seq_new();
      cpu.eval({{s, ids.data(), 48, Runtime::Logits::last}}, last.data());
      for (int i = 48; i < 64; ++i) {
        ids[size_t(i)] = int32_t(std::max_element(last.begin(), last.end()) - last.begin());
        cpu.eval({{s, &ids[size_t(i)], 1, Runtime::Logits::last}}, last.data());
      }
      cpu.seq_free(s);
    }
    const std::vector<float> want = run_sequence(cpu, ids, 48);
    const std::vector<float> got = run_sequence(gpu, ids, 48);
    // Logits: within 1e-3 of the row's largest magnitude for float weights (f32 arithmetic in
    // another order, many layers deep); q8/q4 quantize activations, where one rounding that
    // falls the other way at a tie moves a row by a quantization step: 2e-2.
    const bool quant = dtype_is_quantized(c.weights_dtype);
    std::vector<double> tol(want.size());
    int64_t argmax_diff = 0, near_ties = 0;
    for (size_t row = 0; row < ids.size(); ++row) {
      const float* w = &want[row * size_t(V)];
      const float* g = &got[row * size_t(V)];
      double mx = 0;
      for (int64_t v = 0; v < V; ++v) mx = std::max(mx, double(std::fabs(w[v])));
      const double t = (quant ? 2e-2 : 1e-3) * mx;
      for (int64_t v = 0; v < V; ++v) tol[row * size_t(V) + size_t(v)] = t;
      const int64_t aw = std::max_element(w, w + V) - w, ag = std::max_element(g, g + V) - g;
      if (aw != ag) {
        // a different argmax is acceptable only at a near tie (gap within the tolerance)
        if (std::fabs(double(w[aw]) - double(w[ag])) <= 2 * t) ++near_ties;
        else ++argmax_diff;
      }
    }
    const std::string kvn = kvt == KvType::f16 ? " kv f16" : " kv f32";
    compare("model logits " + name + kvn, got, want, tol);
    expect(fmt("model greedy tokens %s%s: %" PRId64 " rows differ beyond a near tie (%" PRId64 " near ties)",
               name.c_str(), kvn.c_str(), argmax_diff, near_ties),
           argmax_diff == 0 && (c.weights_dtype != DType::f32 || near_ties == 0));

    // Batched == alone, bit for bit: sequence A alone, then A again next to B (prefill of B
    // and decode of A in one step, then both decoding).
    const std::vector<float> alone = run_sequence(gpu, ids, 32);
    std::vector<int32_t> other(40);
    for (auto& t : other) t = int32_t(3 + r.below(V - 3));
    std::vector<float> batched(ids.size() * size_t(V)), scratch(other.size() * size_t(V));
    const int32_t a = gpu.seq_new(), b = gpu.seq_new();
    gpu.eval({{a, ids.data(), 32, Runtime::Logits::all}}, batched.data());
    gpu.eval({{a, ids.data() + 32, 1, Runtime::Logits::all}, {b, other.data(), 24, Runtime::Logits::all}},
             scratch.data());  // A's row first, then B's 24 rows
    std::memcpy(&batched[32 * size_t(V)], scratch.data(), size_t(V) * 4);
    for (size_t i = 33; i < ids.size(); ++i) {
      const size_t j = std::min<size_t>(24 + (i - 33), other.size() - 1);
      std::vector<float> two(2 * size_t(V));
      gpu.eval({{b, &other[j], 1, Runtime::Logits::all}, {a, &ids[i], 1, Runtime::Logits::all}}, two.data());
      std::memcpy(&batched[i * size_t(V)], &two[size_t(V)], size_t(V) * 4);
    }
    compare("model batched == alone " + name + kvn, batched, alone, {});
    gpu.seq_free(a);
    gpu.seq_free(b);
    // A fork shares blocks, copy on write through copy_block: its continuation must equal a
    // fresh sequence's.
    const int32_t base = gpu.seq_new();
    std::vector<float> tmp(40 * size_t(V));
    gpu.eval({{base, ids.data(), 40, Runtime::Logits::none}}, tmp.data());
    const int32_t f = gpu.seq_fork(base, 37);  // mid-block: the next write copies the block
    std::vector<float> fork_out(static_cast<size_t>(V)), fresh_out(static_cast<size_t>(V));
    gpu.eval({{f, &ids[37], 1, Runtime::Logits::last}}, fork_out.data());
    gpu.seq_free(f);
    gpu.seq_free(base);
    std::vector<float> all = run_sequence(gpu, std::vector<int32_t>(ids.begin(), ids.begin() + 38), 38);
    std::memcpy(fresh_out.data(), &all[37 * size_t(V)], size_t(V) * 4);
    compare("model fork (copy_block) " + name + kvn, fork_out, fresh_out, {});
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string why;
  if (!cuda_compiled()) {
    std::printf("SKIP: %s\n", "this build has no CUDA backend");
    return 77;
  }
  if (!cuda_available(&why)) {
    std::printf("SKIP: %s\n", why.c_str());
    return 77;
  }
  std::printf("device: %s\n", cuda_device_description().c_str());
  try {
    g_quick = std::find(argv + 1, argv + argc, std::string("--quick")) != argv + argc;
    Rng r(2026);
    check_embed(r);
    check_rmsnorm(r);
    check_swiglu(r);
    check_quantize(r);
    check_attention(r);
    check_matmul(r);
    std::printf("kernels: %" PRId64 " cases, %" PRId64 " failed\n", g_cases, g_failed);
    std::vector<std::string> args;
    for (int i = 1; i < argc; ++i) {
      if (std::string(argv[i]) == "--quick") g_quick = true;
      else args.push_back(argv[i]);
    }
    if (g_quick) std::printf("quick: OpenELM matrix shapes left out\n");
    for (const std::string& f : model_files(args)) {
      const int64_t before = g_failed;
      check_model(f);
      std::printf("model %s: %s\n", f.c_str(), g_failed == before ? "ok" : "FAILED");
    }
  } catch (const std::exception& e) {
    std::printf("FAIL: exception: %s\n", e.what());
    return 1;
  }
  std::printf("%" PRId64 " passed, %" PRId64 " failed\n", g_cases - g_failed, g_failed);
  return g_failed ? 1 : 0;
}
