// Peak multiply-add rate of one core: 512-bit f32 FMAs (vfmadd231ps) against bf16 dot products
// (vdpbf16ps, AVX-512 BF16), the two instructions our bf16 matmuls choose between (exact f32
// activations, or activations rounded to bf16). Each loop runs 24 independent accumulator chains
// (enough to cover the latency of two pipes), so it measures throughput, not latency; the
// best of --repeats timings is printed, with the ratio. docs/WEIGHT_TYPES.md quotes it.
//
//   c++ -O2 -march=native benchmarks/fma_rate.cpp -o /tmp/fma_rate && /tmp/fma_rate [repeats]
//
// (Run it under `taskset -c 0` to keep it on one core; it uses one thread.) A vdpbf16ps does 32
// multiply-adds (64 FLOP) per instruction, a vfmadd231ps 16 (32 FLOP).
#include <immintrin.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>

#if !defined(__AVX512F__) || !defined(__AVX512BF16__)
#error "needs a compiler and CPU with AVX-512 F and BF16 (-march=native on such a CPU)"
#endif

namespace {

constexpr int kChains = 24;
constexpr long kIters = 20'000'000;

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Returns seconds; `sink` keeps the results alive.
template <class Step>
double run(Step step, float* sink) {
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(float(c) * 1e-9f);
  const double t0 = now();
  for (long i = 0; i < kIters; ++i) {
#pragma GCC unroll 24
    for (int c = 0; c < kChains; ++c) acc[c] = step(acc[c]);
  }
  const double t = now() - t0;
  __m512 s = acc[0];
  for (int c = 1; c < kChains; ++c) s = _mm512_add_ps(s, acc[c]);
  *sink += _mm512_reduce_add_ps(s);
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  const int repeats = argc > 1 ? std::atoi(argv[1]) : 5;
  float sink = 0;
  volatile float va = 1.0000001f, vb = 0.9999999f;
  const __m512 a = _mm512_set1_ps(va), b = _mm512_set1_ps(vb);
  const __m512bh ab = _mm512_cvtne2ps_pbh(a, a), bb = _mm512_cvtne2ps_pbh(b, b);
  double best_fma = 1e30, best_dp = 1e30;
  for (int r = 0; r < repeats; ++r) {  // interleaved, so a slow minute hits both
    const double tf = run([&](__m512 x) { return _mm512_fmadd_ps(a, b, x); }, &sink);
    const double td = run([&](__m512 x) { return _mm512_dpbf16_ps(x, ab, bb); }, &sink);
    if (tf < best_fma) best_fma = tf;
    if (td < best_dp) best_dp = td;
    std::printf("repeat %d: f32 FMA %.1f GFLOP/s, vdpbf16ps %.1f GFLOP/s\n", r + 1,
                double(kIters) * kChains * 32 / tf * 1e-9, double(kIters) * kChains * 64 / td * 1e-9);
  }
  const double gf = double(kIters) * kChains * 32 / best_fma * 1e-9;
  const double gd = double(kIters) * kChains * 64 / best_dp * 1e-9;
  std::printf("best of %d: f32 FMA (vfmadd231ps zmm) %.1f GFLOP/s, bf16 dot (vdpbf16ps zmm) %.1f GFLOP/s, "
              "ratio %.2f (sink %g)\n", repeats, gf, gd, gd / gf, double(sink));
  return 0;
}
