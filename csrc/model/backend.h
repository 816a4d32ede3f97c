// A compute backend for the CPU: a kernel table plus the threads that run it.
// "ref" = the scalar reference kernels on one thread (the truth for tests);
// "cpu" = the fastest kernels this CPU supports, on a persistent thread pool;
// "cuda" = the forward pass on the GPU (model/cuda.h); the kernel table and threads here then
// serve only the host-side work around it (the runtime's log-softmax, sampling).
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/thread_pool.h"
#include "kernels/kernels.h"

namespace oelm {

class Backend {
 public:
  // name: "ref" or "cpu"; threads <= 0 means one per hardware thread ("cpu" only).
  // kernels: the "cpu" backend's kernel variant (dispatch.h): "" = OPENELM_RT_KERNELS
  // or the fastest this CPU supports, "auto" = the fastest, or a variant name.
  static std::shared_ptr<Backend> create(const std::string& name, int threads,
                                         const std::string& kernels = "");
  static std::vector<std::string> names();

  const std::string& name() const { return name_; }
  bool is_cuda() const { return name_ == "cuda"; }
  int threads() const { return pool_.size(); }
  const KernelTable& kernels() const { return *k_; }
  ThreadPool& pool() { return pool_; }

  // y[t*ldy + n] = x[t] . W[n] for all t < T, n < W.rows(); rows split across threads.
  // For block-quantized W the T activation rows are first quantized (kernels.h, QActs)
  // into scratch owned by this Backend, so one Backend runs one matmul at a time (as its
  // thread pool already requires).
  // epilogue (optional): called as epilogue(n0, n1) by the thread that computed output rows
  // [n0, n1) for all T tokens, right after them (e.g. to add them to a residual while they are
  // in its cache), instead of in a pass of its own after the product.
  void matmul(const float* x, int64_t T, const TensorView& W, float* y, int64_t ldy,
              const std::function<void(int64_t, int64_t)>& epilogue = nullptr);

  // SwiGLU feed-forward input: gu[t, 0:2F] = x[t] . gate_up (rows [0, F) gate, [F, 2F) up)
  // and act[t*F + j] = silu(gu[t, j]) * gu[t, F + j], fused so each thread applies SwiGLU
  // to the gate and up rows it has just computed (one pass and one join fewer).
  void matmul_swiglu(const float* x, int64_t T, const TensorView& gate_up, float* gu, float* act);

  // True if the kernel table has a matmul and a row lookup for this weight dtype.
  bool supports(DType t) const;

  // bf16 weights: true (the default) multiplies them by the exact f32 activations (f32 FMAs),
  // false by activations rounded to bf16 where the kernels have bf16 dot products (matmul_xbf16;
  // AVX-512 BF16). "ref" is always exact. docs/WEIGHT_TYPES.md: the cost in KL and the speed of
  // each, measured, and why exact is the default.
  void set_exact(bool exact) { exact_ = exact || name_ == "ref"; }
  bool exact() const { return exact_; }
  // Whether matmuls with weights of this dtype round their activations (bf16 dot products).
  // (Not with the reference kernels: theirs is the truth kernel_check compares against, and
  // slower than exact FMAs.)
  bool rounds_activations(DType t) const {
    return !exact_ && k_ != &ref_kernels() && k_->matmul_xbf16[int(t)] != nullptr;
  }
  // Whether the kernels have a packed path (pack_f32 and matmul_packed or matmul_xbf16_packed) for
  // weights of this dtype (f32; f16 and bf16 widened into f32 panels; bf16 pairs for bf16 x bf16).
  bool packs_dtype(DType t) const {
    return k_->pack_f32 != nullptr && (k_->matmul_packed[int(t)] != nullptr || k_->matmul_xbf16_packed[int(t)] != nullptr);
  }
  // Bytes the packed f32 path keeps in each thread (its weight panels: kernels.h,
  // kF32PanelBlockBytes) once it has multiplied weights with rows of up to K values; 0 with
  // kernels that have no such path. The memory planner counts it.
  int64_t f32_pack_thread_bytes(int64_t K) const {
    return packs_dtype(DType::f32) ? kF32PanelBlockBytes + 32 * K * 4 : 0;
  }

 private:
  // Checks W's dtype, quantizes x if W is block-quantized, and returns the function that
  // computes output rows [n0, n1) (n0 a multiple of kQRows).
  std::function<void(int64_t, int64_t)> prepare_matmul(const float* x, int64_t T, const TensorView& W, float* y,
                                                       int64_t ldy);

  // The first T / kF32Group token groups of x (T rows of K 32-bit words: floats, or bf16 pairs)
  // packed by pack_f32 into act_f32_, across the pool; returns act_f32_'s data.
  const float* pack_token_groups(const float* x, int64_t T, int64_t K);

  // Whether a matmul of T tokens with these weights takes a packed path (pack_f32 and
  // matmul_packed or matmul_xbf16_packed: the same bits as matmul[dtype] or matmul_xbf16[dtype],
  // faster from three token groups on).
  bool packs(const TensorView& W, int64_t T) const;

  // Row chunk size multiple for splitting a matmul of T tokens with these weights across threads.
  int64_t row_align(const TensorView& W, int64_t T) const;
  // How many chunks per thread a matmul over T tokens is split into, and how they are sized.
  static int chunks_per_thread(int64_t T);
  static ThreadPool::Schedule schedule(int64_t T);

  Backend(std::string name, const KernelTable* k, int threads)
      : name_(std::move(name)), k_(k), pool_(threads), exact_(true) {}
  std::string name_;
  const KernelTable* k_;
  ThreadPool pool_;
  // Quantized activations for block-quantized matmuls: [T][Kp] integers, [T][Kp/32]
  // scales and integer sums; grown on demand, reused across calls.
  std::vector<int8_t> act_q_;
  std::vector<float> act_d_;
  std::vector<int32_t> act_s_;
  bool exact_;
  std::vector<uint16_t> act_bf16_;  // [T][K] activations rounded to bf16 (matmul_xbf16)
  std::vector<float> act_f32_;  // activations packed by pack_f32 (matmul_packed)
};

}  // namespace oelm
