// The CUDA backend's entry points in a build without it (OPENELM_RT_CUDA=OFF, or AUTO where
// CMake found no nvcc): it reports itself unavailable and says how to get it.
#include "common/error.h"
#include "model/cuda.h"

namespace oelm {

namespace {
const char* kNoCuda =
    "this build of openelm_rt has no CUDA backend; rebuild it with CMake option -DOPENELM_RT_CUDA=ON "
    "(needs nvcc, the CUDA toolkit) -- e.g. CMAKE_ARGS=-DOPENELM_RT_CUDA=ON pip install .";
}

bool cuda_compiled() { return false; }

bool cuda_available(std::string* why) {
  if (why) *why = kNoCuda;
  return false;
}

std::string cuda_device_description() { return ""; }

int64_t cuda_free_memory() { return 0; }

std::unique_ptr<Executor> make_cuda_executor(std::shared_ptr<const Model>, std::shared_ptr<Backend>,
                                             const KvGeometry&, int64_t, int64_t) {
  throw InvalidArgument(kNoCuda);
}

}  // namespace oelm
