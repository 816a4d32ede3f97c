// The CUDA executor (executor.h, model/cuda.h): the same forward pass as forward_cpu.cpp, on
// device 0, one stream. Weights are copied to the device once, as the file stores them; the KV
// blocks and every activation live in device memory. Per step one host-to-device copy brings
// the token ids, positions and block tables (from pinned memory), and one device-to-host copy
// per chunk of rows takes the requested logits back; the step ends with a stream
// synchronisation, whose status is checked, so a kernel's fault surfaces in the step that
// caused it.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <unordered_map>
#include <vector>

#include "common/error.h"
#include "cuda/cuda_kernels.h"
#include "model/cuda.h"

namespace oelm {

[[noreturn]] void throw_cuda_error(cudaError_t e, const char* call, const char* file, int line) {
  throw CudaError(std::string("CUDA error in ") + call + " (" + file + ":" + std::to_string(line) +
                  "): " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

namespace cuda {
bool kernels_loadable(std::string* why);  // cuda_kernels.cu
}

bool cuda_compiled() { return true; }

bool cuda_available(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    (void)cudaGetLastError();  // clear it: not an error of a later call
    if (why)
      *why = std::string("no usable CUDA device (") +
             (e != cudaSuccess ? std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e) : "no devices") +
             "); use backend 'cpu'";
    return false;
  }
  return cuda::kernels_loadable(why);
}

std::string cuda_device_description() {
  if (!cuda_available()) return "";
  cudaDeviceProp p;
  if (cudaGetDeviceProperties(&p, 0) != cudaSuccess) return "";
  char buf[320];
  std::snprintf(buf, sizeof buf, "%s (sm_%d%d, %.1f GiB)", p.name, p.major, p.minor,
                double(p.totalGlobalMem) / double(int64_t(1) << 30));
  return buf;
}

int64_t cuda_free_memory() {
  if (!cuda_available()) return 0;
  size_t free_b = 0, total = 0;
  OELM_CUDA_CHECK(cudaMemGetInfo(&free_b, &total));
  return int64_t(free_b);
}

namespace {

// Device memory, freed with the object.
class DevBuf {
 public:
  DevBuf() = default;
  explicit DevBuf(size_t bytes) : bytes_(std::max<size_t>(bytes, 1)) {
    const cudaError_t e = cudaMalloc(&p_, bytes_);
    if (e == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();
      throw InvalidArgument("cannot allocate " + std::to_string(bytes_) +
                            " bytes of GPU memory (cudaMalloc: out of memory); use a smaller kv_budget, "
                            "max_context or max_batch, or a smaller model");
    }
    OELM_CUDA_CHECK(e);
  }
  ~DevBuf() {
    if (p_) (void)cudaFree(p_);  // nothing to do about a failure here
  }
  DevBuf(DevBuf&& o) noexcept : p_(o.p_), bytes_(o.bytes_) { o.p_ = nullptr; }
  DevBuf& operator=(DevBuf&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  template <typename T = uint8_t>
  T* get() const { return static_cast<T*>(p_); }
  size_t bytes() const { return p_ ? bytes_ : 0; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

// Page-locked host memory (the step's metadata: an asynchronous copy needs it).
class PinnedBuf {
 public:
  PinnedBuf() = default;
  explicit PinnedBuf(size_t bytes) { OELM_CUDA_CHECK(cudaMallocHost(&p_, std::max<size_t>(bytes, 1))); }
  ~PinnedBuf() {
    if (p_) (void)cudaFreeHost(p_);
  }
  PinnedBuf(PinnedBuf&& o) noexcept : p_(o.p_) { o.p_ = nullptr; }
  PinnedBuf& operator=(PinnedBuf&& o) noexcept {
    std::swap(p_, o.p_);
    return *this;
  }
  PinnedBuf(const PinnedBuf&) = delete;
  PinnedBuf& operator=(const PinnedBuf&) = delete;
  int32_t* get() const { return static_cast<int32_t*>(p_); }

 private:
  void* p_ = nullptr;
};

constexpr int64_t kLogitChunk = 256;  // logit rows per pass (the device logits buffer's rows)

class CudaExecutor final : public Executor {
 public:
  CudaExecutor(std::shared_ptr<const Model> model, std::shared_ptr<Backend> backend, const KvGeometry& kv,
               int64_t max_context, int64_t max_step_tokens);
  ~CudaExecutor() override {
    if (stream_) {
      (void)cudaStreamSynchronize(stream_);
      (void)cudaStreamDestroy(stream_);
    }
  }

  const char* name() const override { return "cuda"; }
  void forward(const Step& step, float* logits, const InterruptFn& interrupt) override;
  void copy_block(int32_t src, int32_t dst, int64_t rows) override;
  int64_t max_step_tokens() const override { return max_tokens_; }
  int64_t max_context() const override { return max_ctx_; }
  const KvGeometry& kv_geometry() const override { return geo_; }

 private:
  struct Layer {
    int64_t nq, nkv, F;
    const float *attn_norm, *q_norm, *k_norm, *ffn_norm;
    const void *qkv, *out, *gate_up, *down;
    DevBuf k, v;  // [n_blocks][nkv][block_size][hd] each (cuda_kernels.h, DevKv)
  };
  cuda::DevKv kv_of(const Layer& L) const { return {L.k.get(), L.v.get(), L.nkv, geo_.block_size, geo_.type}; }
  void sync() { OELM_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

  std::shared_ptr<const Model> model_;
  std::shared_ptr<Backend> backend_;  // host threads for the runtime; not used here
  KvGeometry geo_;
  int64_t max_ctx_, max_tokens_, hd_;
  size_t elem_;
  cudaStream_t stream_ = nullptr;
  DevBuf weights_;
  std::vector<Layer> layers_;
  const void* embd_ = nullptr;
  const void* lm_head_ = nullptr;
  const float* out_norm_ = nullptr;
  DevBuf rope_cos_, rope_sin_;
  DevBuf x_, h_, qkv_, attn_, gu_, act_, logits_, scratch_;
  // The step's int32 metadata: tokens, positions, KV slots, table offsets [T each], logit rows,
  // block tables; host (pinned) and device copies, grown on demand.
  PinnedBuf meta_host_;
  DevBuf meta_dev_;
  int64_t meta_cap_ = 0;  // int32 elements
};

CudaExecutor::CudaExecutor(std::shared_ptr<const Model> model, std::shared_ptr<Backend> backend, const KvGeometry& kv,
                           int64_t max_context, int64_t max_step_tokens)
    : model_(std::move(model)), backend_(std::move(backend)), geo_(kv), max_ctx_(max_context),
      max_tokens_(max_step_tokens) {
  const ModelConfig& c = model_->config();
  check_executor_limits(kv, max_context, max_step_tokens);
  if (model_->flash())
    throw InvalidArgument("this file is in the flash layout (openelm-rt-export --flash-layout), which runs on the cpu "
                          "backend only; re-export it without --flash-layout for the cuda backend");
  std::string why;
  if (!cuda_available(&why)) throw InvalidArgument(why);
  if (!c.tensor_dtypes.empty())
    throw InvalidArgument("this file gives some matrices their own dtype (tensor_dtypes), which the CUDA backend "
                          "does not run; re-export it with one --dtype for the cuda backend");
  for (DType t : {c.weights_dtype, c.embedding_dtype})
    if (t != DType::f32 && t != DType::f16 && t != DType::bf16 && t != DType::q8 && t != DType::q4)
      throw InvalidArgument(std::string("the CUDA backend has no kernels for ") + dtype_name(t) + " weights");
  hd_ = c.head_dim;
  elem_ = kv.type == KvType::f16 ? 2 : 4;
  OELM_CUDA_CHECK(cudaSetDevice(0));
  OELM_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));

  // Weights: every tensor but the tokenizer and flash permutations, in one allocation (each 256-byte aligned), copied
  // as stored.
  std::vector<const TensorView*> tensors;
  for (const TensorView& t : model_->file().tensors())
    if (dtype_is_weight(t.dtype)) tensors.push_back(&t);
  std::unordered_map<const void*, uint8_t*> at;  // host data -> device copy
  size_t total = 0;
  for (const TensorView* t : tensors) total += (size_t(t->size) + 255) / 256 * 256;
  weights_ = DevBuf(total);
  size_t off = 0;
  for (const TensorView* t : tensors) {
    uint8_t* d = weights_.get() + off;
    OELM_CUDA_CHECK(cudaMemcpy(d, t->data, size_t(t->size), cudaMemcpyHostToDevice));
    at[t->data] = d;
    off += (size_t(t->size) + 255) / 256 * 256;
  }
  auto dev = [&](const void* host) -> uint8_t* {
    if (!host) return nullptr;
    auto it = at.find(host);
    if (it == at.end()) throw std::logic_error("CudaExecutor: a weight of the model is not a tensor of its file");
    return it->second;
  };
  auto devf = [&](const float* host) { return reinterpret_cast<const float*>(dev(host)); };
  embd_ = dev(model_->token_embd().data);
  lm_head_ = dev(model_->lm_head().data);
  out_norm_ = devf(model_->output_norm());
  for (const LayerWeights& w : model_->layers()) {
    Layer L;
    L.nq = w.n_head_q;
    L.nkv = w.n_head_kv;
    L.F = w.ffn_dim;
    L.attn_norm = devf(w.attn_norm);
    L.q_norm = devf(w.q_norm);
    L.k_norm = devf(w.k_norm);
    L.ffn_norm = devf(w.ffn_norm);
    L.qkv = dev(w.attn_qkv->data);
    L.out = dev(w.attn_out->data);
    L.gate_up = dev(w.gate_up->data);
    L.down = dev(w.down->data);
    const size_t bytes = size_t(kv.n_blocks) * size_t(L.nkv * kv.block_size * hd_) * elem_;
    L.k = DevBuf(bytes);
    L.v = DevBuf(bytes);
    layers_.push_back(std::move(L));
  }

  // The CPU executor's RoPE tables: both backends rotate by the same numbers.
  std::vector<float> cs, sn;
  rope_tables(c, max_ctx_, &cs, &sn);
  rope_cos_ = DevBuf(cs.size() * sizeof(float));
  rope_sin_ = DevBuf(sn.size() * sizeof(float));
  OELM_CUDA_CHECK(cudaMemcpy(rope_cos_.get(), cs.data(), cs.size() * sizeof(float), cudaMemcpyHostToDevice));
  OELM_CUDA_CHECK(cudaMemcpy(rope_sin_.get(), sn.data(), sn.size() * sizeof(float), cudaMemcpyHostToDevice));

  // Activations for a step of up to max_tokens_ rows.
  const int64_t T = max_tokens_, D = c.d_model, F = model_->max_ffn_dim();
  const int64_t rows = std::min(T, kLogitChunk);
  x_ = DevBuf(size_t(T * D) * 4);
  h_ = DevBuf(size_t(T * D) * 4);
  qkv_ = DevBuf(size_t(T * model_->max_qkv_dim()) * 4);
  attn_ = DevBuf(size_t(T * model_->max_q_dim()) * 4);
  gu_ = DevBuf(size_t(T * 2 * F) * 4);
  act_ = DevBuf(size_t(T * F) * 4);
  logits_ = DevBuf(size_t(rows * c.vocab_size) * 4);
  const int64_t scratch = std::max({cuda::matmul_scratch_bytes(c.weights_dtype, T, D),
                                    cuda::matmul_scratch_bytes(c.weights_dtype, T, model_->max_q_dim()),
                                    cuda::matmul_scratch_bytes(c.weights_dtype, T, F),
                                    cuda::matmul_scratch_bytes(c.embedding_dtype, rows, D)});
  scratch_ = DevBuf(size_t(scratch));
  OELM_CUDA_CHECK(cudaDeviceSynchronize());  // every upload done before the first step
}

void CudaExecutor::copy_block(int32_t src, int32_t dst, int64_t rows) {
  if (rows <= 0) return;
  if (src < 0 || src >= geo_.n_blocks || dst < 0 || dst >= geo_.n_blocks)
    throw InvalidArgument("copy_block: block id outside [0, " + std::to_string(geo_.n_blocks) + ")");
  rows = std::min(rows, geo_.block_size);
  // Per layer: nkv heads of rows x hd elements each, heads block_size x hd apart.
  for (const Layer& L : layers_) {
    const size_t pitch = size_t(geo_.block_size * hd_) * elem_, width = size_t(rows * hd_) * elem_;
    const size_t block_bytes = pitch * size_t(L.nkv);
    for (const DevBuf* b : {&L.k, &L.v})
      OELM_CUDA_CHECK(cudaMemcpy2DAsync(b->get() + size_t(dst) * block_bytes, pitch,
                                        b->get() + size_t(src) * block_bytes, pitch, width, size_t(L.nkv),
                                        cudaMemcpyDeviceToDevice, stream_));
  }
}

void CudaExecutor::forward(const Step& st, float* logits, const InterruptFn& interrupt) {
  const ModelConfig& c = model_->config();
  const int64_t T = st.n_tokens, D = c.d_model, hd = hd_, V = c.vocab_size, bs = geo_.block_size;
  const float eps = c.norm_eps, scale = 1.0f / std::sqrt(float(hd));
  if (T < 1 || T > max_tokens_)
    throw InvalidArgument("a step has " + std::to_string(T) + " tokens; it must have 1 to " +
                          std::to_string(max_tokens_));
  // Everything the kernels index with is checked here, on the host: a bad id on the device
  // would be a memory fault, not an error message.
  int64_t n_table = 0;
  for (int64_t si = 0; si < st.n_seqs; ++si) {
    const StepSeq& s = st.seqs[si];
    if (s.n_past < 0 || s.n_new < 0 || s.row0 < 0 || s.row0 + s.n_new > T)
      throw InvalidArgument("step sequence " + std::to_string(si) + " has rows outside the step");
    if (s.n_past + s.n_new > max_ctx_)
      throw InvalidArgument("a sequence would hold " + std::to_string(s.n_past + s.n_new) +
                            " positions, more than max_context " + std::to_string(max_ctx_));
    n_table += (s.n_past + s.n_new + bs - 1) / bs;
  }
  if (n_table > (int64_t(1) << 30))
    throw InvalidArgument("a step's block tables hold more than 2^30 entries; use fewer tokens per step");
  for (int64_t i = 0; i < st.n_logit_rows; ++i)
    if (st.logit_rows[i] < 0 || st.logit_rows[i] >= T)
      throw InvalidArgument("logit row " + std::to_string(st.logit_rows[i]) + " is outside the step");
  for (int64_t t = 0; t < T; ++t)
    if (st.tokens[t] < 0 || st.tokens[t] >= V)
      throw InvalidArgument("token id " + std::to_string(st.tokens[t]) + " is outside the vocabulary [0, " +
                            std::to_string(V) + ")");

  // The metadata, in one pinned buffer: [tokens | pos | slot_block | slot_row | table_off]
  // (T each), logit_rows, tables. The previous step ended with a synchronisation, so the
  // buffer is free to rewrite.
  const int64_t need = 5 * T + st.n_logit_rows + n_table;
  if (need > meta_cap_) {
    const int64_t cap = std::max<int64_t>(need, 2 * meta_cap_);
    meta_host_ = PinnedBuf(size_t(cap) * 4);
    meta_dev_ = DevBuf(size_t(cap) * 4);
    meta_cap_ = cap;
  }
  int32_t* m = meta_host_.get();
  int32_t *tokens = m, *pos = m + T, *slot_block = m + 2 * T, *slot_row = m + 3 * T, *table_off = m + 4 * T;
  int32_t* logit_rows = m + 5 * T;
  int32_t* tables = logit_rows + st.n_logit_rows;
  std::memcpy(tokens, st.tokens, size_t(T) * 4);
  std::fill(pos, pos + T, -1);
  int64_t n_tab = 0;
  for (int64_t si = 0; si < st.n_seqs; ++si) {
    const StepSeq& s = st.seqs[si];
    const int64_t nb = (s.n_past + s.n_new + bs - 1) / bs;
    for (int64_t b = 0; b < nb; ++b) {
      if (s.blocks[b] < 0 || s.blocks[b] >= geo_.n_blocks)
        throw InvalidArgument("KV block id " + std::to_string(s.blocks[b]) + " is outside [0, " +
                              std::to_string(geo_.n_blocks) + ")");
      tables[n_tab + b] = s.blocks[b];
    }
    for (int64_t i = 0; i < s.n_new; ++i) {
      const int64_t t = s.row0 + i, p = s.n_past + i;
      pos[t] = int32_t(p);
      slot_block[t] = s.blocks[p / bs];
      slot_row[t] = int32_t(p % bs);
      table_off[t] = int32_t(n_tab);
    }
    n_tab += nb;
  }
  for (int64_t t = 0; t < T; ++t)
    if (pos[t] < 0) throw InvalidArgument("step row " + std::to_string(t) + " belongs to no sequence");
  std::memcpy(logit_rows, st.logit_rows, size_t(st.n_logit_rows) * 4);
  int32_t* md = meta_dev_.get<int32_t>();
  OELM_CUDA_CHECK(cudaMemcpyAsync(md, m, size_t(need) * 4, cudaMemcpyHostToDevice, stream_));
  const int32_t *d_tokens = md, *d_pos = md + T, *d_slot_block = md + 2 * T, *d_slot_row = md + 3 * T,
                *d_table_off = md + 4 * T, *d_logit_rows = md + 5 * T, *d_tables = d_logit_rows + st.n_logit_rows;

  float *x = x_.get<float>(), *h = h_.get<float>(), *qkv = qkv_.get<float>(), *attn = attn_.get<float>();
  float *gu = gu_.get<float>(), *act = act_.get<float>();
  void* scratch = scratch_.get();
  cudaStream_t s = stream_;
  cuda::embed(embd_, c.embedding_dtype, V, D, d_tokens, T, x, s);
  const DType wd = c.weights_dtype;
  for (const Layer& L : layers_) {
    if (interrupt && interrupt()) {
      sync();  // the queued kernels finish; the buffers are then free for the next step
      throw Interrupted();
    }
    const int64_t nq = L.nq, nkv = L.nkv, nqkv = (nq + 2 * nkv) * hd, F = L.F;
    // --- attention ---
    cuda::rmsnorm_rows(x, D, nullptr, T, L.attn_norm, D, eps, h, D, s);
    cuda::matmul(h, T, D, L.qkv, wd, nqkv, qkv, nqkv, false, scratch, s);
    cuda::qkv_post(qkv, T, nq, nkv, hd, L.q_norm, L.k_norm, eps, rope_cos_.get<float>(), rope_sin_.get<float>(),
                   d_pos, d_slot_block, d_slot_row, kv_of(L), s);
    cuda::attention(qkv, nqkv, T, nq, nkv, hd, scale, d_pos, d_table_off, d_tables, kv_of(L), attn, nq * hd, s);
    cuda::matmul(attn, T, nq * hd, L.out, wd, D, x, D, true, scratch, s);  // x += attn @ W_o^T
    // --- feed-forward (SwiGLU) ---
    cuda::rmsnorm_rows(x, D, nullptr, T, L.ffn_norm, D, eps, h, D, s);
    cuda::matmul(h, T, D, L.gate_up, wd, 2 * F, gu, 2 * F, false, scratch, s);
    cuda::swiglu(gu, T, F, act, s);
    cuda::matmul(act, T, F, L.down, wd, D, x, D, true, scratch, s);  // x += act @ W_down^T
  }
  if (st.n_logit_rows > 0 && interrupt && interrupt()) {
    sync();
    throw Interrupted();
  }
  for (int64_t i0 = 0; i0 < st.n_logit_rows; i0 += kLogitChunk) {
    const int64_t n = std::min(kLogitChunk, st.n_logit_rows - i0);
    cuda::rmsnorm_rows(x, D, d_logit_rows + i0, n, out_norm_, D, eps, h, D, s);
    cuda::matmul(h, n, D, lm_head_, c.embedding_dtype, V, logits_.get<float>(), V, false, scratch, s);
    OELM_CUDA_CHECK(cudaMemcpyAsync(logits + i0 * V, logits_.get(), size_t(n * V) * 4, cudaMemcpyDeviceToHost, s));
  }
  sync();
}

}  // namespace

std::unique_ptr<Executor> make_cuda_executor(std::shared_ptr<const Model> model, std::shared_ptr<Backend> backend,
                                             const KvGeometry& kv, int64_t max_context, int64_t max_step_tokens) {
  return std::make_unique<CudaExecutor>(std::move(model), std::move(backend), kv, max_context, max_step_tokens);
}

}  // namespace oelm
