// Backend construction and the threaded matmul driver.
#include "model/backend.h"

#include <thread>

#include "common/error.h"
#include "kernels/dispatch.h"

namespace oelm {

std::vector<std::string> Backend::names() { return {"cpu", "ref"}; }

std::shared_ptr<Backend> Backend::create(const std::string& name, int threads, const std::string& kernels) {
  if (threads < 0) throw InvalidArgument("threads must be >= 1 (or 0 for one per core), got " + std::to_string(threads));
  if (name == "ref") {
    if (!kernels.empty() && kernels != "ref")
      throw InvalidArgument("backend 'ref' always runs the reference kernels; use backend 'cpu' to choose "
                            "kernels '" + kernels + "'");
    if (threads > 1)
      throw InvalidArgument("backend 'ref' is the single-threaded scalar reference; threads must be 1, got " +
                            std::to_string(threads));
    return std::shared_ptr<Backend>(new Backend("ref", &ref_kernels(), 1));
  }
  if (name == "cpu") {
    int n = threads > 0 ? threads : int(std::thread::hardware_concurrency());
    if (n <= 0) n = 1;
    if (n > 1024) throw InvalidArgument("threads must be at most 1024, got " + std::to_string(n));
    const KernelTable& k = kernels.empty() ? select_kernels() : kernels_by_name(kernels);
    return std::shared_ptr<Backend>(new Backend("cpu", &k, n));
  }
  throw InvalidArgument("unknown backend '" + name + "'; available: cpu, ref");
}

void Backend::matmul(const float* x, int64_t T, const TensorView& W, float* y, int64_t ldy) {
  const int64_t N = W.rows(), K = W.cols();
  matmul_fn fn = k_->matmul[int(W.dtype)];
  // Chunks of 16 rows keep each thread's slice of W contiguous and cache-line aligned.
  pool_.parallel_for(N, [&](int64_t n0, int64_t n1) { fn(x, T, K, W.data, n0, n1, y, ldy); }, 16);
}

}  // namespace oelm
