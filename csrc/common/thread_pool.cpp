// ThreadPool: workers spin briefly on the generation counter before sleeping on a
// condition variable, because decode issues ~100 small parallel regions per token
// and a futex wake-up per region would cost more than the work in the small layers.
#include "common/thread_pool.h"

#include <algorithm>

namespace oelm {

namespace {
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}
constexpr int kSpinIterations = 20000;  // ~50-100 us before falling back to sleeping
constexpr uint64_t kClosed = 0xFFFFFFFFull;
}  // namespace

ThreadPool::ThreadPool(int n_threads) : n_threads_(std::max(1, n_threads)) {
  for (int i = 1; i < n_threads_; ++i) threads_.emplace_back([this] { worker(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
    generation_.fetch_add(1);
  }
  wake_.notify_all();
  for (auto& t : threads_) t.join();
}

void ThreadPool::work_on(uint32_t gen) {
  for (;;) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    if (uint32_t(t >> 32) != gen || uint32_t(t) >= n_chunks_.load(std::memory_order_relaxed)) return;
    if (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) continue;
    // This chunk is ours; the job cannot finish (and fn_/bounds_ cannot change) until we
    // report it done below.
    const int64_t b = bounds_[uint32_t(t)], e = bounds_[uint32_t(t) + 1];
    try {
      (*fn_)(b, e);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mu_);
      if (!error_) error_ = std::current_exception();
    }
    done_.fetch_add(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::worker() {
  uint32_t seen = 0;
  for (;;) {
    uint32_t gen = generation_.load(std::memory_order_acquire);
    for (int spin = 0; gen == seen && spin < kSpinIterations; ++spin) {
      cpu_relax();
      gen = generation_.load(std::memory_order_acquire);
    }
    if (gen == seen) {
      std::unique_lock<std::mutex> lock(mu_);
      sleepers_.fetch_add(1);
      wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      sleepers_.fetch_sub(1);
      gen = generation_.load(std::memory_order_acquire);
    }
    seen = gen;
    if (stop_.load()) return;
    work_on(gen);
  }
}

void ThreadPool::chunk_bounds(int64_t n, int64_t align, int chunks_per_thread, Schedule schedule, int threads,
                              std::vector<int64_t>* out) {
  std::vector<int64_t>& bounds = *out;
  bounds.assign(1, 0);
  if (n <= 0) return;
  align = std::max<int64_t>(1, align);
  const int64_t units = (n + align - 1) / align;
  if (schedule == Schedule::guided) {
    // Each chunk a quarter of the remaining units per thread pair (rounded up): two threads
    // with 48 units take 12, 9, 7, 5, 4, 3, 2, 2, 1, 1, 1, 1.
    const int64_t div = 2 * int64_t(std::max(1, threads));
    for (int64_t u = 0; u < units;) {
      u += std::max<int64_t>(1, (units - u + div - 1) / div);
      bounds.push_back(std::min(n, u * align));
    }
    return;
  }
  const int64_t chunks = std::min<int64_t>(units, int64_t(std::max(1, threads)) * std::max(1, chunks_per_thread));
  const int64_t chunk = (units + chunks - 1) / chunks * align;
  for (int64_t b = chunk; b < n; b += chunk) bounds.push_back(b);
  bounds.push_back(n);
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t align,
                              int chunks_per_thread, Schedule schedule) {
  if (n <= 0) return;
  align = std::max<int64_t>(1, align);
  if (n_threads_ == 1 || n <= align) {
    fn(0, n);
    return;
  }
  chunk_bounds(n, align, chunks_per_thread, schedule, n_threads_, &bounds_);
  fn_ = &fn;
  n_chunks_.store(uint32_t(bounds_.size() - 1), std::memory_order_relaxed);
  error_ = nullptr;
  done_.store(0, std::memory_order_relaxed);
  const uint32_t gen = generation_.load(std::memory_order_relaxed) + 1;
  ticket_.store(uint64_t(gen) << 32, std::memory_order_release);
  generation_.store(gen, std::memory_order_release);
  if (sleepers_.load(std::memory_order_acquire) > 0) {
    std::lock_guard<std::mutex> lock(mu_);  // orders the store with sleepers' predicate checks
    wake_.notify_all();
  }
  work_on(gen);
  const uint32_t total = n_chunks_.load(std::memory_order_relaxed);
  while (done_.load(std::memory_order_acquire) != total) cpu_relax();
  ticket_.store((uint64_t(gen) << 32) | kClosed, std::memory_order_release);
  fn_ = nullptr;
  if (error_) std::rethrow_exception(error_);
}

}  // namespace oelm
