// Backend construction and the threaded matmul driver.
#include "model/backend.h"

#include <thread>

#include "common/error.h"
#include "common/half.h"
#include "kernels/dispatch.h"
#include "model/cuda.h"

namespace oelm {

std::vector<std::string> Backend::names() {
  std::vector<std::string> n{"cpu", "ref"};
  if (cuda_compiled()) n.push_back("cuda");
  return n;
}

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
  if (name == "cuda") {
    // The forward pass runs on the GPU (model/cuda.h); the Backend keeps the CPU kernels and
    // threads for the host-side work around it (score_batch's log-softmax, the engine).
    std::string why;
    if (!cuda_available(&why)) throw InvalidArgument("backend 'cuda': " + why);
    if (!kernels.empty())
      throw InvalidArgument("backend 'cuda' runs its own kernels; kernels '" + kernels + "' is for backend 'cpu'");
    int n = threads > 0 ? threads : int(std::thread::hardware_concurrency());
    if (n <= 0) n = 1;
    if (n > 1024) throw InvalidArgument("threads must be at most 1024, got " + std::to_string(n));
    return std::shared_ptr<Backend>(new Backend("cuda", &select_kernels(), n));
  }
  throw InvalidArgument("unknown backend '" + name + "'; available: cpu, ref" +
                        (cuda_compiled() ? ", cuda" : " (cuda: not in this build)"));
}

bool Backend::supports(DType t) const {
  const int i = int(t);
  return (dtype_is_quantized(t) ? k_->qmatmul[i] != nullptr && k_->quantize_row != nullptr
                                : k_->matmul[i] != nullptr) &&
         k_->row_to_f32[i] != nullptr;
}

const float* Backend::pack_token_groups(const float* x, int64_t T, int64_t K) {
  const int64_t G = T / kF32Group;
  if (act_f32_.size() < size_t(G * kF32Group * K)) act_f32_.resize(size_t(G * kF32Group * K));
  float* xp = act_f32_.data();
  pack_f32_fn pack = k_->pack_f32;
  pool_.parallel_for(G, [&](int64_t g0, int64_t g1) { pack(x, K, g0, g1, xp); }, 1, 4, ThreadPool::Schedule::guided);
  return xp;
}

std::function<void(int64_t, int64_t)> Backend::prepare_matmul(const float* x, int64_t T, const TensorView& W,
                                                             float* y, int64_t ldy) {
  const int64_t N = W.rows(), K = W.cols();
  if (!supports(W.dtype))
    throw InvalidArgument(std::string("backend '") + name_ + "' (kernels '" + k_->name + "') has no matmul for " +
                          dtype_name(W.dtype) + " weights (tensor '" + W.name + "')");
  if (rounds_activations(W.dtype)) {  // round x to bf16 once; every row block reuses it
    if (act_bf16_.size() < size_t(T * K)) act_bf16_.resize(size_t(T * K));
    uint16_t* xb = act_bf16_.data();
    auto round_rows = [&](int64_t t0, int64_t t1) {
      for (int64_t i = t0 * K; i < t1 * K; ++i) xb[i] = f32_to_bf16(x[i]);
    };
    if (T == 1) round_rows(0, 1);
    else pool_.parallel_for(T, round_rows);
    if (packs(W, T)) {  // and pack its bf16 pairs as 32-bit words (kernels.h, matmul_xbf16_packed_fn)
      const float* xp = pack_token_groups(reinterpret_cast<const float*>(xb), T, K / 2);
      matmul_xbf16_packed_fn fn = k_->matmul_xbf16_packed[int(W.dtype)];
      return [=](int64_t n0, int64_t n1) { fn(xb, xp, T, K, W.data, n0, n1, y, ldy); };
    }
    matmul_xbf16_fn fn = k_->matmul_xbf16[int(W.dtype)];
    return [=](int64_t n0, int64_t n1) { fn(xb, T, K, W.data, n0, n1, y, ldy); };
  }
  if (packs(W, T)) {  // pack the activations once; every row chunk reuses them
    const float* xp = pack_token_groups(x, T, K);
    matmul_f32_packed_fn fn = k_->matmul_packed[int(W.dtype)];
    return [=](int64_t n0, int64_t n1) { fn(x, xp, T, K, W.data, n0, n1, y, ldy); };
  }
  if (!dtype_is_quantized(W.dtype)) {
    matmul_fn fn = k_->matmul[int(W.dtype)];
    return [=](int64_t n0, int64_t n1) { fn(x, T, K, W.data, n0, n1, y, ldy); };
  }
  // Quantize the activations once, then every row block reuses them.
  const int64_t Kp = q_padded_k(K), nb = Kp / kQBlock;
  if (act_q_.size() < size_t(T * Kp)) act_q_.resize(size_t(T * Kp));
  if (act_d_.size() < size_t(T * nb)) {
    act_d_.resize(size_t(T * nb));
    act_s_.resize(size_t(T * nb));
  }
  quantize_row_fn quantize = k_->quantize_row;
  auto quantize_rows = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      quantize(x + t * K, K, act_q_.data() + t * Kp, act_d_.data() + t * nb, act_s_.data() + t * nb);
  };
  if (T == 1) quantize_rows(0, 1);
  else pool_.parallel_for(T, quantize_rows);
  const QActs acts{act_q_.data(), act_d_.data(), act_s_.data(), Kp};
  qmatmul_fn fn = k_->qmatmul[int(W.dtype)];
  const uint8_t* w = W.data;
  return [=](int64_t n0, int64_t n1) { fn(acts, T, w, N, n0, n1, y, ldy); };
}

void Backend::matmul(const float* x, int64_t T, const TensorView& W, float* y, int64_t ldy,
                     const std::function<void(int64_t, int64_t)>& epilogue) {
  // Chunks start at multiples of row_align(): each thread streams whole (groups of) panels
  // of quantized W, and slices of float W that are contiguous and cache-line aligned (packed
  // f32: whole 32-row register tiles).
  const auto rows = prepare_matmul(x, T, W, y, ldy);
  if (!epilogue) {
    pool_.parallel_for(W.rows(), rows, row_align(W, T), chunks_per_thread(T), schedule(T));
    return;
  }
  pool_.parallel_for(W.rows(), [&](int64_t n0, int64_t n1) {
    rows(n0, n1);
    epilogue(n0, n1);
  }, row_align(W, T), chunks_per_thread(T), schedule(T));
}

bool Backend::packs(const TensorView& W, int64_t T) const {
  // From three token groups on: with fewer, repacking W costs about what the tiles save (one
  // core, f32 [960, 576] / [3072, 576] / [576, 1536]: T = 24 slower, 36 on a par or faster).
  // f16 / bf16 weights multiplied exactly take matmul_packed, bf16 weights times bf16-rounded
  // activations matmul_xbf16_packed (pairs of columns: K a multiple of 32).
  if (T < 3 * kF32Group || k_->pack_f32 == nullptr) return false;
  if (rounds_activations(W.dtype)) return k_->matmul_xbf16_packed[int(W.dtype)] != nullptr && W.cols() % 32 == 0;
  return k_->matmul_packed[int(W.dtype)] != nullptr && W.cols() % 16 == 0;
}

int Backend::chunks_per_thread(int64_t T) {
  // Decode streams W once from memory: long contiguous slices per thread let the
  // hardware prefetchers run ahead. Two-thread 270M decode, 9 interleaved runs, 1 / 2 / 4
  // chunks per thread: q4 161 / 163 / 157, q8 107 / 108 / 104 tok/s (the earlier q layout;
  // with the current one, 1 and 2 measured the same). Two rather than one, so that a thread the OS deschedules
  // holds up half of its share, not all of it. Prefill is compute-bound: more, smaller
  // chunks balance the load.
  return T == 1 ? 2 : 4;
}

ThreadPool::Schedule Backend::schedule(int64_t T) {
  // Prefill: chunks that shrink towards the end, so that the two threads of a product finish
  // within one row unit of each other (with even chunks, a quarter of a thread's share: under
  // a timer on the lm-eval replay, 7-11% of the big products' thread time went to waiting).
  // Decode keeps even, long slices (chunks_per_thread).
  return T == 1 ? ThreadPool::Schedule::even : ThreadPool::Schedule::guided;
}

int64_t Backend::row_align(const TensorView& W, int64_t T) const {
  // Quantized chunks of four whole panels: prefill's tiles take panels in pairs. Decode
  // (a panel at a time) measured the same with 16- and 64-row chunks (two threads, 270M
  // and 1.1B, q8 and q4, interleaved runs). Packed f32: whole 32-row register tiles.
  if (packs(W, T)) return 2 * kQRows;
  return dtype_is_quantized(W.dtype) ? 4 * kQRows : kQRows;
}

void Backend::matmul_swiglu(const float* x, int64_t T, const TensorView& gate_up, float* gu, float* act) {
  const int64_t F = gate_up.rows() / 2;
  const auto rows = prepare_matmul(x, T, gate_up, gu, 2 * F);
  swiglu_fn swiglu = k_->swiglu;
  if (F % kQRows != 0) {  // the up half would not start on a panel: no fusion
    pool_.parallel_for(2 * F, rows, row_align(gate_up, T), chunks_per_thread(T), schedule(T));
    pool_.parallel_for(T, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) swiglu(gu + t * 2 * F, gu + t * 2 * F + F, F, act + t * F);
    });
    return;
  }
  // Each thread computes gate rows [f0, f1) and the matching up rows, then SwiGLU on them
  // while they are still in its cache.
  pool_.parallel_for(F, [&](int64_t f0, int64_t f1) {
    rows(f0, f1);
    rows(F + f0, F + f1);
    for (int64_t t = 0; t < T; ++t) swiglu(gu + t * 2 * F + f0, gu + t * 2 * F + F + f0, f1 - f0, act + t * F + f0);
  }, row_align(gate_up, T), chunks_per_thread(T), schedule(T));
}

}  // namespace oelm
