// Model loading: metadata -> ModelConfig, tensor table -> weight views, each checked by
// name, shape and dtype. The forward pass is in forward_cpu.cpp (executor.h).
#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>

#if __has_include(<malloc.h>)
#include <malloc.h>  // mallinfo2 (glibc)
#endif

#include "common/error.h"

namespace oelm {

namespace {

[[noreturn]] void bad(const OelmFile& f, const std::string& what) {
  throw FormatError(f.path() + ": " + what);
}

int64_t get_int(const OelmFile& f, const json::Value& m, const char* key, int64_t lo, int64_t hi) {
  const json::Value* v = m.find(key);
  if (!v || !v->is_integer())
    bad(f, std::string("model config: \"") + key + "\" is missing or not an integer");
  if (v->as_int() < lo || v->as_int() > hi)
    bad(f, std::string("model config: \"") + key + "\" = " + std::to_string(v->as_int()) +
               " is outside [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return v->as_int();
}

double get_num(const OelmFile& f, const json::Value& m, const char* key) {
  const json::Value* v = m.find(key);
  if (!v || !v->is_number()) bad(f, std::string("model config: \"") + key + "\" is missing or not a number");
  return v->as_double();
}

std::vector<int64_t> get_list(const OelmFile& f, const json::Value& m, const char* key, int64_t n,
                              int64_t lo, int64_t hi) {
  const json::Value* v = m.find(key);
  if (!v || !v->is_array() || int64_t(v->items().size()) != n)
    bad(f, std::string("model config: \"") + key + "\" must be a list of " + std::to_string(n) +
               " integers (one per layer)");
  std::vector<int64_t> out;
  for (size_t i = 0; i < v->items().size(); ++i) {
    const json::Value& e = v->items()[i];
    if (!e.is_integer() || e.as_int() < lo || e.as_int() > hi)
      bad(f, std::string("model config: \"") + key + "\"[" + std::to_string(i) +
                 "] is not an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    out.push_back(e.as_int());
  }
  return out;
}

// A metadata key naming the dtype of weight matrices; `fallback` (if given) when absent.
DType get_weights_dtype(const OelmFile& f, const char* key, const DType* fallback) {
  const json::Value* v = f.metadata().find(key);
  if (!v && fallback) return *fallback;
  if (!v || !v->is_string()) bad(f, std::string("metadata: \"") + key + "\" is missing or not a string");
  DType t;
  if (const std::string hint = legacy_dtype_hint(v->as_string()); !hint.empty())
    bad(f, std::string("metadata: ") + key + ": " + hint);
  if (!dtype_from_name(v->as_string(), &t) || !dtype_is_weight(t))
    bad(f, std::string("metadata: ") + key + " \"" + v->as_string() + "\" is not supported (" + dtype_names(true) +
               "); " + upgrade_advice(f.metadata()));
  return t;
}

}  // namespace

const Tokenizer& Model::tokenizer() const {
  if (!tok_)
    throw InvalidArgument(file_->path() + " has no tokenizer (it was exported with --no-tokenizer): pass token "
                          "ids instead of text, or re-export the model with its tokenizer.model");
  return *tok_;
}

std::string_view Model::tokenizer_blob() const {
  tokenizer();  // throws when there is none
  return std::string_view(reinterpret_cast<const char*>(tokenizer_->data), tokenizer_->size);
}

namespace {

// Bytes in use on the heap (glibc: every arena, and chunks served by mmap); 0 elsewhere.
uint64_t heap_in_use() {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
  const struct mallinfo2 mi = mallinfo2();
  return uint64_t(mi.uordblks) + uint64_t(mi.hblkhd);
#else
  return 0;
#endif
}

}  // namespace

std::shared_ptr<Model> Model::load(const std::string& path, bool verify) {
  const uint64_t heap0 = heap_in_use();
  std::shared_ptr<Model> m = load_file(path, verify);
  const uint64_t heap1 = heap_in_use();
  m->load_heap_ = heap1 > heap0 ? heap1 - heap0 : 0;
  return m;
}

std::shared_ptr<Model> Model::load_file(const std::string& path, bool verify) {
  std::shared_ptr<Model> m(new Model());
  m->file_ = OelmFile::open(path, verify);
  const OelmFile& f = *m->file_;
  const json::Value* mc = f.metadata().find("model");
  if (!mc || !mc->is_object()) bad(f, "metadata has no \"model\" object");
  const json::Value* arch = mc->find("architecture");
  if (!arch || !arch->is_string() || arch->as_string() != "openelm")
    bad(f, "model config: \"architecture\" must be \"openelm\"");

  ModelConfig& c = m->cfg_;
  c.n_layer = get_int(f, *mc, "n_layer", 1, 4096);
  c.d_model = get_int(f, *mc, "d_model", 1, 1 << 17);
  c.head_dim = get_int(f, *mc, "head_dim", 2, 1024);
  if (c.head_dim % 2) bad(f, "model config: head_dim " + std::to_string(c.head_dim) + " must be even for RoPE");
  c.vocab_size = get_int(f, *mc, "vocab_size", 3, 1 << 22);
  c.n_head_q = get_list(f, *mc, "n_head_q", c.n_layer, 1, 4096);
  c.n_head_kv = get_list(f, *mc, "n_head_kv", c.n_layer, 1, 4096);
  c.ffn_dim = get_list(f, *mc, "ffn_dim", c.n_layer, 1, 1 << 20);
  for (int64_t i = 0; i < c.n_layer; ++i)
    if (c.n_head_q[size_t(i)] % c.n_head_kv[size_t(i)] != 0)
      bad(f, "model config: layer " + std::to_string(i) + " has n_head_kv " +
                 std::to_string(c.n_head_kv[size_t(i)]) + " which does not divide n_head_q " +
                 std::to_string(c.n_head_q[size_t(i)]));
  c.rope_theta = float(get_num(f, *mc, "rope_theta"));
  c.norm_eps = float(get_num(f, *mc, "norm_eps"));
  if (!(c.rope_theta > 1.0f) || !std::isfinite(c.rope_theta)) bad(f, "model config: rope_theta must be > 1");
  if (!(c.norm_eps > 0.0f) || c.norm_eps > 1.0f) bad(f, "model config: norm_eps must be in (0, 1]");
  c.max_context = get_int(f, *mc, "max_context", 1, int64_t(1) << 24);
  c.bos_token_id = int32_t(get_int(f, *mc, "bos_token_id", 0, c.vocab_size - 1));
  c.eos_token_id = int32_t(get_int(f, *mc, "eos_token_id", 0, c.vocab_size - 1));
  const json::Value* tied = mc->find("tied_embeddings");
  if (!tied || !tied->is_bool()) bad(f, "model config: \"tied_embeddings\" must be true or false");
  c.tied_embeddings = tied->as_bool();
  // Optional (absent in files written before it existed: they all have q/k norms).
  if (const json::Value* qk = mc->find("qk_norm")) {
    if (!qk->is_bool()) bad(f, "model config: \"qk_norm\" must be true or false");
    c.qk_norm = qk->as_bool();
  }
  c.weights_dtype = get_weights_dtype(f, "weights_dtype", nullptr);
  c.embedding_dtype = get_weights_dtype(f, "embedding_dtype", &c.weights_dtype);
  // Optional: per-matrix dtypes (a reader that predates the key refuses such a file by the first
  // matrix whose dtype differs from weights_dtype).
  if (const json::Value* td = f.metadata().find("tensor_dtypes")) {
    if (!td->is_object()) bad(f, "metadata: \"tensor_dtypes\" must be an object of tensor name -> dtype");
    for (const auto& [name, v] : td->members()) {
      DType t;
      if (!v.is_string() || !dtype_from_name(v.as_string(), &t) || !dtype_is_weight(t))
        bad(f, "metadata: tensor_dtypes: \"" + name + "\" has no supported dtype (" + dtype_names(true) + "); " +
                   upgrade_advice(f.metadata()));
      c.tensor_dtypes[name] = t;
    }
  }

  // "tokenizer": null (or absent) is a file of token ids only.
  const json::Value* tok_meta = f.metadata().find("tokenizer");
  const bool has_tok = tok_meta && !tok_meta->is_null();
  if (has_tok) {
    m->tokenizer_ = &Tokenizer::stored_tensor(f);
    m->tokenizer_type_ = "sentencepiece";  // the only type stored_tensor accepts
  }
  if (const json::Value* fl = f.metadata().find("flash_layout")) {
    if (f.format_version() < 2)
      bad(f, "metadata has \"flash_layout\" but the header says format_version " + std::to_string(f.format_version()) +
                 " (flash-layout files are version 2); the file is damaged, re-export it");
    try {
      m->flash_ = parse_flash_layout(*fl);
    } catch (const FormatError& e) {
      bad(f, e.what());
    }
  }
  m->bind_weights();
  if (!has_tok) return m;
  m->tok_ = Tokenizer::load(f);
  const Tokenizer& tk = *m->tok_;
  if (tk.vocab_size() > c.vocab_size)
    bad(f, "the stored tokenizer has " + std::to_string(tk.vocab_size()) + " pieces but the model only " +
               std::to_string(c.vocab_size) + " embeddings; re-export with the matching tokenizer.model");
  if (tk.bos_id() != c.bos_token_id || tk.eos_id() != c.eos_token_id)
    bad(f, "the stored tokenizer has BOS/EOS ids " + std::to_string(tk.bos_id()) + "/" + std::to_string(tk.eos_id()) +
               " but the model config says " + std::to_string(c.bos_token_id) + "/" + std::to_string(c.eos_token_id) +
               "; re-export with the tokenizer the model was trained with");
  return m;
}

void Model::bind_weights() {
  const OelmFile& f = *file_;
  const ModelConfig& c = cfg_;
  std::set<std::string> expected;
  auto need = [&](const std::string& name, std::vector<int64_t> shape, DType dt) -> const TensorView* {
    expected.insert(name);
    const TensorView* t = f.find(name);
    if (!t) bad(f, "missing tensor '" + name + "'; the file is incomplete, re-export it");
    if (t->shape != shape) {
      auto fmt = [](const std::vector<int64_t>& s) {
        std::string r = "[";
        for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
        return r + "]";
      };
      bad(f, "tensor '" + name + "' has shape " + fmt(t->shape) + ", expected " + fmt(shape) +
                 " from the model config");
    }
    if (t->dtype != dt)
      bad(f, "tensor '" + name + "' has dtype " + dtype_name(t->dtype) + ", expected " + dtype_name(dt));
    return t;
  };
  auto vec = [&](const std::string& name, int64_t n) {
    return reinterpret_cast<const float*>(need(name, {n}, DType::f32)->data);
  };
  const DType wd = c.weights_dtype;
  const int64_t D = c.d_model, hd = c.head_dim;
  std::set<std::string> overridden;  // the tensor_dtypes entries used
  auto wdt = [&](const std::string& name) {
    const auto it = c.tensor_dtypes.find(name);
    if (it == c.tensor_dtypes.end()) return wd;
    overridden.insert(name);
    return it->second;
  };

  if (tokenizer_) expected.insert(tokenizer_->name);

  tok_embd_ = need("token_embd", {c.vocab_size, D}, c.embedding_dtype);
  for (int64_t i = 0; i < c.n_layer; ++i) {
    const std::string p = "blk." + std::to_string(i) + ".";
    LayerWeights L;
    L.n_head_q = c.n_head_q[size_t(i)];
    L.n_head_kv = c.n_head_kv[size_t(i)];
    L.ffn_dim = c.ffn_dim[size_t(i)];
    L.attn_norm = vec(p + "attn_norm", D);
    L.attn_qkv = need(p + "attn_qkv", {(L.n_head_q + 2 * L.n_head_kv) * hd, D}, wdt(p + "attn_qkv"));
    L.q_norm = c.qk_norm ? vec(p + "attn_q_norm", hd) : nullptr;
    L.k_norm = c.qk_norm ? vec(p + "attn_k_norm", hd) : nullptr;
    L.attn_out = need(p + "attn_output", {D, L.n_head_q * hd}, wdt(p + "attn_output"));
    L.ffn_norm = vec(p + "ffn_norm", D);
    if (!flash_) {
      L.gate_up = need(p + "ffn_gate_up", {2 * L.ffn_dim, D}, wdt(p + "ffn_gate_up"));
      L.down = need(p + "ffn_down", {D, L.ffn_dim}, wdt(p + "ffn_down"));
    } else {
      std::vector<FlashBundleGeometry> geo;
      if (!flash_bundles(wd, D, L.ffn_dim, flash_->bundle_neurons, &geo))
        bad(f, "layer " + std::to_string(i) + ": the flash bundles of ffn_dim " + std::to_string(L.ffn_dim) +
                   " do not fit in 64 bits");
      const uint64_t bytes = geo.back().offset + geo.back().bytes;
      const TensorView* t = need(p + "ffn_bundles", {int64_t(bytes)}, DType::u8);
      if (t->offset % kFlashBundleAlign != 0)
        bad(f, "tensor '" + t->name + "' starts at file offset " + std::to_string(t->offset) +
                   ", not a multiple of 4096 (flash bundles are read with direct I/O); re-export it");
      L.bundles_tensor = t;
      // The permutation (provenance: the FFN's output does not depend on neuron order) is
      // checked once here; its pages are part of the file the memory plan counts as resident.
      const TensorView* perm = need(p + "ffn_perm", {L.ffn_dim}, DType::i32);
      try {
        check_flash_perm(perm->data, L.ffn_dim, perm->name);
      } catch (const FormatError& e) {
        bad(f, e.what());
      }
      for (size_t b = 0; b < geo.size(); ++b) {
        const FlashBundleGeometry& g = geo[b];
        LayerWeights::Bundle B;
        B.offset = t->offset + g.offset;
        B.bytes = g.bytes;
        B.gate_up.name = t->name + "[" + std::to_string(b) + "].gate_up";
        B.gate_up.dtype = wd;
        B.gate_up.shape = {2 * g.neurons, D};
        B.gate_up.data = t->data + g.offset;
        B.gate_up.offset = B.offset;
        B.gate_up.size = g.gate_up_bytes;
        B.down.name = t->name + "[" + std::to_string(b) + "].down";
        B.down.dtype = wd;
        B.down.shape = {D, g.neurons};
        B.down.data = t->data + g.offset + g.down_offset;
        B.down.offset = B.offset + g.down_offset;
        B.down.size = g.down_bytes;
        L.bundles.push_back(std::move(B));
      }
    }
    max_qkv_ = std::max(max_qkv_, (L.n_head_q + 2 * L.n_head_kv) * hd);
    max_q_ = std::max(max_q_, L.n_head_q * hd);
    max_ffn_ = std::max(max_ffn_, L.ffn_dim);
    layers_.push_back(L);
  }
  output_norm_ = vec("output_norm", D);
  lm_head_ = c.tied_embeddings ? tok_embd_ : need("output", {c.vocab_size, D}, c.embedding_dtype);
  for (const auto& [name, t] : c.tensor_dtypes)
    if (!overridden.count(name))
      bad(f, "metadata: tensor_dtypes names '" + name + "', which is not a layer matrix of this file (the "
             "vocabulary matrices take embedding_dtype; flash-layout files have no per-matrix dtypes); re-export it");
  for (const TensorView& t : f.tensors())
    if (!expected.count(t.name))
      bad(f, "unexpected tensor '" + t.name + "' (not part of an OpenELM model with this config); "
             "the file was written by a different tool or version, re-export it");
}

}  // namespace oelm
