// Measures sustained memory read bandwidth with the same thread pool the kernels use,
// so benchmarks can print decode speed next to its memory-bound ceiling.
#pragma once
#include <cstddef>

#include "common/thread_pool.h"

namespace oelm {

// Reads a `bytes`-sized buffer `reps` times; returns the best pass in bytes/second.
double measure_read_bandwidth(ThreadPool& pool, size_t bytes, int reps);

}  // namespace oelm
