// The CUDA backend, seen from the device-neutral core: whether this build carries it, whether
// a device is usable, and its executor (executor.h). Built without CUDA (OPENELM_RT_CUDA=OFF,
// or AUTO without nvcc), cuda_compiled() is false and the rest reports the backend unavailable;
// built with it, nothing here needs a GPU until an executor is made (no device: unavailable,
// with the CUDA runtime's reason).
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "model/executor.h"

namespace oelm {

bool cuda_compiled();
// True when a CUDA device can be used; otherwise *why (if given) says why not and what to do.
bool cuda_available(std::string* why = nullptr);
// "NVIDIA H200 (sm_90, 139.8 GiB)" for device 0; "" when unavailable.
std::string cuda_device_description();
// Free memory of device 0 in bytes (0 when unavailable).
int64_t cuda_free_memory();

// The CUDA executor: weights copied to device 0 once (as stored in the file), the KV blocks and
// every activation in device memory; forward() takes the step's token ids and block tables in
// and brings only the requested logits back. backend supplies the host threads the runtime uses
// around it. Throws InvalidArgument when CUDA is unavailable (with the reason).
std::unique_ptr<Executor> make_cuda_executor(std::shared_ptr<const Model> model, std::shared_ptr<Backend> backend,
                                             const KvGeometry& kv, int64_t max_context, int64_t max_step_tokens);

}  // namespace oelm
