// The OpenELM model: its configuration (per-layer head counts and FFN widths, read
// from the file, never re-derived) and its weights as views into the mapped file. The
// forward pass is a backend's Executor (executor.h); sequences and KV live in engine/.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "format/oelm_file.h"
#include "model/flash_layout.h"
#include "model/backend.h"
#include "tokenizer/tokenizer.h"

namespace oelm {

struct ModelConfig {
  int64_t n_layer = 0, d_model = 0, head_dim = 0, vocab_size = 0;
  std::vector<int64_t> n_head_q, n_head_kv, ffn_dim;  // one entry per layer
  float rope_theta = 10000.0f;
  float norm_eps = 1e-6f;
  int64_t max_context = 0;  // training context of the checkpoint
  int32_t bos_token_id = 1, eos_token_id = 2;
  bool tied_embeddings = true;
  bool qk_norm = true;  // per-head RMSNorm on q and k (OpenELM's normalize_qk_projections)
  DType weights_dtype = DType::f32;    // every matrix but the vocabulary ones
  DType embedding_dtype = DType::f32;  // token_embd and (untied) output; = weights_dtype if unset
  // Per-matrix exceptions to weights_dtype (metadata "tensor_dtypes", FORMAT.md): name -> dtype.
  std::map<std::string, DType> tensor_dtypes;
};

struct LayerWeights {
  int64_t n_head_q, n_head_kv, ffn_dim;
  const float* attn_norm;      // [D]
  const TensorView* attn_qkv;  // [(nq + 2 nkv) hd, D]
  const float* q_norm;         // [hd]; nullptr when the model has no q/k norm (qk_norm false)
  const float* k_norm;         // [hd]; nullptr likewise
  const TensorView* attn_out;  // [D, nq hd]
  const float* ffn_norm;       // [D]
  const TensorView* gate_up = nullptr;  // [2F, D]; nullptr in a flash-layout file
  const TensorView* down = nullptr;     // [D, F]; nullptr in a flash-layout file
  // Flash layout (flash_layout.h): the FFN as bundles of neurons, hottest first, each its own
  // [2n, D] gate_up and [D, n] down matrix (views into blk.{i}.ffn_bundles); empty otherwise.
  struct Bundle {
    TensorView gate_up, down;
    uint64_t offset = 0, bytes = 0;  // the bundle's bytes in the file
  };
  std::vector<Bundle> bundles;
  const TensorView* bundles_tensor = nullptr;
  // The FFN's bytes in the file: the two matrices, or the bundles tensor.
  uint64_t ffn_bytes() const { return bundles_tensor ? bundles_tensor->size : gate_up->size + down->size; }
};

class Model {
 public:
  // Maps and validates the file, the tokenizer's vocabulary included; throws
  // FileNotFound / FormatError.
  static std::shared_ptr<Model> load(const std::string& path, bool verify);

  const ModelConfig& config() const { return cfg_; }
  const OelmFile& file() const { return *file_; }
  const std::vector<LayerWeights>& layers() const { return layers_; }
  const TensorView& token_embd() const { return *tok_embd_; }
  const TensorView& lm_head() const { return *lm_head_; }
  const float* output_norm() const { return output_norm_; }
  // A file may hold no tokenizer (token ids only, FORMAT.md); then tokenizer() and
  // tokenizer_blob() throw InvalidArgument saying so, and tokenizer_type() is "".
  bool has_tokenizer() const { return tok_ != nullptr; }
  std::string_view tokenizer_blob() const;  // the stored SentencePiece model, byte for byte
  const Tokenizer& tokenizer() const;
  const std::string& tokenizer_type() const { return tokenizer_type_; }

  int64_t max_qkv_dim() const { return max_qkv_; }
  int64_t max_q_dim() const { return max_q_; }
  int64_t max_ffn_dim() const { return max_ffn_; }
  // The flash layout of the FFN weights, or nullptr for a file in the ordinary layout.
  const FlashLayout* flash() const { return flash_ ? &*flash_ : nullptr; }
  // Heap bytes Model::load allocated and kept (parsed metadata, tokenizer, tables), measured
  // with the allocator's statistics where it has them (glibc), else 0: the memory planner
  // counts them (streaming.h).
  uint64_t load_heap_bytes() const { return load_heap_; }

 private:
  Model() = default;
  static std::shared_ptr<Model> load_file(const std::string& path, bool verify);
  void bind_weights();

  std::unique_ptr<OelmFile> file_;
  ModelConfig cfg_;
  std::vector<LayerWeights> layers_;
  const TensorView* tok_embd_ = nullptr;
  const TensorView* lm_head_ = nullptr;
  const TensorView* tokenizer_ = nullptr;
  std::unique_ptr<Tokenizer> tok_;
  const float* output_norm_ = nullptr;
  std::string tokenizer_type_;
  int64_t max_qkv_ = 0, max_q_ = 0, max_ffn_ = 0;
  std::optional<FlashLayout> flash_;
  uint64_t load_heap_ = 0;
};

// Called between layers; returning true aborts the evaluation with oelm::Interrupted.
using InterruptFn = std::function<bool()>;

}  // namespace oelm
