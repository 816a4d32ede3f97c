// A persistent pool of worker threads for data-parallel kernels.
// parallel_for(n, fn) cuts [0, n) into chunks that threads claim dynamically (the
// caller works too), so a worker the OS has descheduled delays nothing: the others
// take its chunks. Every output element is computed by the same code whichever
// thread runs it, so results are bitwise identical for any thread count.
// Not re-entrant: one parallel_for at a time per pool.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
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

  // Calls fn(begin, end) over disjoint chunks covering [0, n); chunk boundaries are
  // multiples of `align`, and there are at most chunks_per_thread * size() of them
  // (more balance the load when a thread is slow; fewer give each thread longer
  // contiguous runs). Rethrows the first exception a chunk threw.
  // Schedule::guided ignores chunks_per_thread: chunks shrink as the work runs out (each a
  // quarter of what is left per thread pair, down to one `align` unit), so the threads start
  // on long runs and finish within about one unit of each other.
  enum class Schedule { even, guided };
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t align = 1,
                    int chunks_per_thread = 4, Schedule schedule = Schedule::even);

  // The chunk boundaries parallel_for(n, .., align, chunks_per_thread, schedule) uses with
  // `threads` threads, into *out: [0, b1, .., n].
  static void chunk_bounds(int64_t n, int64_t align, int chunks_per_thread, Schedule schedule, int threads,
                           std::vector<int64_t>* out);

 private:
  void worker();
  // Claims and runs chunks of job `gen` until none is left.
  void work_on(uint32_t gen);

  int n_threads_;
  std::vector<std::thread> threads_;

  // The current job. Written by the caller before the generation is published;
  // stays valid while any claimed chunk of it is unfinished.
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  std::vector<int64_t> bounds_;  // chunk i is [bounds_[i], bounds_[i + 1])
  std::atomic<uint32_t> n_chunks_{0};

  // (generation << 32) | next chunk index. Claiming a chunk is a CAS on this word,
  // so a late worker can never claim a chunk of a job other than the one it saw.
  // Between jobs the index is kClosed, so nothing can be claimed while the next
  // job's fields are being written.
  std::atomic<uint64_t> ticket_{0};
  std::atomic<uint32_t> done_{0};
  std::atomic<uint32_t> generation_{0};
  std::atomic<bool> stop_{false};
  std::atomic<int> sleepers_{0};
  std::mutex mu_;
  std::condition_variable wake_;
  std::mutex error_mu_;
  std::exception_ptr error_;
};

}  // namespace oelm
