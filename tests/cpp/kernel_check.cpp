// kernel_check: every SIMD kernel variant compiled into this binary that this CPU can run
// (dispatch.h), checked kernel by kernel against the scalar reference on random data: all
// weight dtypes, odd sizes and tails, and every weight matrix shape of the four OpenELM
// sizes (openelm_shapes.inc). Block-quantized kernels (and the reference's own) are also
// checked against a scalar computation written here straight from docs/FORMAT.md.
// Self-contained (no test framework) so it runs under qemu-user for cross builds.
//
//   kernel_check                          check every supported variant except ref
//   OPENELM_RT_KERNELS=neon kernel_check  check that variant only ("ref": the FORMAT.md checks)
//   kernel_check --shape-stride 8         every 8th OpenELM shape only (and the last)
//   kernel_check --dispatch-only          what dispatch picks, nothing checked
//
// Prints one line per variant and kernel (cases, failures, worst error / tolerance), then
// "N passed, N failed"; exits 1 if any check failed, 2 if the forced variant cannot run.
#include <algorithm>
#include <cfloat>
#include <cinttypes>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <iterator>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/half.h"
#include "common/thread_pool.h"
#include "kernels/dispatch.h"
#include "kernels/kernels.h"
#include "rng.h"

using namespace oelm;

namespace {

constexpr double kU = 0x1p-24;  // unit roundoff of f32 (half an ulp of 1)

// ----------------------------------------------------------------------------- data


// Random binary16: mostly normal numbers of magnitude 2^-7..2^0 (weights), 1 in 32 a
// subnormal or zero, so widening is exercised on every kind of finite number.
uint16_t random_f16(Rng& r) {
  const uint16_t sign = uint16_t((r.next() & 1) << 15), mant = uint16_t(r.next() & 0x3FF);
  if (r.below(32) == 0) return uint16_t(sign | mant);  // subnormal or zero
  return uint16_t(sign | ((8 + r.below(8)) << 10) | mant);
}
uint16_t random_bf16(Rng& r) {
  float f = r.uniform(-1.0f, 1.0f);
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t(u >> 16);
}

// A buffer of zeros that costs memory only where written (calloc of a large size maps
// pages lazily): the big OpenELM matrices are allocated whole, but only the rows a case
// checks are filled.
struct Zeros {
  std::unique_ptr<uint8_t, decltype(&std::free)> p{nullptr, &std::free};
  explicit Zeros(size_t bytes) : p(static_cast<uint8_t*>(std::calloc(bytes ? bytes : 1, 1)), &std::free) {
    if (!p) {
      std::fprintf(stderr, "kernel_check: cannot allocate %zu bytes\n", bytes);
      std::exit(3);
    }
  }
  uint8_t* get() const { return p.get(); }
};

size_t dtype_bytes(int dt) { return dt == int(DType::f32) ? 4 : 2; }
float widen(int dt, const uint8_t* W, int64_t i) {
  if (dt == int(DType::f32)) return reinterpret_cast<const float*>(W)[i];
  const uint16_t h = reinterpret_cast<const uint16_t*>(W)[i];
  return dt == int(DType::f16) ? f16_to_f32(h) : bf16_to_f32(h);
}

// ----------------------------------------------------------------------------- report

constexpr float kSentinel = -12345.678f;  // outputs a kernel must not write

struct KernelStats {
  int64_t cases = 0, failed = 0;
  double worst = 0;  // largest |got - want| / tolerance seen (0 when compared bitwise)
  bool bitwise = false;
};

class Report {
 public:
  // Compares got with want element-wise: |got - want| <= tol[i], or bitwise when tol is
  // null. NaN must meet NaN, and an infinity the same infinity. One call is one case; prints the first mismatches.
  bool compare(const std::string& key, const std::string& what, const float* got, const float* want,
               const double* tol, int64_t n) {
    KernelStats& st = entry(key);
    st.bitwise = tol == nullptr;
    ++st.cases;
    int64_t bad = 0, first = -1;
    for (int64_t i = 0; i < n; ++i) {
      bool ok;
      if (std::isnan(want[i])) {
        ok = std::isnan(got[i]);
      } else if (!tol || std::isinf(want[i])) {  // an infinity must be met exactly
        ok = std::memcmp(&got[i], &want[i], sizeof(float)) == 0;
      } else {
        const double err = std::fabs(double(got[i]) - double(want[i]));
        ok = err <= tol[i];  // false for a NaN got
        if (ok && tol[i] > 0) st.worst = std::max(st.worst, err / tol[i]);
      }
      if (!ok && bad++ == 0) first = i;
    }
    if (bad) {
      ++st.failed;
      if (st.failed <= 3)  // the first few of each kernel
        std::printf("FAIL %s %s: %" PRId64 " of %" PRId64 " values differ; first at %" PRId64
                    ": got %.9g, want %.9g (tolerance %.3g)\n",
                    key.c_str(), what.c_str(), bad, n, first, double(got[first]), double(want[first]),
                    tol ? tol[first] : 0.0);
    }
    return bad == 0;
  }

  bool expect(const std::string& key, const std::string& what, bool ok) {
    const float got = ok ? 1.0f : 0.0f, want = 1.0f;
    return compare(key, what, &got, &want, nullptr, 1);
  }

  // Integer arrays (quantized activations) must match exactly.
  template <typename I>
  bool compare_int(const std::string& key, const std::string& what, const I* got, const I* want, int64_t n) {
    std::vector<float> g(static_cast<size_t>(n)), w(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) g[size_t(i)] = float(got[i]), w[size_t(i)] = float(want[i]);
    return compare(key, what, g.data(), w.data(), nullptr, n);
  }

  int summary() const {
    int64_t passed = 0, failed = 0;
    std::printf("\n%-34s %8s %8s  %s\n", "variant kernel", "cases", "failed", "worst err/tol");
    for (const std::string& k : order_) {
      const KernelStats& st = stats_.at(k);
      if (st.bitwise)
        std::printf("%-34s %8" PRId64 " %8" PRId64 "  bitwise\n", k.c_str(), st.cases, st.failed);
      else
        std::printf("%-34s %8" PRId64 " %8" PRId64 "  %.3f\n", k.c_str(), st.cases, st.failed, st.worst);
      passed += st.cases - st.failed;
      failed += st.failed;
    }
    std::printf("%" PRId64 " passed, %" PRId64 " failed\n", passed, failed);
    return failed ? 1 : 0;
  }

 private:
  KernelStats& entry(const std::string& key) {
    auto it = stats_.find(key);
    if (it == stats_.end()) {
      order_.push_back(key);
      it = stats_.emplace(key, KernelStats{}).first;
    }
    return it->second;
  }
  std::map<std::string, KernelStats> stats_;
  std::vector<std::string> order_;
};

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  char buf[256];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

// Checks that a kernel wrote y only inside [n0, n1) of each of T rows of width ldy.
void check_untouched(Report& rep, const std::string& key, const std::string& what, const std::vector<float>& y,
                     int64_t T, int64_t ldy, int64_t n0, int64_t n1) {
  std::vector<float> outside, want;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = 0; n < ldy; ++n)
      if (n < n0 || n >= n1) outside.push_back(y[size_t(t * ldy + n)]);
  if (outside.empty()) return;
  want.assign(outside.size(), kSentinel);
  rep.compare(key + " (writes)", what, outside.data(), want.data(), nullptr, int64_t(outside.size()));
}

struct Shape {
  const char* model;
  int64_t N, K;
  const char* matrices;
};
const Shape kAllOpenElmShapes[] = {
#include "openelm_shapes.inc"
};
// The OpenELM shapes checked: all of them, or with --shape-stride N every N-th and the last.
std::vector<Shape> kOpenElmShapes(std::begin(kAllOpenElmShapes), std::end(kAllOpenElmShapes));

// ----------------------------------------------------------------------------- matmul (f32, f16, bf16)

const char* kDtypeNames[kNumDTypes] = {"f32", "f16", "bf16", "u8", "q8", "q4", "q6", "q5", "q4k"};

// Tolerance |y - y_ref| <= 16 u * sum_k |x_k w_k|. Both kernels round every partial sum
// of K products in f32, in different orders (lane counts, tiles, fma or not); for data
// with random signs the difference stays near u * sum|x w| / sqrt(lanes) whatever K is,
// so 16u leaves a wide margin, while one dropped or doubled term (~ sum|x w| / K, K up to
// 24576: >= 680u) or a wrong tail is far outside it.
// Output rows [n0, n1) of every token of y (tokens ldy apart), token by token.
std::vector<float> rows_of(const std::vector<float>& y, int64_t T, int64_t ldy, int64_t n0, int64_t n1) {
  std::vector<float> out;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = n0; n < n1; ++n) out.push_back(y[size_t(t * ldy + n)]);
  return out;
}

// The tolerance above for each of those outputs of x [T, K] times rows [n0, n1) of W.
std::vector<double> matmul_tolerance(int dt, const uint8_t* W, const float* x, int64_t T, int64_t K, int64_t n0,
                                     int64_t n1) {
  std::vector<double> tol;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = n0; n < n1; ++n) {
      double mag = 0;
      for (int64_t k = 0; k < K; ++k) mag += std::fabs(double(x[t * K + k]) * double(widen(dt, W, n * K + k)));
      tol.push_back(16 * kU * mag);
    }
  return tol;
}

void matmul_case(Report& rep, const std::string& key, const KernelTable& v, const KernelTable& ref, int dt,
                 const uint8_t* W, int64_t K, const float* x, int64_t T, int64_t n0, int64_t n1, int64_t ldy,
                 const std::string& what) {
  std::vector<float> yv(static_cast<size_t>(T * ldy), kSentinel), yr(static_cast<size_t>(T * ldy), kSentinel);
  v.matmul[dt](x, T, K, W, n0, n1, yv.data(), ldy);
  ref.matmul[dt](x, T, K, W, n0, n1, yr.data(), ldy);
  const std::vector<float> got = rows_of(yv, T, ldy, n0, n1), want = rows_of(yr, T, ldy, n0, n1);
  const std::vector<double> tol = matmul_tolerance(dt, W, x, T, K, n0, n1);
  rep.compare(key, what, got.data(), want.data(), tol.data(), int64_t(got.size()));
  check_untouched(rep, key, what, yv, T, ldy, n0, n1);
}

void fill_rows(Rng& r, int dt, uint8_t* W, int64_t K, int64_t n0, int64_t n1) {
  for (int64_t i = n0 * K; i < n1 * K; ++i) {
    if (dt == int(DType::f32))
      reinterpret_cast<float*>(W)[i] = r.uniform(-1.0f, 1.0f);
    else
      reinterpret_cast<uint16_t*>(W)[i] = dt == int(DType::f16) ? random_f16(r) : random_bf16(r);
  }
}

void check_matmul(Report& rep, const std::string& name, const KernelTable& v, const KernelTable& ref, Rng& r) {
  for (int dt = 0; dt < kNumDTypes; ++dt) {
    if (!v.matmul[dt] || !ref.matmul[dt]) continue;
    const std::string key = name + " matmul_" + kDtypeNames[dt];
    // Odd sizes: K around every vector width and unroll (4, 8, 16, 32), N around tiles of
    // 4, 8 and blocks of 16, T through the decode (<= 4) and prefill (> 4) paths and
    // their 4-token tiles; full row ranges and sub-ranges; ldy wider than N.
    for (int64_t N : {1, 3, 8, 17, 37})
      for (int64_t K : {1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 31, 32, 33, 63, 100, 257}) {
        std::vector<uint8_t> W(static_cast<size_t>(N * K) * dtype_bytes(dt));
        fill_rows(r, dt, W.data(), K, 0, N);
        for (int64_t T : {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 16, 17}) {
          std::vector<float> x(static_cast<size_t>(T * K));
          for (float& e : x) e = r.uniform(-1.0f, 1.0f);
          const std::string what = fmt("N=%" PRId64 " K=%" PRId64 " T=%" PRId64, N, K, T);
          matmul_case(rep, key, v, ref, dt, W.data(), K, x.data(), T, 0, N, N + 3, what);
          if (N >= 3) matmul_case(rep, key, v, ref, dt, W.data(), K, x.data(), T, 1, N - 1, N, what + " rows 1..N-1");
        }
      }
    // Longer prefills over several row blocks (16 rows; 64 for f32 with 512-bit vectors, whose
    // block's last tile prefetches the next token group): N = 150 ends in a part block with
    // lone rows, T ends on a full group (12, 66), one token past it (13) or a part group (33,
    // 64); a sub-range of rows, as a thread gets. Then token by token, one row at a time:
    // bitwise the batched result (decode = prefill).
    for (int64_t N : {40, 150})
      for (int64_t T : {12, 13, 33, 64, 66}) {
        const int64_t K = N == 40 ? 1000 : 576, n0 = N == 40 ? 0 : 3;
        std::vector<uint8_t> W(static_cast<size_t>(N * K) * dtype_bytes(dt));
        fill_rows(r, dt, W.data(), K, 0, N);
        std::vector<float> x(static_cast<size_t>(T * K));
        for (float& e : x) e = r.uniform(-1.0f, 1.0f);
        const std::string what = fmt("N=%" PRId64 " K=%" PRId64 " T=%" PRId64 " rows %" PRId64 "..N", N, K, T, n0);
        matmul_case(rep, key, v, ref, dt, W.data(), K, x.data(), T, n0, N, N, what);
        std::vector<float> batched(static_cast<size_t>(T * N), kSentinel), y1(static_cast<size_t>(N), kSentinel);
        v.matmul[dt](x.data(), T, K, W.data(), n0, N, batched.data(), N);
        std::vector<float> one, got;
        for (int64_t t = 0; t < T; ++t)
          for (int64_t n = n0; n < N; ++n) {
            v.matmul[dt](x.data() + t * K, 1, K, W.data(), n, n + 1, y1.data(), N);
            one.push_back(y1[size_t(n)]);
            got.push_back(batched[size_t(t * N + n)]);
          }
        rep.compare(key + " (decode = prefill, bitwise)", what, one.data(), got.data(), nullptr, int64_t(one.size()));
      }
    // Every OpenELM matrix shape, with its full K: the first and the last 16 rows (how a
    // thread's share of rows is passed), one decode token and a 5-token prefill.
    for (const Shape& s : kOpenElmShapes) {
      Zeros W(static_cast<size_t>(s.N * s.K) * dtype_bytes(dt));
      fill_rows(r, dt, W.get(), s.K, 0, 16);
      fill_rows(r, dt, W.get(), s.K, s.N - 16, s.N);
      for (int64_t T : {1, 5}) {
        std::vector<float> x(static_cast<size_t>(T * s.K));
        for (float& e : x) e = r.uniform(-1.0f, 1.0f);
        const std::string what = fmt("%s %s [%" PRId64 ", %" PRId64 "] T=%" PRId64, s.model, s.matrices, s.N, s.K, T);
        matmul_case(rep, key, v, ref, dt, W.get(), s.K, x.data(), T, 0, 16, s.N, what);
        matmul_case(rep, key, v, ref, dt, W.get(), s.K, x.data(), T, s.N - 16, s.N, s.N, what + " last rows");
      }
    }
  }
}

// A packed product's outputs yp: against the reference's yr with matmul's tolerance (x as floats),
// and bitwise against the variant's unpacked yv (named `same`).
void compare_packed(Report& rep, const std::string& key, const std::string& same, int dt, const uint8_t* W,
                    const float* x, int64_t T, int64_t K, int64_t n0, int64_t n1, int64_t N, int64_t ldy,
                    const std::vector<float>& yp, const std::vector<float>& yv, const std::vector<float>& yr) {
  const std::string what = fmt("N=%" PRId64 " K=%" PRId64 " T=%" PRId64 " rows %" PRId64 "..%" PRId64, N, K, T, n0, n1);
  const std::vector<float> got = rows_of(yp, T, ldy, n0, n1), want = rows_of(yr, T, ldy, n0, n1),
                           unpacked = rows_of(yv, T, ldy, n0, n1);
  const std::vector<double> tol = matmul_tolerance(dt, W, x, T, K, n0, n1);
  rep.compare(key, what, got.data(), want.data(), tol.data(), int64_t(got.size()));
  rep.compare(key + " (= " + same + ", bitwise)", what, got.data(), unpacked.data(), nullptr, int64_t(got.size()));
  check_untouched(rep, key, what, yp, T, ldy, n0, n1);
}

// pack_f32 + matmul_packed (f32, f16 and bf16 weights, many tokens): against the reference with matmul's
// tolerance, and bitwise against the variant's own matmul[dtype] (the contract: the same bits, so
// prefill and decode agree whichever path a product takes). T: one group and a token past it, three
// groups, three and a part (the tokens past the last whole group take matmul[f32] itself), more;
// N: one register tile of 32 rows and less, 16-row halves, blocks ending in part tiles; row ranges
// not on tile boundaries (how a thread's chunk is passed); K from one lane step to a long row.
void check_matmul_packed_type(Report& rep, const std::string& name, const KernelTable& v, const KernelTable& ref,
                              Rng& r, int dt) {
  if (!v.pack_f32 || !v.matmul_packed[dt]) return;
  const std::string key = name + " matmul_packed_" + kDtypeNames[dt];
  struct Case {
    int64_t N, K, n0, n1;
  };
  for (const Case c : {Case{1, 16, 0, 1}, Case{17, 48, 0, 17}, Case{40, 576, 3, 40}, Case{150, 576, 32, 150},
                       Case{64, 1536, 16, 64}, Case{700, 64, 0, 700}, Case{96, 2048, 5, 91}})
    for (int64_t T : {12, 13, 36, 41, 66}) {
      const int64_t N = c.N, K = c.K, ldy = N + 3;
      std::vector<uint8_t> W(static_cast<size_t>(N * K) * dtype_bytes(dt));
      fill_rows(r, dt, W.data(), K, 0, N);
      std::vector<float> x(static_cast<size_t>(T * K));
      for (float& e : x) e = r.uniform(-1.0f, 1.0f);
      if (T > 13) x[size_t(13 * K)] = -0.0f;  // a zero row: sums of +-0
      const int64_t G = T / kF32Group;
      std::vector<float> xp(static_cast<size_t>(G * kF32Group * K), kSentinel);
      v.pack_f32(x.data(), K, 0, G / 2, xp.data());  // in two calls, as threads split the groups
      v.pack_f32(x.data(), K, G / 2, G, xp.data());
      std::vector<float> yp(static_cast<size_t>(T * ldy), kSentinel), yv(yp.size(), kSentinel), yr(yp.size(), kSentinel);
      v.matmul_packed[dt](x.data(), xp.data(), T, K, W.data(), c.n0, c.n1, yp.data(), ldy);
      v.matmul[dt](x.data(), T, K, W.data(), c.n0, c.n1, yv.data(), ldy);
      ref.matmul[dt](x.data(), T, K, W.data(), c.n0, c.n1, yr.data(), ldy);
      compare_packed(rep, key, std::string("matmul_") + kDtypeNames[dt], dt, W.data(), x.data(), T, K, c.n0, c.n1, N,
                     ldy, yp, yv, yr);
    }
}

void check_matmul_packed(Report& rep, const std::string& name, const KernelTable& v, const KernelTable& ref, Rng& r) {
  for (const int dt : {int(DType::f32), int(DType::f16), int(DType::bf16)})
    check_matmul_packed_type(rep, name, v, ref, r, dt);
}

// matmul_xbf16_packed (bf16 weights times bf16 activations, many tokens; the activations' bf16 pairs
// packed by pack_f32 as 32-bit words): against the reference with matmul's tolerance, and bitwise
// against the variant's own matmul_xbf16 (the contract). K a multiple of 32 takes the panels (the
// rest, and K = 48 or 1000 here, matmul_xbf16 itself); the other sizes as check_matmul_packed's.
void check_matmul_xbf16_packed(Report& rep, const std::string& name, const KernelTable& v, const KernelTable& ref,
                               Rng& r) {
  const int dt = int(DType::bf16);
  if (!v.pack_f32 || !v.matmul_xbf16_packed[dt] || !v.matmul_xbf16[dt] || !ref.matmul_xbf16[dt]) return;
  const std::string key = name + " matmul_xbf16_packed_bf16";
  struct Case {
    int64_t N, K, n0, n1;
  };
  for (const Case c : {Case{1, 32, 0, 1}, Case{17, 48, 0, 17}, Case{40, 576, 3, 40}, Case{150, 576, 32, 150},
                       Case{64, 1536, 16, 64}, Case{700, 64, 0, 700}, Case{96, 2048, 5, 91}, Case{20, 1000, 0, 20}})
    for (int64_t T : {12, 13, 36, 41, 66}) {
      const int64_t N = c.N, K = c.K, ldy = N + 3;
      std::vector<uint8_t> W(static_cast<size_t>(N * K) * 2);
      fill_rows(r, dt, W.data(), K, 0, N);
      std::vector<uint16_t> x(static_cast<size_t>(T * K));
      std::vector<float> xf(x.size());
      for (size_t i = 0; i < x.size(); ++i) {
        x[i] = f32_to_bf16(r.uniform(-1.0f, 1.0f));
        if (T > 13 && i / size_t(K) == 13) x[i] = 0x8000;  // a zero row (-0): sums of +-0
        xf[i] = bf16_to_f32(x[i]);
      }
      const int64_t G = T / kF32Group;
      std::vector<float> xp(static_cast<size_t>(G * kF32Group * K / 2), kSentinel);
      const float* words = reinterpret_cast<const float*>(x.data());
      if (K % 32 == 0) {  // as the Backend packs (other K take matmul_xbf16 whole)
        v.pack_f32(words, K / 2, 0, G / 2, xp.data());  // in two calls, as threads split the groups
        v.pack_f32(words, K / 2, G / 2, G, xp.data());
      }
      std::vector<float> yp(static_cast<size_t>(T * ldy), kSentinel), yv(yp.size(), kSentinel), yr(yp.size(), kSentinel);
      v.matmul_xbf16_packed[dt](x.data(), xp.data(), T, K, W.data(), c.n0, c.n1, yp.data(), ldy);
      v.matmul_xbf16[dt](x.data(), T, K, W.data(), c.n0, c.n1, yv.data(), ldy);
      ref.matmul_xbf16[dt](x.data(), T, K, W.data(), c.n0, c.n1, yr.data(), ldy);
      compare_packed(rep, key, "matmul_xbf16", dt, W.data(), xf.data(), T, K, c.n0, c.n1, N, ldy, yp, yv, yr);
    }
}

// matmul_xbf16 (bf16 activations, bf16 weights): against the reference with matmul's tolerance (the
// products are exact; only the order of the f32 sums differs), and every output bitwise the same
// whatever T and the row range are (decode = one token of a prefill). The activations are the
// bf16 rounding of random floats, rounded here with the reference rule.
void check_matmul_xbf16(Report& rep, const std::string& name, const KernelTable& v, const KernelTable& ref, Rng& r) {
  const int dt = int(DType::bf16);
  if (!v.matmul_xbf16[dt] || !ref.matmul_xbf16[dt]) return;
  const std::string key = name + " matmul_xbf16_bf16";
  auto run = [](matmul_xbf16_fn fn, const std::vector<uint16_t>& x, int64_t T, int64_t K, const uint8_t* W,
                int64_t n0, int64_t n1, int64_t ldy) {
    std::vector<float> y(static_cast<size_t>(T * ldy), kSentinel);
    fn(x.data(), T, K, W, n0, n1, y.data(), ldy);
    return y;
  };
  for (int64_t N : {1, 3, 17, 37})
    for (int64_t K : {1, 2, 31, 32, 33, 63, 64, 65, 100, 257, 576, 1000}) {
      std::vector<uint8_t> W(static_cast<size_t>(N * K) * 2);
      fill_rows(r, dt, W.data(), K, 0, N);
      for (int64_t T : {1, 2, 5, 6, 7, 13, 17}) {
        std::vector<uint16_t> x(static_cast<size_t>(T * K));
        std::vector<float> xf(x.size());
        for (size_t i = 0; i < x.size(); ++i) {
          x[i] = f32_to_bf16(r.uniform(-1.0f, 1.0f));
          xf[i] = bf16_to_f32(x[i]);
        }
        const int64_t ldy = N + 2, n0 = N >= 3 ? 1 : 0;
        const std::string what = fmt("N=%" PRId64 " K=%" PRId64 " T=%" PRId64, N, K, T);
        const std::vector<float> yv = run(v.matmul_xbf16[dt], x, T, K, W.data(), n0, N, ldy);
        const std::vector<float> yr = run(ref.matmul_xbf16[dt], x, T, K, W.data(), n0, N, ldy);
        std::vector<float> got, want;
        std::vector<double> tol;
        for (int64_t t = 0; t < T; ++t)
          for (int64_t n = n0; n < N; ++n) {
            double mag = 0;
            for (int64_t k = 0; k < K; ++k) mag += std::fabs(double(xf[size_t(t * K + k)]) * widen(dt, W.data(), n * K + k));
            got.push_back(yv[size_t(t * ldy + n)]);
            want.push_back(yr[size_t(t * ldy + n)]);
            tol.push_back(16 * kU * mag);
          }
        rep.compare(key, what, got.data(), want.data(), tol.data(), int64_t(got.size()));
        check_untouched(rep, key, what, yv, T, ldy, n0, N);
        // Token by token, one row at a time: bitwise the batched result.
        std::vector<float> one;
        for (int64_t t = 0; t < T; ++t)
          for (int64_t n = n0; n < N; ++n) {
            const std::vector<uint16_t> xt(x.begin() + t * K, x.begin() + (t + 1) * K);
            one.push_back(run(v.matmul_xbf16[dt], xt, 1, K, W.data(), n, n + 1, ldy)[size_t(n)]);
          }
        rep.compare(key + " (decode = prefill, bitwise)", what, one.data(), got.data(), nullptr, int64_t(one.size()));
      }
    }
}

// ----------------------------------------------------------------------------- block-quantized (FORMAT.md)

// The activation quantizer exactly as kernels.h states it.
void quantize_row_spec(const float* x, int64_t K, int8_t* q, float* d, int32_t* s) {
  const int64_t Kp = q_padded_k(K);
  for (int64_t b = 0; b < Kp / kQBlock; ++b) {
    float amax = 0;
    bool finite = true;
    for (int64_t k = b * kQBlock; k < std::min(K, (b + 1) * kQBlock); ++k) {
      if (!std::isfinite(x[k])) finite = false;
      else amax = std::max(amax, std::fabs(x[k]));
    }
    const float inv = 127.0f / amax;  // +inf for an all-zero block or amax < 127 / FLT_MAX
    const bool zero = !finite || std::isinf(inv);
    s[b] = 0;
    d[b] = !finite ? NAN : zero ? 0.0f : amax / 127.0f;
    for (int64_t k = b * kQBlock; k < (b + 1) * kQBlock; ++k) {
      q[k] = k < K && !zero ? int8_t(std::nearbyint(x[k] * inv)) : int8_t(0);
      s[b] += q[k];
    }
  }
}

// A block-quantized matrix built from integers and scales, packed as FORMAT.md lays it out.
// Only the panels in `panels` are generated (the others stay zero bytes and are never read).
// Bits per weight of a block-quantized DType.
int q_bits(int dt) {
  return dt == int(DType::q8) ? 8 : dt == int(DType::q6) ? 6 : dt == int(DType::q5) ? 5 : 4;
}
int64_t q_block_bytes(int bits) {
  return bits == 8 ? kQ8BlockBytes : bits == 6 ? kQ6BlockBytes : bits == 5 ? kQ5BlockBytes : kQ4BlockBytes;
}

struct QMatrix {
  int bits;  // 8, 6, 5 or 4
  int64_t N, K, Kp, nb, panel_bytes;
  std::map<int64_t, std::vector<int8_t>> q;     // row -> q[Kp] (0 beyond K)
  std::map<int64_t, std::vector<uint16_t>> d;   // row -> binary16 scale per block
  Zeros bytes;

  QMatrix(int bits_, int64_t N_, int64_t K_, const std::vector<int64_t>& panels, Rng& r)
      : bits(bits_), N(N_), K(K_), Kp(q_padded_k(K_)), nb(Kp / kQBlock),
        panel_bytes(nb * q_block_bytes(bits_)),
        bytes(static_cast<size_t>(q_padded_n(N_) / kQRows * panel_bytes)) {
    for (int64_t p : panels)
      for (int64_t rr = 0; rr < kQRows; ++rr) {
        const int64_t row = p * kQRows + rr;
        std::vector<int8_t>& qr = q[row];
        std::vector<uint16_t>& dr = d[row];
        qr.assign(static_cast<size_t>(Kp), 0);
        dr.assign(static_cast<size_t>(nb), 0);
        if (row >= N) continue;  // padding rows: q = 0, scale 0
        for (int64_t k = 0; k < K; ++k)
          qr[size_t(k)] = bits == 8 ? int8_t(r.below(255) - 127) : int8_t(r.below(1 << bits) - (1 << (bits - 1)));
        for (int64_t b = 0; b < nb; ++b) dr[size_t(b)] = random_f16(r);  // either sign; some 0 or subnormal
        pack_row(row);
      }
  }

  void pack_row(int64_t row) {
    uint8_t* panel = bytes.get() + (row / kQRows) * panel_bytes;
    const int64_t rr = row % kQRows;
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* block = panel + b * q_block_bytes(bits);
      std::memcpy(block + 2 * rr, &d[row][size_t(b)], 2);
      for (int64_t c = 0; c < kQBlock; ++c) {
        const int8_t v = q[row][size_t(32 * b + c)];
        if (bits != 8) {
          // FORMAT.md: the low 4 bits of u = q + 2^(bits-1) as q4 stores its nibbles; for q6 / q5
          // the rest at bits [hb v % 8, + hb) of the same byte of high line hb v / 8, v = 2 line + half.
          const int64_t line = (c % 16) / 4, pos = 4 * rr + (c % 4);
          uint8_t& byte = block[kQScaleBytes + 64 * line + pos];
          const int u = v + (1 << (bits - 1));
          const uint8_t lo = uint8_t(u & 15);
          byte = c < 16 ? uint8_t((byte & 0xF0) | lo) : uint8_t((byte & 0x0F) | (lo << 4));
          const int hb = bits - 4;
          if (hb > 0) {
            const int64_t bit = hb * (2 * line + c / 16);
            uint8_t& h = block[kQScaleBytes + kQNibbleBytes + 64 * (bit / 8) + pos];
            const int mask = ((1 << hb) - 1) << (bit % 8);
            h = uint8_t((h & ~mask) | ((u >> 4) << (bit % 8)));
          }
        } else {
          block[kQScaleBytes + 64 * (c / 4) + 4 * rr + (c % 4)] = uint8_t(v + 128);
        }
      }
    }
  }

  // The contract of qmatmul_fn in kernels.h, from the unpacked integers and scales.
  float dot(const QActs& x, int64_t t, int64_t row) const {
    const std::vector<int8_t>& qr = q.at(row);
    const std::vector<uint16_t>& dr = d.at(row);
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
      int32_t isum = 0;
      for (int64_t c = 0; c < kQBlock; ++c) isum += int32_t(qr[size_t(32 * b + c)]) * x.q[t * Kp + 32 * b + c];
      acc = std::fma(float(isum) * x.d[t * nb + b], f16_to_f32(dr[size_t(b)]), acc);
    }
    return acc;
  }
};

// A q4k_b32r16i matrix built from its integers and scales, packed as FORMAT.md lays it out
// (written from the format's byte table, not from the kernels' helpers).
struct Q4kMatrix {
  int64_t N, K, Kp, nb, S, super_bytes, panel_bytes;
  std::map<int64_t, std::vector<uint8_t>> u, sc, m;      // row -> u [Kp] (0 beyond K), sc / m [nb]
  std::map<int64_t, std::vector<uint16_t>> d, dmin;     // row -> binary16 per super-block
  Zeros bytes;

  Q4kMatrix(int64_t N_, int64_t K_, const std::vector<int64_t>& panels, Rng& r)
      : N(N_), K(K_), Kp(q_padded_k(K_)), nb(Kp / kQBlock), S(std::max<int64_t>(1, q4k_subs(nb))),
        super_bytes(64 + 280 * S), panel_bytes(nb / S * super_bytes),
        bytes(static_cast<size_t>(q_padded_n(N_) / kQRows * panel_bytes)) {
    for (int64_t p : panels)
      for (int64_t rr = 0; rr < kQRows; ++rr) {
        const int64_t row = p * kQRows + rr;
        u[row].assign(size_t(Kp), 0);
        sc[row].assign(size_t(nb), 0);
        m[row].assign(size_t(nb), 0);
        d[row].assign(size_t(nb / S), 0);
        dmin[row].assign(size_t(nb / S), 0);
        if (row >= N) continue;  // padding rows: all zero
        for (int64_t k = 0; k < K; ++k) u[row][size_t(k)] = uint8_t(r.below(16));
        for (int64_t b = 0; b < nb; ++b) {
          sc[row][size_t(b)] = uint8_t(r.below(64));
          m[row][size_t(b)] = uint8_t(r.below(64));
        }
        for (int64_t s = 0; s < nb / S; ++s) {
          d[row][size_t(s)] = random_f16(r);
          dmin[row][size_t(s)] = random_f16(r);
        }
        pack_row(row);
      }
  }

  void pack_row(int64_t row) {
    uint8_t* panel = bytes.get() + (row / kQRows) * panel_bytes;
    const int64_t rr = row % kQRows;
    for (int64_t s = 0; s < nb / S; ++s) {
      uint8_t* sup = panel + s * super_bytes;
      std::memcpy(sup + 2 * rr, &d[row][size_t(s)], 2);
      std::memcpy(sup + 32 + 2 * rr, &dmin[row][size_t(s)], 2);
      for (int64_t j = 0; j < S; ++j) {
        const int64_t b = s * S + j;
        const int mm = m[row][size_t(b)];
        // byte r: sc | (m >> 4) << 6; byte 16 + r % 8: m & 15 in the low (r < 8) or high nibble
        sup[64 + 24 * j + rr] = uint8_t(sc[row][size_t(b)] | (mm >> 4) << 6);
        uint8_t& lo = sup[64 + 24 * j + 16 + rr % 8];
        lo = rr < 8 ? uint8_t((lo & 0xF0) | (mm & 15)) : uint8_t((lo & 0x0F) | (mm & 15) << 4);
        for (int64_t c = 0; c < kQBlock; ++c) {
          uint8_t& byte = sup[64 + 24 * S + 256 * j + 64 * ((c % 16) / 4) + 4 * rr + c % 4];
          const uint8_t v = u[row][size_t(32 * b + c)];
          byte = c < 16 ? uint8_t((byte & 0xF0) | v) : uint8_t((byte & 0x0F) | v << 4);
        }
      }
    }
  }

  float dsc(int64_t row, int64_t b) const { return f16_to_f32(d.at(row)[size_t(b / S)]) * float(sc.at(row)[size_t(b)]); }
  float dm(int64_t row, int64_t b) const { return f16_to_f32(dmin.at(row)[size_t(b / S)]) * float(m.at(row)[size_t(b)]); }

  // The contract of qmatmul_fn for q4k in kernels.h.
  float dot(const QActs& x, int64_t t, int64_t row) const {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
      int32_t isum = 0;
      for (int64_t c = 0; c < kQBlock; ++c)
        isum += int32_t(u.at(row)[size_t(32 * b + c)]) * x.q[t * Kp + 32 * b + c];
      acc = std::fma(float(isum) * x.d[t * nb + b], dsc(row, b), acc);
      acc = std::fma(float(x.s[t * nb + b]) * x.d[t * nb + b], -dm(row, b), acc);
    }
    return acc;
  }
};

struct QActsBuf {
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> s;
  QActs view(int64_t Kp) const { return {q.data(), d.data(), s.data(), Kp}; }
};

// Activations with every kind of block: random, all zero, one non-zero value, ties; with
// nonfinite, every third token also holds a NaN, +inf or -inf (a corrupt file's activations).
QActsBuf quantized_acts(Rng& r, int64_t T, int64_t K, bool nonfinite = false) {
  const int64_t Kp = q_padded_k(K), nb = Kp / kQBlock;
  QActsBuf a;
  a.q.resize(static_cast<size_t>(T * Kp));
  a.d.resize(static_cast<size_t>(T * nb));
  a.s.resize(static_cast<size_t>(T * nb));
  std::vector<float> x(static_cast<size_t>(K));
  for (int64_t t = 0; t < T; ++t) {
    const float mag = std::ldexp(1.0f, int(r.below(20)) - 10);
    for (float& e : x) e = mag * r.uniform(-1.0f, 1.0f);
    if (t % 3 == 1) std::fill(x.begin(), x.begin() + std::min<int64_t>(K, 32), 0.0f);
    if (t % 3 == 2) x[size_t(r.below(K))] = -2 * mag;
    if (nonfinite && t % 3 == 0) x[size_t(r.below(K))] = t % 9 == 0 ? NAN : t % 9 == 3 ? INFINITY : -INFINITY;
    quantize_row_spec(x.data(), K, a.q.data() + t * Kp, a.d.data() + t * nb, a.s.data() + t * nb);
  }
  return a;
}

// qmatmul: bitwise against the FORMAT.md computation (the contract fixes every rounding),
// and bitwise against the reference when it has the kernel.
template <class M>
void qmatmul_case(Report& rep, const std::string& name, const KernelTable& v, const KernelTable& ref, int dt,
                  const M& W, const QActsBuf& a, int64_t T, int64_t n0, int64_t n1, const std::string& what) {
  const QActs x = a.view(W.Kp);
  const int64_t ldy = W.N + 1;
  const std::string key = name + " qmatmul_" + kDtypeNames[dt];
  auto run = [&](const KernelTable& k, std::vector<float>& y) {
    y.assign(static_cast<size_t>(T * ldy), kSentinel);
    k.qmatmul[dt](x, T, W.bytes.get(), W.N, n0, n1, y.data(), ldy);
    std::vector<float> out;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = n0; n < n1; ++n) out.push_back(y[size_t(t * ldy + n)]);
    return out;
  };
  std::vector<float> want, yv, yr;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = n0; n < n1; ++n) want.push_back(W.dot(x, t, n));
  const std::vector<float> got = run(v, yv);
  rep.compare(key + " vs FORMAT.md", what, got.data(), want.data(), nullptr, int64_t(got.size()));
  check_untouched(rep, key, what, yv, T, ldy, n0, n1);
  if (&v != &ref && ref.qmatmul[dt]) {
    const std::vector<float> r = run(ref, yr);
    rep.compare(key, what, got.data(), r.data(), nullptr, int64_t(got.size()));
  }
}

template <class M>
void check_qmatmul_type(Report& rep, const std::string& name, const KernelTable& v, const KernelTable& ref, Rng& r,
                        int dt, M (*make)(int dt, int64_t N, int64_t K, const std::vector<int64_t>& panels, Rng& r)) {
  {
    // Odd sizes: N not a multiple of 16 (a partial last panel), K not a multiple of 32
    // (padded blocks), T odd and even (token pairs), sub-ranges of panels.
    for (int64_t N : {1, 5, 16, 17, 40, 64})
      for (int64_t K : {1, 31, 32, 33, 64, 95, 160, 1000}) {
        std::vector<int64_t> panels;
        for (int64_t p = 0; p < q_padded_n(N) / kQRows; ++p) panels.push_back(p);
        const M W = make(dt, N, K, panels, r);
        for (int64_t T : {1, 2, 3, 4, 5, 6, 7, 8, 9, 16}) {
          const QActsBuf a = quantized_acts(r, T, K);
          const std::string what = fmt("N=%" PRId64 " K=%" PRId64 " T=%" PRId64, N, K, T);
          qmatmul_case(rep, name, v, ref, dt, W, a, T, 0, N, what);
          if (N > 16) {
            qmatmul_case(rep, name, v, ref, dt, W, a, T, 0, 16, what + " rows 0..16");
            qmatmul_case(rep, name, v, ref, dt, W, a, T, 16, N, what + " rows 16..N");
          }
        }
      }
    // Decode-sized matrices: whole matrices and chunks that start and end mid-matrix (at
    // multiples of 64 rows, as the thread pool cuts them).
    for (int64_t N : {136, 264, 392, 520})
      for (int64_t K : {32, 95, 160}) {
        std::vector<int64_t> panels;
        for (int64_t p = 0; p < q_padded_n(N) / kQRows; ++p) panels.push_back(p);
        const M W = make(dt, N, K, panels, r);
        for (int64_t T : {1, 2}) {
          const QActsBuf a = quantized_acts(r, T, K);
          const std::string what = fmt("N=%" PRId64 " K=%" PRId64 " T=%" PRId64, N, K, T);
          qmatmul_case(rep, name, v, ref, dt, W, a, T, 0, N, what);
          qmatmul_case(rep, name, v, ref, dt, W, a, T, 64, N, what + " rows 64..N");
          qmatmul_case(rep, name, v, ref, dt, W, a, T, 0, 128, what + " rows 0..128");
          qmatmul_case(rep, name, v, ref, dt, W, a, T, 64, std::min<int64_t>(N, 320), what + " rows 64..320");
        }
      }
    // NaN and infinite activations (a corrupt file): defined, the touched outputs NaN, the
    // other tokens' outputs exact (the quantized tile's offset term once overflowed int32).
    for (int64_t N : {16, 40})
      for (int64_t K : {32, 95, 1000}) {
        std::vector<int64_t> panels;
        for (int64_t p = 0; p < q_padded_n(N) / kQRows; ++p) panels.push_back(p);
        const M W = make(dt, N, K, panels, r);
        for (int64_t T : {1, 2, 4, 7, 8, 9}) {
          const QActsBuf a = quantized_acts(r, T, K, true);
          qmatmul_case(rep, name, v, ref, dt, W, a, T, 0, N,
                       fmt("non-finite activations N=%" PRId64 " K=%" PRId64 " T=%" PRId64, N, K, T));
        }
      }
    for (const Shape& s : kOpenElmShapes) {
      const int64_t last = q_padded_n(s.N) / kQRows - 1;
      const M W = make(dt, s.N, s.K, {0, last}, r);
      for (int64_t T : {1, 5}) {
        const QActsBuf a = quantized_acts(r, T, s.K);
        const std::string what = fmt("%s %s [%" PRId64 ", %" PRId64 "] T=%" PRId64, s.model, s.matrices, s.N, s.K, T);
        qmatmul_case(rep, name, v, ref, dt, W, a, T, 0, 16, what);
        qmatmul_case(rep, name, v, ref, dt, W, a, T, last * kQRows, s.N, what + " last panel");
      }
    }
  }
}

QMatrix make_q(int dt, int64_t N, int64_t K, const std::vector<int64_t>& panels, Rng& r) {
  return QMatrix(q_bits(dt), N, K, panels, r);
}
Q4kMatrix make_q4k(int, int64_t N, int64_t K, const std::vector<int64_t>& panels, Rng& r) {
  return Q4kMatrix(N, K, panels, r);
}

void check_qmatmul(Report& rep, const std::string& name, const KernelTable& v, const KernelTable& ref, Rng& r) {
  for (int dt : {int(DType::q8), int(DType::q4), int(DType::q6), int(DType::q5)})
    if (v.qmatmul[dt]) check_qmatmul_type<QMatrix>(rep, name, v, ref, r, dt, make_q);
  // q4k: also rows whose block count gives every super-block size (S = 1 .. 8: K = 32 nb).
  const int q4k = int(DType::q4k);
  if (!v.qmatmul[q4k]) return;
  check_qmatmul_type<Q4kMatrix>(rep, name, v, ref, r, q4k, make_q4k);
  for (int64_t nb : {1, 2, 3, 5, 7, 8, 9, 11, 12, 16, 18, 20, 21, 48})
    for (int64_t N : {16, 40}) {
      std::vector<int64_t> panels;
      for (int64_t p = 0; p < q_padded_n(N) / kQRows; ++p) panels.push_back(p);
      const Q4kMatrix W(N, 32 * nb - (nb % 2), panels, r);
      for (int64_t T : {1, 2, 3, 7, 8}) {
        const QActsBuf a = quantized_acts(r, T, W.K);
        qmatmul_case(rep, name, v, ref, q4k, W, a, T, 0, N, fmt("S=%" PRId64 " N=%" PRId64 " K=%" PRId64 " T=%" PRId64, W.S, N, W.K, T));
      }
    }
}

// quantize_row: q, d and s bitwise equal to the rule kernels.h states (so variants and
// reference agree with each other too).
void check_quantize_row(Report& rep, const std::string& name, const KernelTable& v, Rng& r) {
  if (!v.quantize_row) return;
  std::vector<int64_t> sizes;
  for (int64_t K = 1; K <= 70; ++K) sizes.push_back(K);
  for (int64_t K : {95, 96, 1000, 1280, 3072, 8192}) sizes.push_back(K);
  for (int64_t K : sizes)
    for (int kind = 0; kind < 7; ++kind) {
      std::vector<float> x(static_cast<size_t>(K));
      const float mag = std::ldexp(1.0f, int(r.below(40)) - 20);
      for (float& e : x) e = mag * r.uniform(-1.0f, 1.0f);
      if (kind == 1) std::fill(x.begin(), x.begin() + std::min<int64_t>(K, 40), 0.0f);  // zero block(s)
      if (kind == 2) {  // amax = 127 makes the multiplier exactly 1: every .5 is a tie to even
        for (float& e : x) e = float(r.below(255) - 127) + (r.below(2) ? 0.5f : 0.0f);
        for (int64_t k = 0; k < K; k += 32) x[size_t(k)] = r.below(2) ? 127.0f : -127.0f;
      }
      if (kind == 3)
        for (float& e : x) e = std::ldexp(r.uniform(-1.0f, 1.0f), int(r.below(60)) - 30);  // wide range in a block
      if (kind == 4)  // NaN, +inf, -inf: defined (kernels.h), d = NaN and q = s = 0 for the block
        for (int64_t k = 0; k < K; k += 13) x[size_t(k)] = k % 3 == 0 ? NAN : k % 3 == 1 ? INFINITY : -INFINITY;
      if (kind == 5)  // amax below 127 / FLT_MAX: 127 / amax overflows, the block is zero
        for (float& e : x) e = r.uniform(-1.0f, 1.0f) * 1e-38f;
      if (kind == 6)  // subnormals and the largest finite values
        for (int64_t k = 0; k < K; ++k) x[size_t(k)] = (k / 32) % 2 ? r.uniform(-1.0f, 1.0f) * 1e-42f : (k % 2 ? FLT_MAX : -FLT_MAX);
      const int64_t Kp = q_padded_k(K), nb = Kp / kQBlock;
      std::vector<int8_t> qw(static_cast<size_t>(Kp)), qg(static_cast<size_t>(Kp), 99);
      std::vector<float> dw(static_cast<size_t>(nb)), dg(static_cast<size_t>(nb));
      std::vector<int32_t> sw(static_cast<size_t>(nb)), sg(static_cast<size_t>(nb));
      quantize_row_spec(x.data(), K, qw.data(), dw.data(), sw.data());
      const std::string what = fmt("K=%" PRId64 " kind %d", K, kind);
      const std::string key = name + " quantize_row vs kernels.h";
      v.quantize_row(x.data(), K, qg.data(), dg.data(), sg.data());
      rep.compare_int(key + " (q)", what, qg.data(), qw.data(), Kp);
      rep.compare(key + " (d)", what, dg.data(), dw.data(), nullptr, nb);
      rep.compare_int(key + " (s)", what, sg.data(), sw.data(), nb);
    }
}

// ----------------------------------------------------------------------------- row_to_f32

void check_row_to_f32(Report& rep, const std::string& name, const KernelTable& v, const KernelTable& ref,
                      Rng& r) {
  // Plain dtypes: bitwise equal to the reference (widening is exact). f16 and bf16 go
  // through every one of the 65536 bit patterns (subnormals, infinities, NaNs).
  for (int dt : {int(DType::f32), int(DType::f16), int(DType::bf16)}) {
    if (!v.row_to_f32[dt] || !ref.row_to_f32[dt] || &v == &ref) continue;
    const std::string key = name + " row_to_f32_" + kDtypeNames[dt];
    for (int64_t K : {1, 3, 7, 8, 9, 17, 33, 65536}) {
      const int64_t N = 3;
      std::vector<uint8_t> W(static_cast<size_t>(N * K) * dtype_bytes(dt));
      fill_rows(r, dt, W.data(), K, 0, N);
      if (dt != int(DType::f32) && K == 65536)
        for (int64_t k = 0; k < K; ++k) reinterpret_cast<uint16_t*>(W.data())[K + k] = uint16_t(k);
      for (int64_t row = 0; row < N; ++row) {
        std::vector<float> got(static_cast<size_t>(K) + 1, kSentinel), want(static_cast<size_t>(K) + 1, kSentinel);
        v.row_to_f32[dt](W.data(), N, K, row, got.data());
        ref.row_to_f32[dt](W.data(), N, K, row, want.data());
        rep.compare(key, fmt("K=%" PRId64 " row %" PRId64, K, row), got.data(), want.data(), nullptr, K + 1);
      }
    }
  }
  // Block-quantized: d * q exactly, against FORMAT.md.
  for (int dt : {int(DType::q8), int(DType::q4), int(DType::q6), int(DType::q5)}) {
    if (!v.row_to_f32[dt]) continue;
    const std::string key = name + " row_to_f32_" + kDtypeNames[dt] + " vs FORMAT.md";
    for (int64_t N : {1, 17, 37})
      for (int64_t K : {1, 31, 33, 100, 2048}) {
        std::vector<int64_t> panels;
        for (int64_t p = 0; p < q_padded_n(N) / kQRows; ++p) panels.push_back(p);
        const QMatrix W(q_bits(dt), N, K, panels, r);
        for (int64_t row = 0; row < N; ++row) {
          std::vector<float> got(static_cast<size_t>(K) + 1, kSentinel), want(static_cast<size_t>(K) + 1, kSentinel);
          v.row_to_f32[dt](W.bytes.get(), N, K, row, got.data());
          for (int64_t c = 0; c < K; ++c)
            want[size_t(c)] = f16_to_f32(W.d.at(row)[size_t(c / kQBlock)]) * float(W.q.at(row)[size_t(c)]);
          rep.compare(key, fmt("N=%" PRId64 " K=%" PRId64 " row %" PRId64, N, K, row), got.data(), want.data(),
                      nullptr, K + 1);
        }
      }
  }
}

void check_row_to_f32_q4k(Report& rep, const std::string& name, const KernelTable& v, Rng& r) {
  const int dt = int(DType::q4k);
  if (!v.row_to_f32[dt]) return;
  const std::string key = name + " row_to_f32_q4k vs FORMAT.md";
  for (int64_t N : {1, 17})
    for (int64_t K : {1, 31, 33, 100, 576, 2048}) {
      std::vector<int64_t> panels;
      for (int64_t p = 0; p < q_padded_n(N) / kQRows; ++p) panels.push_back(p);
      const Q4kMatrix W(N, K, panels, r);
      for (int64_t row = 0; row < N; ++row) {
        std::vector<float> got(static_cast<size_t>(K) + 1, kSentinel), want(static_cast<size_t>(K) + 1, kSentinel);
        v.row_to_f32[dt](W.bytes.get(), N, K, row, got.data());
        for (int64_t c = 0; c < K; ++c)
          want[size_t(c)] = W.dsc(row, c / kQBlock) * float(W.u.at(row)[size_t(c)]) - W.dm(row, c / kQBlock);
        rep.compare(key, fmt("N=%" PRId64 " K=%" PRId64 " row %" PRId64, N, K, row), got.data(), want.data(), nullptr,
                    K + 1);
      }
    }
}

// ----------------------------------------------------------------------------- element-wise ops

void check_ops(Report& rep, const std::string& name, const KernelTable& v, const KernelTable& ref, Rng& r) {
  // rmsnorm: the reference sums the squares in double; a variant may sum them in f32 in
  // any order. The rounding error of n positive terms then grows like sqrt(n) u (random
  // walk; the proven worst case, n u, would hide a dropped element, which moves the
  // scale by ~1/(2n)), the square root halves it, and the two final multiplies add 1u
  // each: |y - y_ref| <= (4 + sqrt(n)) u |y_ref|. (A variant summing in double, as neon
  // does, lands within 1 ulp.) |x| up to 1e15: x^2 sums stay finite in f32.
  for (int64_t n : {1, 3, 4, 5, 7, 16, 17, 64, 127, 128, 1280, 1536, 2048, 3072})
    for (float mag : {1.0f, 1e-20f, 1e15f})
      for (bool in_place : {false, true}) {
        std::vector<float> x(static_cast<size_t>(n)), w(static_cast<size_t>(n)), yv(static_cast<size_t>(n)), yr(static_cast<size_t>(n));
        for (float& e : x) e = mag * r.uniform(-1.0f, 1.0f);
        for (float& e : w) e = r.uniform(0.5f, 1.5f);
        std::vector<float> xv = x;
        v.rmsnorm(xv.data(), w.data(), n, 1e-6f, in_place ? xv.data() : yv.data());
        if (in_place) yv = xv;
        ref.rmsnorm(x.data(), w.data(), n, 1e-6f, yr.data());
        std::vector<double> tol(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) tol[size_t(i)] = (4 + std::sqrt(double(n))) * kU * std::fabs(double(yr[size_t(i)]));
        rep.compare(name + " rmsnorm", fmt("n=%" PRId64 " |x|~%g%s", n, double(mag), in_place ? " in place" : ""),
                    yv.data(), yr.data(), tol.data(), n);
      }

  // rope: each output is two products and a sum; evaluated with or without fma, results
  // differ by at most about one rounding of the terms: 2u (|a cos| + |b sin|).
  for (int64_t n_heads : {1, 3, 12})
    for (int64_t hd : {2, 6, 8, 16, 18, 24, 64, 128}) {
      const int64_t half = hd / 2;
      std::vector<float> x(static_cast<size_t>(n_heads * hd)), c(static_cast<size_t>(half)), s(static_cast<size_t>(half));
      for (float& e : x) e = r.uniform(-4.0f, 4.0f);
      for (int64_t j = 0; j < half; ++j) {
        const float a = r.uniform(-100.0f, 100.0f);
        c[size_t(j)] = std::cos(a);
        s[size_t(j)] = std::sin(a);
      }
      std::vector<float> xv = x, xr = x;
      v.rope(xv.data(), n_heads, hd, c.data(), s.data());
      ref.rope(xr.data(), n_heads, hd, c.data(), s.data());
      std::vector<double> tol(x.size());
      for (int64_t h = 0; h < n_heads; ++h)
        for (int64_t j = 0; j < half; ++j) {
          const double a = x[size_t(h * hd + j)], b = x[size_t(h * hd + j + half)];
          const double m = std::fabs(a * c[size_t(j)]) + std::fabs(b * s[size_t(j)]) +
                           std::fabs(b * c[size_t(j)]) + std::fabs(a * s[size_t(j)]);
          tol[size_t(h * hd + j)] = tol[size_t(h * hd + j + half)] = 2 * kU * m;
        }
      rep.compare(name + " rope", fmt("heads=%" PRId64 " hd=%" PRId64, n_heads, hd), xv.data(), xr.data(),
                  tol.data(), int64_t(x.size()));
    }

  // attention: the kernels may differ in each score's rounding (the q.k dot, bounded as
  // for matmul: delta = 16u * scale * max_s sum_d |q_d k_sd|) and in exp (a vector exp of a
  // few ulp). A score error delta moves each softmax weight by a factor within exp(+-2 delta),
  // so out moves by at most ~2 delta max|v|; 64u max|v| covers the exps and the
  // accumulation. One missed key (weight ~ 1/n_kv) is far outside it.
  auto attention_tol = [](const float* q, const float* k, const float* vv, int64_t n_kv, int64_t hd, float scale) {
    double qk = 0, vmax = 0;
    for (int64_t s = 0; s < n_kv; ++s) {
      double m = 0;
      for (int64_t d = 0; d < hd; ++d) {
        m += std::fabs(double(q[d]) * k[s * hd + d]);
        vmax = std::max(vmax, std::fabs(double(vv[s * hd + d])));
      }
      qk = std::max(qk, m);
    }
    return (2 * 16 * kU * scale * qk + 64 * kU) * vmax;
  };
  for (int64_t hd : {1, 3, 16, 20, 64, 128})
    for (int64_t n_kv : {1, 2, 5, 17, 128, 1000})
      for (float sharp : {1.0f, 8.0f}) {
        std::vector<float> q(static_cast<size_t>(hd)), k(static_cast<size_t>(n_kv * hd)),
            vv(static_cast<size_t>(n_kv * hd));
        for (float& e : q) e = r.uniform(-1.0f, 1.0f);
        for (float& e : k) e = r.uniform(-1.0f, 1.0f);
        for (float& e : vv) e = r.uniform(-1.0f, 1.0f);
        const float scale = sharp / std::sqrt(float(hd));
        std::vector<float> ov(static_cast<size_t>(hd)), orf(static_cast<size_t>(hd));
        v.attention(q.data(), k.data(), vv.data(), n_kv, hd, scale, ov.data());
        ref.attention(q.data(), k.data(), vv.data(), n_kv, hd, scale, orf.data());
        std::vector<double> tol(static_cast<size_t>(hd), attention_tol(q.data(), k.data(), vv.data(), n_kv, hd, scale));
        rep.compare(name + " attention", fmt("hd=%" PRId64 " n_kv=%" PRId64 " scale x%g", hd, n_kv, double(sharp)),
                    ov.data(), orf.data(), tol.data(), hd);
      }

  // attention_tile: a tile of n_tok tokens x n_grp query heads sharing one KV head, token t
  // seeing positions 0..pos0+t of a paged KV cache (kernels.h, KvView: keys dimension-major in
  // groups of 16 positions, values row-major): blocks in a shuffled
  // order, one KV head among two per block (stride twice the head's rows), f32 and f16
  // elements, every unused row filled with garbage that must not be read. Tolerance per
  // query row as for attention, on the widened keys and values. Tiles smaller and larger
  // than the kernels' query and key blocks, row strides wider than the rows (the gaps of
  // out must stay untouched), head widths the vector kernels take and ones they hand to the
  // row-by-row path.
  if (v.attention_tile && ref.attention_tile)
    for (KvType kt : {KvType::f32, KvType::f16})
      for (int64_t block : {16, 48})
        for (int64_t hd : {3, 16, 64, 128})
          for (int64_t n_grp : {1, 2, 5})
            for (int64_t n_tok : {1, 3, 17})
              for (int64_t pos0 : {0, 6, 100}) {
                const int64_t n_kv = pos0 + n_tok, ldq = n_grp * hd + 5, ldo = n_grp * hd + 3;
                const int64_t nb = (n_kv + block - 1) / block, stride = 2 * block * hd, n_ids = 2 * nb + 1;
                const float scale = 1.0f / std::sqrt(float(hd));
                std::vector<int32_t> table(static_cast<size_t>(n_ids));
                for (int64_t i = 0; i < n_ids; ++i) table[size_t(i)] = int32_t(i);
                for (int64_t i = n_ids - 1; i > 0; --i) std::swap(table[size_t(i)], table[size_t(r.below(i + 1))]);
                std::vector<float> kf(static_cast<size_t>(n_ids * stride)), vf(kf.size());
                std::vector<uint16_t> kh(kf.size()), vh(kf.size());
                for (size_t i = 0; i < kf.size(); ++i) {
                  kf[i] = r.uniform(-1.0f, 1.0f);
                  vf[i] = r.uniform(-1.0f, 1.0f);
                  kh[i] = f32_to_f16(kf[i]);
                  vh[i] = f32_to_f16(vf[i]);
                }
                // The positions' rows as contiguous f32 (widened for f16), for the tolerance.
                std::vector<float> k(static_cast<size_t>(n_kv * hd)), vv(k.size());
                // (values row-major in a block, keys dimension-major in groups of 16: kernels.h)
                for (int64_t s2 = 0; s2 < n_kv; ++s2)
                  for (int64_t d = 0; d < hd; ++d) {
                    const int64_t base = table[size_t(s2 / block)] * stride + block * hd, r = s2 % block;
                    const size_t ka = size_t(base + (r / 16) * 16 * hd + d * 16 + r % 16);
                    const size_t va = size_t(base + r * hd + d);
                    k[size_t(s2 * hd + d)] = kt == KvType::f32 ? kf[ka] : f16_to_f32(kh[ka]);
                    vv[size_t(s2 * hd + d)] = kt == KvType::f32 ? vf[va] : f16_to_f32(vh[va]);
                  }
                KvView kv;
                kv.k = kt == KvType::f32 ? static_cast<const void*>(kf.data() + block * hd)
                                         : static_cast<const void*>(kh.data() + block * hd);
                kv.v = kt == KvType::f32 ? static_cast<const void*>(vf.data() + block * hd)
                                         : static_cast<const void*>(vh.data() + block * hd);
                kv.table = table.data();
                kv.stride = stride;
                kv.block = block;
                kv.type = kt;
                std::vector<float> q(static_cast<size_t>(n_tok * ldq));
                for (float& e : q) e = r.uniform(-2.0f, 2.0f);
                std::vector<float> ov(static_cast<size_t>(n_tok * ldo), kSentinel), orf = ov;
                v.attention_tile(q.data(), ldq, n_tok, n_grp, pos0, kv, hd, scale, ov.data(), ldo);
                ref.attention_tile(q.data(), ldq, n_tok, n_grp, pos0, kv, hd, scale, orf.data(), ldo);
                std::vector<double> tol(ov.size(), 0.0);  // the gaps: bitwise, the sentinel
                for (int64_t t = 0; t < n_tok; ++t)
                  for (int64_t g = 0; g < n_grp; ++g) {
                    const double tl =
                        attention_tol(q.data() + t * ldq + g * hd, k.data(), vv.data(), pos0 + t + 1, hd, scale);
                    for (int64_t d = 0; d < hd; ++d) tol[size_t(t * ldo + g * hd + d)] = tl;
                  }
                rep.compare(name + " attention_tile",
                            fmt("%s block=%" PRId64 " hd=%" PRId64 " n_grp=%" PRId64 " n_tok=%" PRId64
                                " pos0=%" PRId64,
                                kt == KvType::f32 ? "f32" : "f16", block, hd, n_grp, n_tok, pos0),
                            ov.data(), orf.data(), tol.data(), int64_t(ov.size()));
                // Each token's rows alone (a tile of one token at its position): bitwise the same
                // (kernels.h: a row's result does not depend on the other rows of its tile).
                if (n_tok > 1) {
                  std::vector<float> one(static_cast<size_t>(ldo), kSentinel), whole(static_cast<size_t>(n_tok * ldo));
                  std::vector<float> alone(whole.size(), kSentinel);
                  for (int64_t t = 0; t < n_tok; ++t) {
                    v.attention_tile(q.data() + t * ldq, ldq, 1, n_grp, pos0 + t, kv, hd, scale, one.data(), ldo);
                    std::copy(one.begin(), one.end(), alone.begin() + t * ldo);
                  }
                  std::vector<double> zero(alone.size(), 0.0);
                  rep.compare(name + " attention_tile rows alone",
                              fmt("%s block=%" PRId64 " hd=%" PRId64 " n_grp=%" PRId64 " n_tok=%" PRId64
                                  " pos0=%" PRId64,
                                  kt == KvType::f32 ? "f32" : "f16", block, hd, n_grp, n_tok, pos0),
                              alone.data(), ov.data(), zero.data(), int64_t(alone.size()));
                }
              }

  // swiglu: out = g / (1 + exp(-g)) * up in the same order; only exp may differ: a vector
  // exp within 2 ulp (<= 4u relative) against libm's within 1 ulp (<= 2u), carried through
  // 1 + exp(-g) into out, whose own two roundings may then land on different sides:
  // |out - ref| <= 12u |ref| (neon's measured worst is ~5u). Plus 1e-30 |up|: below
  // g = -87 exp(-g) overflows and the reference returns 0 for silu(g), whose true value
  // (|g| e^g < 1e-35) a more accurate variant may return.
  // Gates cover the range where exp(-g) overflows or underflows, and +-0.
  const float specials[] = {0.0f, -0.0f, 1e-30f, -1e-30f, 87.0f, -87.0f, 88.5f, -88.5f, 89.0f, -89.0f,
                            100.0f, -100.0f, 104.0f, -104.0f, 1e4f, -1e4f};
  for (int64_t n : {1, 3, 4, 5, 15, 16, 17, 100, 1000, 4096}) {
    std::vector<float> g(static_cast<size_t>(n)), u(static_cast<size_t>(n)), ov(static_cast<size_t>(n)), orf(static_cast<size_t>(n));
    for (float& e : g) e = r.uniform(-20.0f, 20.0f);
    for (float& e : u) e = r.uniform(-2.0f, 2.0f);
    if (n >= 100)
      for (size_t i = 0; i < sizeof specials / sizeof specials[0]; ++i) g[size_t(r.below(n))] = specials[i];
    if (n == 4096)
      for (int64_t i = 0; i < n; ++i) g[size_t(i)] = -110.0f + 220.0f * float(i) / float(n);  // a sweep
    v.swiglu(g.data(), u.data(), n, ov.data());
    ref.swiglu(g.data(), u.data(), n, orf.data());
    std::vector<double> tol(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) tol[size_t(i)] = 12 * kU * std::fabs(double(orf[size_t(i)])) + 1e-30 * std::fabs(double(u[size_t(i)]));
    rep.compare(name + " swiglu", fmt("n=%" PRId64, n), ov.data(), orf.data(), tol.data(), n);
  }
}

}  // namespace

// f32_to_f16 (half.h, the KV cache's f16 rows) rounds to nearest, ties to even: every binary16
// round-trips; the midpoint between two neighbours goes to the even one and the floats just
// below / above it to the lower / upper; overflow gives infinity; NaN stays NaN.
// ThreadPool::parallel_for's chunks: both schedules cover [0, n) once, in chunks that start at
// multiples of align; guided chunks never grow and end with single units; every index is run
// exactly once by a pool of 2 and of 3 threads.
void check_thread_pool(Report& rep) {
  for (auto sched : {ThreadPool::Schedule::even, ThreadPool::Schedule::guided})
    for (int threads : {1, 2, 3, 8})
      for (int64_t n : {1, 5, 31, 32, 33, 960, 1536, 3072, 49152})
        for (int64_t align : {1, 16, 32, 64}) {
          std::vector<int64_t> b;
          ThreadPool::chunk_bounds(n, align, 4, sched, threads, &b);
          bool ok = b.front() == 0 && b.back() == n && b.size() >= 2;
          for (size_t i = 1; ok && i < b.size(); ++i) {
            ok = b[i] > b[i - 1] && (b[i] == n || b[i] % align == 0);
            if (sched == ThreadPool::Schedule::guided && i + 1 < b.size() && b[i + 1] < n)
              ok = ok && b[i + 1] - b[i] <= b[i] - b[i - 1];
          }
          if (ok && sched == ThreadPool::Schedule::guided && n > align)
            ok = b[b.size() - 1] - b[b.size() - 2] <= align;
          if (ok && sched == ThreadPool::Schedule::even)
            ok = int64_t(b.size() - 1) <= std::max<int64_t>(1, int64_t(threads) * 4);
          rep.expect("thread_pool chunk_bounds",
                     fmt("%s threads=%d n=%" PRId64 " align=%" PRId64,
                         sched == ThreadPool::Schedule::guided ? "guided" : "even", threads, n, align),
                     ok);
        }
  for (int threads : {2, 3})
    for (auto sched : {ThreadPool::Schedule::even, ThreadPool::Schedule::guided}) {
      ThreadPool pool(threads);
      const int64_t n = 10007;
      std::vector<int> hits(static_cast<size_t>(n), 0);
      pool.parallel_for(n, [&](int64_t b, int64_t e) { for (int64_t i = b; i < e; ++i) ++hits[size_t(i)]; }, 7, 4, sched);
      rep.expect("thread_pool parallel_for",
                 fmt("%s threads=%d: every index once", sched == ThreadPool::Schedule::guided ? "guided" : "even", threads),
                 std::all_of(hits.begin(), hits.end(), [](int h) { return h == 1; }));
    }
}

void check_f32_to_f16(Report& rep) {
  int64_t bad = 0;
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const uint16_t x = uint16_t(h);
    const bool nan = (x & 0x7C00u) == 0x7C00u && (x & 0x3FFu);
    const uint16_t back = f32_to_f16(f16_to_f32(x));
    if (nan ? !((back & 0x7C00u) == 0x7C00u && (back & 0x3FFu)) : back != x) ++bad;
    if ((x & 0x7FFFu) >= 0x7BFFu) continue;  // no finite upper neighbour
    const float lo = f16_to_f32(x), hi = f16_to_f32(uint16_t(x + 1));  // same sign: |hi| > |lo|
    const float mid = lo + (hi - lo) / 2;  // exact: halves have 11 significant bits
    const uint16_t even = (x & 1u) ? uint16_t(x + 1) : x;
    if (f32_to_f16(mid) != even) ++bad;
    if (f32_to_f16(std::nextafter(mid, lo)) != x) ++bad;
    if (f32_to_f16(std::nextafter(mid, hi)) != uint16_t(x + 1)) ++bad;
  }
  for (float f : {65520.0f, 1e6f, INFINITY}) {
    if (f32_to_f16(f) != 0x7C00u || f32_to_f16(-f) != 0xFC00u) ++bad;
  }
  if (f32_to_f16(65519.0f) != 0x7BFFu || f32_to_f16(1e-9f) != 0 || f32_to_f16(-1e-9f) != 0x8000u) ++bad;
  rep.expect("f32_to_f16 round to nearest even", "every binary16, its neighbours' midpoints, overflow", bad == 0);
}

int main(int argc, char** argv) {
  // --dispatch-only: report the variants and what select_kernels() picks, check nothing else (for
  // a CPU whose only variant is ref, already checked on one that has more: .ci/neon.sh's cortex-a53).
  // --shape-stride N: of the OpenELM shapes, every N-th and the last (the sanitizer run in
  // .ci/hardening.sh, where the instrumented harness is ~8x slower; the native run checks all).
  bool dispatch_only = false;
  long stride = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    char* end = nullptr;
    if (a == "--dispatch-only") {
      dispatch_only = true;
    } else if (a == "--shape-stride" && i + 1 < argc && (stride = std::strtol(argv[i + 1], &end, 10)) >= 1 &&
               *end == '\0') {
      ++i;
    } else {
      std::fprintf(stderr, "usage: kernel_check [--dispatch-only] [--shape-stride N>=1]  "
                           "(OPENELM_RT_KERNELS=<variant> checks one variant)\n");
      return 2;
    }
  }
  if (stride > 1) {
    std::vector<Shape> some;
    for (size_t i = 0; i < kOpenElmShapes.size(); i += size_t(stride)) some.push_back(kOpenElmShapes[i]);
    if ((kOpenElmShapes.size() - 1) % size_t(stride) != 0) some.push_back(kOpenElmShapes.back());
    std::printf("kernel_check: %zu of the %zu OpenELM shapes (--shape-stride %ld)\n", some.size(),
                kOpenElmShapes.size(), stride);
    kOpenElmShapes = some;
  }
  const std::vector<KernelVariant>& compiled = compiled_kernel_variants();
  std::string names;
  for (const KernelVariant& k : compiled) names += std::string(names.empty() ? "" : ", ") + k.name;
  std::string supported;
  for (const std::string& s : supported_kernel_variants()) supported += (supported.empty() ? "" : ", ") + s;
  std::printf("kernel_check: compiled variants: %s; supported by this CPU: %s\n", names.c_str(), supported.c_str());

  const KernelTable& ref = ref_kernels();
  std::vector<const KernelTable*> tables;
  Report rep;
  const char* env = std::getenv("OPENELM_RT_KERNELS");
  try {
    const KernelTable& chosen = select_kernels();  // auto, or the variant OPENELM_RT_KERNELS forces
    std::printf("kernel_check: select_kernels() picks %s\n", chosen.name);
    if (dispatch_only) return 0;
    if (env && *env) {
      tables.push_back(&chosen);
    } else {
      // auto must pick the fastest supported variant (the first in the list).
      const std::string first = supported_kernel_variants().front();
      rep.expect("dispatch: auto picks " + first, "select_kernels()", first == chosen.name);
      for (const KernelVariant& k : compiled)
        if (k.cpu_supports() && std::string(k.name) != "ref") tables.push_back(&k.table());
    }
  } catch (const InvalidArgument& e) {
    std::printf("kernel_check: %s\n", e.what());
    return 2;
  }
  // The reference's own block-quantized kernels are checked against FORMAT.md in any case.
  if (std::find(tables.begin(), tables.end(), &ref) == tables.end()) tables.push_back(&ref);

  for (const KernelTable* t : tables) {
    const std::string name = t->name;
    const KernelTable& v = *t;
    Rng r(0x6F656C6DULL);  // the same data for every variant
    std::printf("kernel_check: checking %s\n", name.c_str());
    std::fflush(stdout);
    if (&v != &ref) {
      check_matmul(rep, name, v, ref, r);
      check_matmul_xbf16(rep, name, v, ref, r);
      check_matmul_packed(rep, name, v, ref, r);
      check_matmul_xbf16_packed(rep, name, v, ref, r);
      check_ops(rep, name, v, ref, r);
    }
    check_qmatmul(rep, name, v, ref, r);
    check_quantize_row(rep, name, v, r);
    check_row_to_f32(rep, name, v, ref, r);
    check_row_to_f32_q4k(rep, name, v, r);
  }
  check_f32_to_f16(rep);
  check_thread_pool(rep);
  if (tables.size() == 1 && !(env && *env))
    std::printf("kernel_check: no SIMD variant compiled in that this CPU supports; only the reference's "
                "block-quantized kernels were checked (against FORMAT.md)\n");
  return rep.summary();
}
