// A persistent pool of worker threads for data-parallel kernels.
// `run(fn)` calls fn(i, n) once on each of the n threads (the caller is thread 0) and
// returns when all are done. Work is split statically by the callers, so every output
// element is computed by the same code in the same order whatever n is: results are
// bitwise identical across thread counts. Not re-entrant: one run() at a time.
#pragma once
#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace oelm {

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Runs fn(thread_index, n_threads) on every thread; rethrows the first exception.
  void run(const std::function<void(int, int)>& fn);

  // Splits [0, n) into contiguous chunks, one per thread, and calls fn(begin, end)
  // for the non-empty ones. `align` rounds chunk boundaries to a multiple of it.
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn,
                    int64_t align = 1);

 private:
  void worker(int index);

  int n_threads_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  const std::function<void(int, int)>* job_ = nullptr;
  std::exception_ptr error_;
  std::mutex error_mu_;
};

}  // namespace oelm
