// Read-bandwidth probe: each thread sums its slice of a large buffer with several
// independent accumulators (so the loop is load-bound, not add-latency-bound). The
// buffer asks for transparent huge pages, as the model loader does for the weights
// (format/oelm_file.cpp), so the bound is not set by 4 KiB-page TLB misses that the
// weights do not have.
#include "common/bandwidth.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace oelm {

double measure_read_bandwidth(ThreadPool& pool, size_t bytes, int reps) {
  const size_t n = std::max<size_t>(bytes / sizeof(uint64_t), 1024);
  constexpr size_t kHuge = size_t(2) << 20;
  // Not value-initialised: no page may be touched before the madvise below.
  std::unique_ptr<uint64_t[]> storage(new uint64_t[n + kHuge / sizeof(uint64_t)]);
  uint64_t* const buf = reinterpret_cast<uint64_t*>(
      (reinterpret_cast<uintptr_t>(storage.get()) + kHuge - 1) & ~uintptr_t(kHuge - 1));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  ::madvise(buf, n * sizeof(uint64_t), MADV_HUGEPAGE);  // advisory; before the first touch
#endif
  pool.parallel_for(int64_t(n), [&](int64_t b, int64_t e) {  // first touch by the reading thread
    std::memset(buf + b, 1, size_t(e - b) * sizeof(uint64_t));
  }, 4096);
  std::atomic<uint64_t> total{0};  // keeps the reads from being optimised away
  double best = 0;
  for (int r = 0; r < std::max(1, reps); ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    pool.parallel_for(int64_t(n), [&](int64_t b, int64_t e) {
      uint64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t k = b;
      for (; k + 8 <= e; k += 8)
        for (int j = 0; j < 8; ++j) acc[j] += buf[size_t(k + j)];
      for (; k < e; ++k) acc[0] += buf[size_t(k)];
      uint64_t s = 0;
      for (int j = 0; j < 8; ++j) s += acc[j];
      total.fetch_add(s, std::memory_order_relaxed);
    }, 1 << 16);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, double(n * sizeof(uint64_t)) / s);
  }
  volatile uint64_t keep = total.load();
  (void)keep;
  return best;
}

}  // namespace oelm
