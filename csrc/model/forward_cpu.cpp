// The CPU executor (executor.h): the OpenELM forward pass over a batched step, on the kernels
// and threads of a Backend, with the paged KV cache in host memory (shared OPENELM.md §3):
//   x = E[ids]; per layer: x += Attn(RMSNorm(x)); x += FFN(RMSNorm(x));
//   logits = RMSNorm(x) @ E^T (tied head), for the requested rows only.
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>

#include "common/error.h"
#include "common/half.h"
#include "model/executor.h"
#include "model/streaming.h"

namespace oelm {

namespace {

constexpr int64_t kAttnTokens = 16;  // tokens per attention work item during prefill

// Anonymous memory mapped without reserving swap: pages are committed when first written, so
// a large KV budget costs only what the sequences actually fill.
class HostBuffer {
 public:
  explicit HostBuffer(size_t bytes) : bytes_(std::max<size_t>(bytes, 1)) {
    void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    p_ = static_cast<uint8_t*>(p);
  }
  ~HostBuffer() { munmap(p_, bytes_); }
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  uint8_t* data() const { return p_; }

 private:
  size_t bytes_;
  uint8_t* p_ = nullptr;
};

class CpuExecutor final : public Executor {
 public:
  CpuExecutor(std::shared_ptr<const Model> model, std::shared_ptr<Backend> backend, const KvGeometry& kv,
              int64_t max_context, int64_t max_step_tokens, std::shared_ptr<WeightStreamer> stream);

  const char* name() const override { return "cpu"; }
  void forward(const Step& step, float* logits, const InterruptFn& interrupt) override;
  void copy_block(int32_t src, int32_t dst, int64_t rows) override;
  int64_t max_step_tokens() const override { return max_tokens_; }
  int64_t max_context() const override { return max_ctx_; }
  const KvGeometry& kv_geometry() const override { return geo_; }
  void set_ffn_probe(FfnProbe* probe) override;

 private:
  void record_ffn(size_t li, int64_t T, int64_t F);
  // Layer li's keys (or values) of block id, kv head h: block_size x hd elements.
  uint8_t* kv_at(size_t li, bool value, int64_t id, int64_t h) const {
    const Layer& L = layers_[li];
    return (value ? L.v : L.k)->data() + size_t(((id * L.n_head_kv + h) * geo_.block_size) * hd_ * elem_);
  }
  void store_kv(size_t li, const StepSeq& s, int64_t pos, const float* k, const float* v);

  struct Layer {
    int64_t n_head_kv;
    // [n_blocks][n_head_kv][block_size x hd]: values [block_size][hd]; keys in groups of 16
    // positions, each [hd][16] (kernels.h, KvView)
    std::unique_ptr<HostBuffer> k, v;
  };
  std::shared_ptr<const Model> model_;
  std::shared_ptr<Backend> backend_;
  std::shared_ptr<WeightStreamer> stream_;  // FFN matrices read per step (memory budget); null: all resident
  KvGeometry geo_;
  int64_t max_ctx_, max_tokens_, hd_;
  size_t elem_;  // bytes per KV element
  std::vector<Layer> layers_;
  std::vector<float> rope_cos_, rope_sin_;  // [max_ctx][head_dim/2]
  // Scratch for a step of up to max_tokens_ rows.
  std::vector<float> x_, h_, qkv_, attn_, ffn_, act_, tmp_;
  std::vector<float> part_;  // flash layout: one bundle's share of the FFN output [T, D]
  FfnProbe* probe_ = nullptr;
  std::vector<int64_t> pos_;  // position of each row
  std::vector<int32_t> seq_of_;  // step sequence index of each row
  struct AttnItem {
    int32_t seq;
    int32_t t0, nt;  // rows [row0 + t0, row0 + t0 + nt) of that sequence
  };
  std::vector<AttnItem> items_;
};

CpuExecutor::CpuExecutor(std::shared_ptr<const Model> model, std::shared_ptr<Backend> backend, const KvGeometry& kv,
                         int64_t max_context, int64_t max_step_tokens, std::shared_ptr<WeightStreamer> stream)
    : model_(std::move(model)), backend_(std::move(backend)), stream_(std::move(stream)), geo_(kv), max_ctx_(max_context),
      max_tokens_(max_step_tokens) {
  const ModelConfig& c = model_->config();
  check_executor_limits(kv, max_context, max_step_tokens);
  std::vector<DType> dtypes = {c.weights_dtype, c.embedding_dtype};
  for (const auto& kv_dt : c.tensor_dtypes) dtypes.push_back(kv_dt.second);
  for (DType t : dtypes)
    if (!backend_->supports(t))
      throw InvalidArgument(std::string("backend '") + backend_->name() + "' has no kernels for " + dtype_name(t) +
                            " weights; use another backend or re-export with another --dtype");
  hd_ = c.head_dim;
  elem_ = kv.type == KvType::f16 ? 2 : 4;
  try {
    for (int64_t i = 0; i < c.n_layer; ++i) {
      Layer L;
      L.n_head_kv = c.n_head_kv[size_t(i)];
      const size_t bytes = size_t(kv.n_blocks) * size_t(L.n_head_kv * kv.block_size * hd_) * elem_;
      L.k = std::make_unique<HostBuffer>(bytes);
      L.v = std::make_unique<HostBuffer>(bytes);
      layers_.push_back(std::move(L));
    }
  } catch (const std::bad_alloc&) {
    throw InvalidArgument("cannot map " + std::to_string(kv_block_bytes(c, kv.block_size, kv.type) * kv.n_blocks) +
                          " bytes for the KV cache; use a smaller kv_budget");
  }
  rope_tables(c, max_ctx_, &rope_cos_, &rope_sin_);
  const int64_t T = max_tokens_;
  x_.resize(size_t(T * c.d_model));
  h_.resize(size_t(T * c.d_model));
  tmp_.resize(size_t(T * c.d_model));
  qkv_.resize(size_t(T * model_->max_qkv_dim()));
  attn_.resize(size_t(T * model_->max_q_dim()));
  ffn_.resize(size_t(T * 2 * model_->max_ffn_dim()));
  act_.resize(size_t(T * model_->max_ffn_dim()));
  if (model_->flash()) part_.resize(size_t(T * c.d_model));
  pos_.resize(size_t(T));
  seq_of_.resize(size_t(T));
}

void CpuExecutor::set_ffn_probe(FfnProbe* probe) {
  if (probe && model_->flash())
    throw InvalidArgument("FFN activations are recorded on a file in the ordinary layout, not a flash-layout one");
  if (probe) {
    const ModelConfig& c = model_->config();
    probe->active.assign(size_t(c.n_layer), {});
    probe->magnitude.assign(size_t(c.n_layer), {});
    for (int64_t i = 0; i < c.n_layer; ++i) {
      probe->active[size_t(i)].assign(size_t(c.ffn_dim[size_t(i)]), 0.0);
      probe->magnitude[size_t(i)].assign(size_t(c.ffn_dim[size_t(i)]), 0.0);
    }
    probe->tokens = 0;
  }
  probe_ = probe;
}

void CpuExecutor::record_ffn(size_t li, int64_t T, int64_t F) {
  double* active = probe_->active[li].data();
  double* mag = probe_->magnitude[li].data();
  for (int64_t t = 0; t < T; ++t) {
    const float* a = act_.data() + t * F;
    double mean = 0;
    for (int64_t j = 0; j < F; ++j) mean += std::fabs(a[j]);
    mean /= double(F);
    for (int64_t j = 0; j < F; ++j) {
      const double v = std::fabs(a[j]);
      mag[j] += v;
      active[j] += v > mean ? 1.0 : 0.0;
    }
  }
  if (li == 0) probe_->tokens += T;
}

void CpuExecutor::copy_block(int32_t src, int32_t dst, int64_t rows) {
  if (rows <= 0) return;
  // Keys sit in groups of 16 positions (kernels.h, KvView): copy whole groups, for values too.
  const int64_t n = std::min(geo_.block_size, (rows + kKvAlign - 1) / kKvAlign * kKvAlign);
  const size_t bytes = size_t(n * hd_) * elem_;
  for (size_t li = 0; li < layers_.size(); ++li)
    for (int64_t h = 0; h < layers_[li].n_head_kv; ++h)
      for (bool value : {false, true}) std::memcpy(kv_at(li, value, dst, h), kv_at(li, value, src, h), bytes);
}

void CpuExecutor::store_kv(size_t li, const StepSeq& s, int64_t pos, const float* k, const float* v) {
  // Values row-major; keys dimension-major within their group of 16 positions (kernels.h).
  const int64_t id = s.blocks[pos / geo_.block_size], row = pos % geo_.block_size;
  const size_t voff = size_t(row * hd_), koff = size_t((row / kKvAlign) * kKvAlign * hd_ + row % kKvAlign);
  for (int64_t h = 0; h < layers_[li].n_head_kv; ++h) {
    const float* kh = k + h * hd_;
    const float* vh = v + h * hd_;
    if (geo_.type == KvType::f32) {
      float* kd = reinterpret_cast<float*>(kv_at(li, false, id, h)) + koff;
      std::memcpy(reinterpret_cast<float*>(kv_at(li, true, id, h)) + voff, vh, size_t(hd_) * sizeof(float));
      for (int64_t d = 0; d < hd_; ++d) kd[d * kKvAlign] = kh[d];
    } else {
      uint16_t* kd = reinterpret_cast<uint16_t*>(kv_at(li, false, id, h)) + koff;
      uint16_t* vd = reinterpret_cast<uint16_t*>(kv_at(li, true, id, h)) + voff;
      for (int64_t d = 0; d < hd_; ++d) {
        kd[d * kKvAlign] = f32_to_f16(kh[d]);
        vd[d] = f32_to_f16(vh[d]);
      }
    }
  }
}

void CpuExecutor::forward(const Step& st, float* logits, const InterruptFn& interrupt) {
  const ModelConfig& c = model_->config();
  const KernelTable& K = backend_->kernels();
  ThreadPool& pool = backend_->pool();
  const int64_t T = st.n_tokens, D = c.d_model, hd = hd_, half = hd / 2;
  const float eps = c.norm_eps, scale = 1.0f / std::sqrt(float(hd));
  if (T < 1 || T > max_tokens_)
    throw InvalidArgument("a step has " + std::to_string(T) + " tokens; it must have 1 to " +
                          std::to_string(max_tokens_));
  float *x = x_.data(), *h = h_.data(), *tmp = tmp_.data();
  if (stream_) stream_->begin_step();

  // Each row's sequence and position; attention work items: (sequence, block of up to
  // kAttnTokens of its rows), each later split over the layer's kv heads.
  items_.clear();
  for (int64_t si = 0; si < st.n_seqs; ++si) {
    const StepSeq& s = st.seqs[si];
    if (s.n_past + s.n_new > max_ctx_)
      throw InvalidArgument("a sequence would hold " + std::to_string(s.n_past + s.n_new) +
                            " positions, more than max_context " + std::to_string(max_ctx_));
    for (int64_t i = 0; i < s.n_new; ++i) {
      pos_[size_t(s.row0 + i)] = s.n_past + i;
      seq_of_[size_t(s.row0 + i)] = int32_t(si);
    }
    for (int64_t t0 = 0; t0 < s.n_new; t0 += kAttnTokens)
      items_.push_back({int32_t(si), int32_t(t0), int32_t(std::min(kAttnTokens, s.n_new - t0))});
  }
  // Costliest first (rows x keys they see), so that the last items the threads claim are
  // short ones and neither waits long for the other at the end of the layer's attention.
  auto cost = [&](const AttnItem& a) { return int64_t(a.nt) * (st.seqs[a.seq].n_past + a.t0 + a.nt); };
  std::stable_sort(items_.begin(), items_.end(),
                   [&](const AttnItem& a, const AttnItem& b) { return cost(a) > cost(b); });

  // x[T, D] = E[ids]
  const TensorView& E = model_->token_embd();
  for (int64_t t = 0; t < T; ++t) K.row_to_f32[int(E.dtype)](E.data, E.rows(), D, st.tokens[t], x + t * D);

  // Small element-wise stages run serially for one token and split over tokens otherwise.
  auto over_tokens = [&](const std::function<void(int64_t)>& fn) {
    if (T == 1) fn(0);
    else pool.parallel_for(T, [&](int64_t b, int64_t e) { for (int64_t t = b; t < e; ++t) fn(t); });
  };

  for (size_t li = 0; li < model_->layers().size(); ++li) {
    if (interrupt && interrupt()) throw Interrupted();
    const LayerWeights& L = model_->layers()[li];
    const int64_t nq = L.n_head_q, nkv = L.n_head_kv;
    const int64_t nqkv = (nq + 2 * nkv) * hd, group = nq / nkv;

    // --- attention ---
    over_tokens([&](int64_t t) { K.rmsnorm(x + t * D, L.attn_norm, D, eps, h + t * D); });
    backend_->matmul(h, T, *L.attn_qkv, qkv_.data(), nqkv);  // [T, (nq + 2 nkv) hd]
    over_tokens([&](int64_t t) {
      float* q = qkv_.data() + t * nqkv;  // heads: nq queries, then nkv keys, then nkv values
      float* k = q + nq * hd;
      const float* v = k + nkv * hd;
      if (L.q_norm) {  // models with normalize_qk_projections
        for (int64_t i = 0; i < nq; ++i) K.rmsnorm(q + i * hd, L.q_norm, hd, eps, q + i * hd);
        for (int64_t i = 0; i < nkv; ++i) K.rmsnorm(k + i * hd, L.k_norm, hd, eps, k + i * hd);
      }
      const int64_t pos = pos_[size_t(t)];
      const float* cs = rope_cos_.data() + pos * half;
      const float* sn = rope_sin_.data() + pos * half;
      K.rope(q, nq, hd, cs, sn);
      K.rope(k, nkv, hd, cs, sn);
      store_kv(li, st.seqs[seq_of_[size_t(t)]], pos, k, v);
    });
    // Flash attention per (sequence, kv head, block of its rows), covering the `group` query
    // heads that read that kv head, so each key/value is loaded once per tile. Every sequence
    // reads only its own blocks; items are claimed one at a time (their costs differ).
    const int64_t n_items = int64_t(items_.size()) * nkv;
    const int64_t per_thread = (n_items + pool.size() - 1) / pool.size();
    pool.parallel_for(n_items, [&](int64_t b, int64_t e) {
      for (int64_t it = b; it < e; ++it) {
        const AttnItem& a = items_[size_t(it / nkv)];
        const int64_t kvh = it % nkv;
        const StepSeq& s = st.seqs[a.seq];
        const int64_t r0 = s.row0 + a.t0;
        KvView kv;
        kv.k = kv_at(li, false, 0, kvh);
        kv.v = kv_at(li, true, 0, kvh);
        kv.table = s.blocks;
        kv.stride = nkv * geo_.block_size * hd;
        kv.block = geo_.block_size;
        kv.type = geo_.type;
        K.attention_tile(qkv_.data() + r0 * nqkv + kvh * group * hd, nqkv, a.nt, group, s.n_past + a.t0, kv, hd,
                         scale, attn_.data() + r0 * nq * hd + kvh * group * hd, nq * hd);
      }
    }, 1, int(std::max<int64_t>(1, std::min<int64_t>(per_thread, 1 << 20))));
    // x += attn @ W_o^T: each thread adds the output columns it has just computed.
    const std::function<void(int64_t, int64_t)> add_to_x = [&](int64_t n0, int64_t n1) {
      for (int64_t t = 0; t < T; ++t)
        for (int64_t i = t * D + n0; i < t * D + n1; ++i) x[i] += tmp[i];
    };
    backend_->matmul(attn_.data(), T, *L.attn_out, tmp, D, add_to_x);  // [T, D]

    // --- feed-forward (SwiGLU) ---
    // Under a memory budget the matrices may be a streamed copy (same bytes, same kernels).
    const WeightStreamer::Ffn ffn =
        stream_ ? stream_->acquire(li)
                : WeightStreamer::Ffn{L.gate_up, L.down, L.bundles.empty() ? nullptr : L.bundles.data()};
    over_tokens([&](int64_t t) { K.rmsnorm(x + t * D, L.ffn_norm, D, eps, h + t * D); });
    if (!ffn.bundles) {
      backend_->matmul_swiglu(h, T, *ffn.gate_up, ffn_.data(), act_.data());  // [T, 2F] -> [T, F]
      if (probe_) record_ffn(li, T, L.ffn_dim);
      backend_->matmul(act_.data(), T, *ffn.down, tmp, D, add_to_x);  // x += act @ W_down^T
    } else {
      // Flash layout: bundle by bundle in stored order, their shares of the output summed in
      // that order; resident and streamed bundles are the same bytes, so the arithmetic is
      // the same whatever the memory budget.
      for (size_t b = 0; b < L.bundles.size(); ++b) {
        const LayerWeights::Bundle& B = ffn.bundles[b];
        backend_->matmul_swiglu(h, T, B.gate_up, ffn_.data(), act_.data());  // [T, 2n] -> [T, n]
        backend_->matmul(act_.data(), T, B.down, b ? part_.data() : tmp, D);  // [T, D]
        if (b)
          for (int64_t i = 0; i < T * D; ++i) tmp[i] += part_[size_t(i)];
      }
      for (int64_t i = 0; i < T * D; ++i) x[i] += tmp[i];
    }
    if (stream_) stream_->release(li);
  }

  const int64_t rows = st.n_logit_rows;
  if (rows == 0) return;  // a prefill chunk whose logits nobody asked for
  if (interrupt && interrupt()) throw Interrupted();
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t t = st.logit_rows[i];
    if (t < 0 || t >= T) throw InvalidArgument("logit row " + std::to_string(t) + " is outside the step");
    K.rmsnorm(x + t * D, model_->output_norm(), D, eps, h + i * D);
  }
  backend_->matmul(h, rows, model_->lm_head(), logits, c.vocab_size);  // [rows, V]
}

}  // namespace

void check_executor_limits(const KvGeometry& kv, int64_t max_context, int64_t max_step_tokens) {
  if (max_context < 1 || max_context > (int64_t(1) << 20))
    throw InvalidArgument("max_context must be in [1, 1048576], got " + std::to_string(max_context));
  if (max_step_tokens < 1 || max_step_tokens > 65536)
    throw InvalidArgument("max_step_tokens must be in [1, 65536], got " + std::to_string(max_step_tokens));
  if (kv.block_size < kKvAlign || kv.block_size % kKvAlign || kv.n_blocks < 1)
    throw InvalidArgument("KV geometry: block size must be a positive multiple of " + std::to_string(kKvAlign) +
                          " and there must be at least one block");
}

void rope_tables(const ModelConfig& c, int64_t max_context, std::vector<float>* cos, std::vector<float>* sin) {
  // As HF computes them (float32): inv_freq_j = 1 / theta^(2j/hd), angle = float(p) *
  // inv_freq_j, then cos/sin of that float32 angle.
  const int64_t hd = c.head_dim, half = hd / 2;
  cos->assign(size_t(max_context * half), 0.0f);
  sin->assign(size_t(max_context * half), 0.0f);
  for (int64_t j = 0; j < half; ++j) {
    const float inv_freq = float(1.0 / std::pow(double(c.rope_theta), double(2 * j) / double(hd)));
    for (int64_t p = 0; p < max_context; ++p) {
      const float angle = float(p) * inv_freq;
      (*cos)[size_t(p * half + j)] = float(std::cos(double(angle)));
      (*sin)[size_t(p * half + j)] = float(std::sin(double(angle)));
    }
  }
}

int64_t kv_block_bytes(const ModelConfig& c, int64_t block_size, KvType type) {
  int64_t heads = 0;
  for (int64_t n : c.n_head_kv) heads += n;
  return 2 * heads * block_size * c.head_dim * (type == KvType::f16 ? 2 : 4);
}

int64_t cpu_scratch_bytes(const Model& m, int64_t max_context, int64_t max_step_tokens) {
  // What the constructor allocates (x, h, tmp, qkv, attn, ffn, act; RoPE tables) and what the
  // backend's matmuls add (activations quantized to int8, rounded to bf16 or packed for f32
  // weights), in bytes.
  const ModelConfig& c = m.config();
  const int64_t T = max_step_tokens, K = std::max({c.d_model, m.max_q_dim(), m.max_ffn_dim()});
  const int64_t floats = T * (3 * c.d_model + m.max_qkv_dim() + m.max_q_dim() + 3 * m.max_ffn_dim()) +
                         max_context * c.head_dim;
  const int64_t quantized = T * (K + 32) + 2 * T * (K / 32 + 1) * 4 + T * K * 2 + T * K * 4;
  const int64_t flash = m.flash() ? T * c.d_model : 0;  // part_
  return (floats + flash) * 4 + quantized;
}

std::unique_ptr<Executor> make_cpu_executor(std::shared_ptr<const Model> model, std::shared_ptr<Backend> backend,
                                            const KvGeometry& kv, int64_t max_context, int64_t max_step_tokens,
                                            std::shared_ptr<WeightStreamer> stream) {
  return std::make_unique<CpuExecutor>(std::move(model), std::move(backend), kv, max_context, max_step_tokens,
                                       std::move(stream));
}

}  // namespace oelm
