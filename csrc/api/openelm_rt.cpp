// The C API (include/openelm_rt/openelm_rt.h) as a thin layer over the C++ core:
// oelm_model wraps a Model; oelm_session a Runtime (paged KV cache and sequences) with an
// Engine on it, its own sequence (OELM_SEQ_DEFAULT) and a sampler. Generation runs through
// the same Engine the Python module uses. Here only: argument checks, option structs, locking,
// and turning C++ exceptions into status codes + a thread-local message.
#include "openelm_rt/openelm_rt.h"

#include <cstddef>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <vector>

#include "common/error.h"
#include "engine/engine.h"
#include "engine/runtime.h"
#include "format/oelm_file.h"
#include "generate/sampler.h"
#include "generate/speculative.h"
#include "model/backend.h"
#include "model/cuda.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

struct oelm_model {
  std::shared_ptr<const oelm::Model> model;
  oelm_model_options options;  // n_threads / max_context resolved for its sessions
};

struct oelm_session {
  std::shared_ptr<const oelm::Model> model;
  std::shared_ptr<oelm::Runtime> rt;
  std::unique_ptr<oelm::Engine> engine;
  int32_t seq = 0;              // OELM_SEQ_DEFAULT
  std::vector<float> logits;    // after the default sequence's last token; empty when there are none
  std::vector<float> scratch;   // the next logits, swapped in once an eval succeeds
  oelm::SamplingParams sampling;
  std::optional<oelm::Sampler> sampler;
  oelm_abort_callback abort_cb = nullptr;
  void* abort_user = nullptr;
  // Events taken from the engine but not yet polled (oelm_session_generate takes them all),
  // and the storage the last poll's pointers refer to.
  std::mutex poll_mu;
  std::deque<oelm::Event> stash;
  std::vector<oelm::Event> polled;
  std::vector<std::vector<oelm_token_logprob>> polled_top;
  std::vector<double> spec_curve;  // seconds of an n-token step, measured at the first speculative call

  oelm::InterruptFn interrupt() const {
    if (!abort_cb) return {};
    return [cb = abort_cb, user = abort_user] { return cb(user) != 0; };
  }
  // Held while a call uses the Runtime, so an engine thread's step never runs alongside.
  std::unique_lock<std::mutex> lock() { return std::unique_lock<std::mutex>(engine->runtime_mutex()); }
};

namespace {

thread_local std::string t_last_error;

// An error the API layer itself raises with a specific status.
struct ApiError : std::runtime_error {
  oelm_status status;
  ApiError(oelm_status s, const std::string& what) : std::runtime_error(what), status(s) {}
};

oelm_status fail(oelm_status s, const char* what) {
  try {
    t_last_error = what;
  } catch (...) {  // no memory even for the message: the status still says it
    t_last_error.clear();
  }
  return s;
}

// Runs fn; maps every exception onto a status and the thread's last-error message.
// Nothing thrown inside the core crosses the C ABI.
template <typename Fn>
oelm_status guarded(Fn&& fn) {
  t_last_error.clear();
  try {
    fn();
    return OELM_OK;
  } catch (const ApiError& e) {
    return fail(e.status, e.what());
  } catch (const oelm::KvBudgetExceeded& e) {
    return fail(OELM_KV_BUDGET, e.what());
  } catch (const oelm::InvalidArgument& e) {
    return fail(OELM_INVALID_ARGUMENT, e.what());
  } catch (const oelm::FileNotFound& e) {
    return fail(OELM_FILE_NOT_FOUND, e.what());
  } catch (const oelm::FormatError& e) {
    return fail(OELM_FORMAT_ERROR, e.what());
  } catch (const oelm::Interrupted&) {
    return fail(OELM_INTERRUPTED, "interrupted: the session's abort callback returned nonzero");
  } catch (const std::bad_alloc&) {
    return fail(OELM_OUT_OF_MEMORY, "out of memory; use a smaller max_context or free other sessions");
  } catch (const std::exception& e) {
    return fail(OELM_INTERNAL, (std::string("internal error: ") + e.what() +
                                "; please report it to the openelm_rt developers").c_str());
  } catch (...) {
    return fail(OELM_INTERNAL, "internal error: unknown exception; please report it to the openelm_rt developers");
  }
}

void require(bool ok, const char* what) {
  if (!ok) throw oelm::InvalidArgument(what);
}

// struct_size guards the ABI of the structs the caller passes. One from a newer header is
// longer than this library knows: refused. One from an older header is shorter: accepted when
// its size is one this library's history had (`older` sizes, each ending at a field added
// since), and the fields it lacks keep the defaults of `d`. Anything else (an uninitialised
// struct) is refused.
template <typename T>
T accept_struct(const T& s, const T& d, std::initializer_list<size_t> older, const char* type, const char* init) {
  if (s.struct_size == sizeof(T)) return s;
  for (size_t n : older)
    if (s.struct_size == n) {
      T out = d;
      std::memcpy(static_cast<void*>(&out), &s, n);
      out.struct_size = sizeof(T);
      return out;
    }
  throw oelm::InvalidArgument(
      std::string(type) + ".struct_size is " + std::to_string(s.struct_size) + ", expected " +
      std::to_string(sizeof(T)) +
      (s.struct_size > sizeof(T)
           ? "; the program was built against a newer openelm_rt.h than this library, upgrade libopenelm_rt"
           : std::string("; initialise it with ") + init));
}
template <typename T>
void check_struct_size(const T& s, const char* type, const char* init) {
  accept_struct(s, s, {}, type, init);
}

int32_t to_i32(int64_t v) { return int32_t(v); }  // every count here is < 2^31 by validation

// C++ types cross no extern "C" boundary: this stays outside that block (clang warns otherwise).
oelm::SamplingParams sampling_from(const oelm_sampling_params& p) {
  check_struct_size(p, "oelm_sampling_params", "oelm_sampling_params_default()");
  const oelm::SamplingParams sp{p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.seed};
  oelm::validate(sp);  // names the bad field
  return sp;
}

}  // namespace

extern "C" {

const char* oelm_version(void) {
#define OELM_STR2(x) #x
#define OELM_STR(x) OELM_STR2(x)
  return OELM_STR(OELM_VERSION_MAJOR) "." OELM_STR(OELM_VERSION_MINOR) "." OELM_STR(OELM_VERSION_PATCH);
#undef OELM_STR
#undef OELM_STR2
}

uint32_t oelm_format_version(void) { return oelm::kFormatVersion; }
uint32_t oelm_names_version(void) { return oelm::kNamesVersion; }

const char* oelm_last_error(void) { return t_last_error.c_str(); }

const char* oelm_status_name(oelm_status status) {
  switch (status) {
    case OELM_OK: return "OELM_OK";
    case OELM_INVALID_ARGUMENT: return "OELM_INVALID_ARGUMENT";
    case OELM_FILE_NOT_FOUND: return "OELM_FILE_NOT_FOUND";
    case OELM_FORMAT_ERROR: return "OELM_FORMAT_ERROR";
    case OELM_OUT_OF_MEMORY: return "OELM_OUT_OF_MEMORY";
    case OELM_BUFFER_TOO_SMALL: return "OELM_BUFFER_TOO_SMALL";
    case OELM_INTERRUPTED: return "OELM_INTERRUPTED";
    case OELM_INTERNAL: return "OELM_INTERNAL";
    case OELM_KV_BUDGET: return "OELM_KV_BUDGET";
  }
  return "OELM_UNKNOWN_STATUS";
}

const char* oelm_finish_reason_name(oelm_finish_reason reason) {
  switch (reason) {
    case OELM_FINISH_NONE: return "none";
    case OELM_FINISH_EOS: return "eos";
    case OELM_FINISH_LENGTH: return "length";
    case OELM_FINISH_CONTEXT: return "context";
    case OELM_FINISH_CALLBACK: return "callback";
    case OELM_FINISH_STOP: return "stop";
    case OELM_FINISH_CANCELLED: return "cancelled";
    case OELM_FINISH_ERROR: return "error";
  }
  return "unknown";
}

// ---- model ------------------------------------------------------------------------

oelm_model_options oelm_model_options_default(void) {
  oelm_model_options o;
  std::memset(&o, 0, sizeof o);
  o.struct_size = sizeof o;
  return o;
}

oelm_status oelm_model_load(const char* path, const oelm_model_options* options, oelm_model** out_model) {
  return guarded([&] {
    require(out_model != nullptr, "oelm_model_load: out_model is NULL");
    require(path != nullptr, "oelm_model_load: path is NULL");
    const oelm_model_options d = oelm_model_options_default();
    oelm_model_options o = options ? accept_struct(*options, d,
                                                   {offsetof(oelm_model_options, kv_type),
                                                    offsetof(oelm_model_options, memory_budget_mib),
                                                    offsetof(oelm_model_options, backend)},
                                                   "oelm_model_options", "oelm_model_options_default()")
                                   : d;
    if (o.n_threads < 0)
      throw oelm::InvalidArgument("n_threads must be >= 1 (or 0 for one per hardware thread), got " +
                                  std::to_string(o.n_threads));
    if (o.max_context < 0)
      throw oelm::InvalidArgument("max_context must be >= 1 (or 0 for the model's training context), got " +
                                  std::to_string(o.max_context));
    if (o.kv_type != OELM_KV_F32 && o.kv_type != OELM_KV_F16)
      throw oelm::InvalidArgument("kv_type must be OELM_KV_F32 (0) or OELM_KV_F16 (1), got " +
                                  std::to_string(o.kv_type));
    if (o.kv_budget_mib < 0 || o.kv_budget_mib > (int64_t(1) << 30))
      throw oelm::InvalidArgument("kv_budget_mib must be >= 1 (or 0 for the default), got " +
                                  std::to_string(o.kv_budget_mib));
    if (o.memory_budget_mib < 0 || o.memory_budget_mib > (int64_t(1) << 30))
      throw oelm::InvalidArgument("memory_budget_mib must be >= 1 (or 0 for no cap), got " +
                                  std::to_string(o.memory_budget_mib));
    if (o.kv_block_size < 0 || o.kv_block_size % 16 || o.kv_block_size > 4096)
      throw oelm::InvalidArgument("kv_block_size must be a multiple of 16 up to 4096 (or 0 for the default), got " +
                                  std::to_string(o.kv_block_size));
    if (o.max_batch < 0 || o.max_batch > 4096)
      throw oelm::InvalidArgument("max_batch must be in [1, 4096] (or 0 for the default), got " +
                                  std::to_string(o.max_batch));
    if (o.backend != OELM_BACKEND_CPU && o.backend != OELM_BACKEND_CUDA && o.backend != OELM_BACKEND_AUTO)
      throw oelm::InvalidArgument("backend must be OELM_BACKEND_CPU (0), OELM_BACKEND_CUDA (1) or OELM_BACKEND_AUTO "
                                  "(2), got " + std::to_string(o.backend));
    if (o.prefix_cache < -1 || o.prefix_cache > 4096)
      throw oelm::InvalidArgument("prefix_cache must be -1 (none), 0 (default) or up to 4096 entries, got " +
                                  std::to_string(o.prefix_cache));
    auto m = std::make_unique<oelm_model>();
    m->model = oelm::Model::load(path, o.verify != 0);
    if (o.max_context == 0) o.max_context = to_i32(m->model->config().max_context);
    m->options = o;
    *out_model = m.release();
  });
}

void oelm_model_free(oelm_model* model) { delete model; }

int32_t oelm_model_vocab_size(const oelm_model* model) {
  return model ? to_i32(model->model->config().vocab_size) : 0;
}
int32_t oelm_model_bos_token(const oelm_model* model) { return model ? model->model->config().bos_token_id : -1; }
int32_t oelm_model_eos_token(const oelm_model* model) { return model ? model->model->config().eos_token_id : -1; }
int32_t oelm_model_train_context(const oelm_model* model) {
  return model ? to_i32(model->model->config().max_context) : 0;
}
int oelm_model_has_tokenizer(const oelm_model* model) { return model && model->model->has_tokenizer() ? 1 : 0; }

// ---- text -------------------------------------------------------------------------------

oelm_status oelm_tokenize(const oelm_model* model, const char* text, size_t text_len, int add_bos, int32_t* tokens,
                          size_t capacity, size_t* n_tokens) {
  return guarded([&] {
    require(model != nullptr, "oelm_tokenize: model is NULL");
    require(n_tokens != nullptr, "oelm_tokenize: n_tokens is NULL");
    require(text != nullptr || text_len == 0, "oelm_tokenize: text is NULL");
    require(tokens != nullptr || capacity == 0, "oelm_tokenize: tokens is NULL but capacity is not 0");
    if (text_len == size_t(-1)) text_len = std::strlen(text);
    const std::vector<int32_t> ids = model->model->tokenizer().encode(std::string_view(text, text_len), add_bos != 0);
    *n_tokens = ids.size();
    if (ids.size() > capacity)
      throw ApiError(OELM_BUFFER_TOO_SMALL, "oelm_tokenize: the text has " + std::to_string(ids.size()) +
                                                " tokens, more than capacity " + std::to_string(capacity) +
                                                "; *n_tokens is the size needed");
    std::copy(ids.begin(), ids.end(), tokens);
  });
}

oelm_status oelm_detokenize(const oelm_model* model, const int32_t* tokens, size_t n, char* text, size_t capacity,
                            size_t* text_len) {
  return guarded([&] {
    require(model != nullptr, "oelm_detokenize: model is NULL");
    require(text_len != nullptr, "oelm_detokenize: text_len is NULL");
    require(tokens != nullptr || n == 0, "oelm_detokenize: tokens is NULL");
    require(text != nullptr || capacity == 0, "oelm_detokenize: text is NULL but capacity is not 0");
    const std::string s = model->model->tokenizer().decode(tokens, n);  // checks the ids
    *text_len = s.size();
    if (s.size() >= capacity)
      throw ApiError(OELM_BUFFER_TOO_SMALL, "oelm_detokenize: the text is " + std::to_string(s.size()) +
                                                " bytes, it needs capacity " + std::to_string(s.size() + 1) +
                                                " (with the NUL), got " + std::to_string(capacity) +
                                                "; *text_len is its length");
    std::memcpy(text, s.data(), s.size());
    text[s.size()] = '\0';
  });
}

// ---- sessions -----------------------------------------------------------------------

oelm_status oelm_session_new(const oelm_model* model, oelm_session** out_session) {
  return guarded([&] {
    require(out_session != nullptr, "oelm_session_new: out_session is NULL");
    require(model != nullptr, "oelm_session_new: model is NULL");
    const oelm_model_options& o = model->options;
    auto s = std::make_unique<oelm_session>();
    s->model = model->model;
    oelm::RuntimeOptions ro;
    ro.max_context = o.max_context;
    ro.kv_type = o.kv_type == OELM_KV_F16 ? oelm::KvType::f16 : oelm::KvType::f32;
    ro.kv_budget_bytes = o.kv_budget_mib * (int64_t(1) << 20);
    ro.block_size = o.kv_block_size;
    ro.memory_budget_bytes = o.memory_budget_mib * (int64_t(1) << 20);
    ro.prefix_cache_entries = o.prefix_cache == 0 ? 16 : o.prefix_cache < 0 ? 0 : o.prefix_cache;
    ro.budget_sequences = o.max_batch > 0 ? o.max_batch : 16;
    const bool cuda = o.backend == OELM_BACKEND_CUDA || (o.backend == OELM_BACKEND_AUTO && oelm::cuda_available());
    std::shared_ptr<oelm::Backend> backend = oelm::Backend::create(cuda ? "cuda" : "cpu", o.n_threads);
    backend->set_exact(o.exact >= 0 || cuda);  // 0 (default) and positive: exact; negative: rounded
    s->rt = std::make_shared<oelm::Runtime>(s->model, std::move(backend), ro);
    oelm::EngineOptions eo;
    eo.max_batch = o.max_batch > 0 ? std::min<int32_t>(o.max_batch, int32_t(s->rt->max_step_tokens())) : 16;
    s->engine = std::make_unique<oelm::Engine>(s->rt, eo);
    s->seq = s->rt->seq_new();  // OELM_SEQ_DEFAULT: the first sequence of a new runtime is 0
    s->sampler.emplace(s->sampling);
    *out_session = s.release();
  });
}

void oelm_session_free(oelm_session* session) {
  if (!session) return;
  session->engine->stop();
  delete session;
}

void oelm_session_reset(oelm_session* session) {
  if (!session) return;
  auto lk = session->lock();
  session->rt->seq_truncate(session->seq, 0);
  session->logits.clear();
}

int32_t oelm_session_n_past(const oelm_session* session) {
  if (!session) return 0;
  auto lk = const_cast<oelm_session*>(session)->lock();
  return to_i32(session->rt->seq_len(session->seq));
}
int32_t oelm_session_max_context(const oelm_session* session) {
  return session ? to_i32(session->rt->max_context()) : 0;
}

void oelm_session_set_abort_callback(oelm_session* session, oelm_abort_callback callback, void* user_data) {
  if (!session) return;
  session->abort_cb = callback;
  session->abort_user = user_data;
}

oelm_status oelm_session_eval(oelm_session* session, const int32_t* tokens, size_t n, float* all_logits) {
  return guarded([&] {
    require(session != nullptr, "oelm_session_eval: session is NULL");
    require(tokens != nullptr || n == 0, "oelm_session_eval: tokens is NULL");
    auto lk = session->lock();
    const size_t V = size_t(session->model->config().vocab_size);
    // Bound n first so the int64 conversion and the buffer below cannot overflow.
    if (n > size_t(session->rt->max_context()))
      throw oelm::InvalidArgument("oelm_session_eval: " + std::to_string(n) + " tokens exceed max_context " +
                                  std::to_string(session->rt->max_context()));
    if (n == 0) throw oelm::InvalidArgument("oelm_session_eval: n is 0; evaluate at least one token");
    std::vector<float>& next = session->scratch;
    next.resize(V);
    session->rt->eval({{session->seq, tokens, int64_t(n),
                        all_logits ? oelm::Runtime::Logits::all : oelm::Runtime::Logits::last}},
                      all_logits ? all_logits : next.data(), session->interrupt());
    if (all_logits) std::memcpy(next.data(), all_logits + (n - 1) * V, V * sizeof(float));
    session->logits.swap(next);
  });
}

const float* oelm_session_logits(const oelm_session* session) {
  return session && !session->logits.empty() ? session->logits.data() : nullptr;
}

// ---- sequences -----------------------------------------------------------------------

oelm_status oelm_seq_new(oelm_session* session, oelm_seq* out_seq) {
  return guarded([&] {
    require(session != nullptr, "oelm_seq_new: session is NULL");
    require(out_seq != nullptr, "oelm_seq_new: out_seq is NULL");
    auto lk = session->lock();
    *out_seq = session->rt->seq_new();
  });
}

oelm_status oelm_seq_fork(oelm_session* session, oelm_seq parent, int32_t n_tokens, oelm_seq* out_seq) {
  return guarded([&] {
    require(session != nullptr, "oelm_seq_fork: session is NULL");
    require(out_seq != nullptr, "oelm_seq_fork: out_seq is NULL");
    auto lk = session->lock();
    session->rt->check_seq(parent, "oelm_seq_fork: parent");
    if (n_tokens < -1) throw oelm::InvalidArgument("oelm_seq_fork: n_tokens must be >= 0 (or -1 for all), got " +
                                                   std::to_string(n_tokens));
    *out_seq = session->rt->seq_fork(parent, n_tokens);
  });
}

oelm_status oelm_seq_truncate(oelm_session* session, oelm_seq seq, int32_t n_tokens) {
  return guarded([&] {
    require(session != nullptr, "oelm_seq_truncate: session is NULL");
    auto lk = session->lock();
    session->rt->check_seq(seq, "oelm_seq_truncate: seq");
    session->rt->seq_truncate(seq, n_tokens);
    if (seq == session->seq) session->logits.clear();
  });
}

oelm_status oelm_seq_free(oelm_session* session, oelm_seq seq) {
  return guarded([&] {
    require(session != nullptr, "oelm_seq_free: session is NULL");
    auto lk = session->lock();
    if (seq == session->seq)
      throw oelm::InvalidArgument("oelm_seq_free: OELM_SEQ_DEFAULT is the session's own sequence and cannot be "
                                  "freed; empty it with oelm_session_reset");
    session->rt->check_seq(seq, "oelm_seq_free: seq");
    session->rt->seq_free(seq);
  });
}

int32_t oelm_seq_length(const oelm_session* session, oelm_seq seq) {
  if (!session) return -1;
  auto lk = const_cast<oelm_session*>(session)->lock();
  return session->rt->seq_exists(seq) ? to_i32(session->rt->seq_len(seq)) : -1;
}

oelm_status oelm_session_eval_batch(oelm_session* session, const oelm_batch_item* items, size_t n_items,
                                    float* logits, size_t logits_capacity, size_t* n_rows) {
  return guarded([&] {
    require(session != nullptr, "oelm_session_eval_batch: session is NULL");
    require(items != nullptr || n_items == 0, "oelm_session_eval_batch: items is NULL");
    require(n_rows != nullptr, "oelm_session_eval_batch: n_rows is NULL");
    require(logits != nullptr || logits_capacity == 0, "oelm_session_eval_batch: logits is NULL but capacity is not 0");
    if (n_items == 0) throw oelm::InvalidArgument("oelm_session_eval_batch: no items; pass at least one");
    auto lk = session->lock();
    std::vector<oelm::Runtime::EvalEntry> entries;
    for (size_t i = 0; i < n_items; ++i) {
      const oelm_batch_item& it = items[i];
      const std::string where = "oelm_session_eval_batch: items[" + std::to_string(i) + "]";
      if (it.n_tokens < 1) throw oelm::InvalidArgument(where + ".n_tokens must be >= 1, got " + std::to_string(it.n_tokens));
      if (!it.tokens) throw oelm::InvalidArgument(where + ".tokens is NULL");
      if (it.logits < OELM_LOGITS_NONE || it.logits > OELM_LOGITS_ALL)
        throw oelm::InvalidArgument(where + ".logits must be OELM_LOGITS_NONE, _LAST or _ALL, got " +
                                    std::to_string(it.logits));
      session->rt->check_seq(it.seq, (where + ".seq").c_str());
      entries.push_back({it.seq, it.tokens, it.n_tokens,
                         it.logits == OELM_LOGITS_ALL    ? oelm::Runtime::Logits::all
                         : it.logits == OELM_LOGITS_LAST ? oelm::Runtime::Logits::last
                                                         : oelm::Runtime::Logits::none});
    }
    const size_t rows = size_t(oelm::Runtime::logit_rows(entries));
    const size_t V = size_t(session->model->config().vocab_size);
    *n_rows = rows;
    if (rows * V > logits_capacity)
      throw ApiError(OELM_BUFFER_TOO_SMALL, "oelm_session_eval_batch: " + std::to_string(rows) + " rows of logits need " +
                                                std::to_string(rows * V) + " floats, capacity is " +
                                                std::to_string(logits_capacity) + "; *n_rows is the rows needed");
    session->rt->eval(entries, logits, session->interrupt());
    for (const auto& e : entries)
      if (e.seq == session->seq) session->logits.clear();  // its last logits are no longer current
  });
}

// ---- scoring ---------------------------------------------------------------------------

oelm_status oelm_session_score_batch(oelm_session* session, oelm_score_pair* pairs, size_t n_pairs) {
  return guarded([&] {
    require(session != nullptr, "oelm_session_score_batch: session is NULL");
    require(pairs != nullptr || n_pairs == 0, "oelm_session_score_batch: pairs is NULL");
    std::vector<std::pair<std::vector<int32_t>, std::vector<int32_t>>> in(n_pairs);
    for (size_t i = 0; i < n_pairs; ++i) {
      const oelm_score_pair& p = pairs[i];
      const std::string where = "oelm_session_score_batch: pairs[" + std::to_string(i) + "]";
      if (!p.context && p.n_context) throw oelm::InvalidArgument(where + ".context is NULL");
      if (!p.continuation && p.n_continuation) throw oelm::InvalidArgument(where + ".continuation is NULL");
      if (!p.logprobs) throw oelm::InvalidArgument(where + ".logprobs is NULL");
      const size_t limit = size_t(session->rt->max_context()) + 1;
      if (p.n_context > limit || p.n_continuation > limit)
        throw oelm::InvalidArgument(where + " is longer than max_context " + std::to_string(limit - 1));
      in[i].first.assign(p.context, p.context + p.n_context);
      in[i].second.assign(p.continuation, p.continuation + p.n_continuation);
    }
    auto lk = session->lock();
    const std::vector<oelm::ScoreResult> out = session->rt->score_batch(in, session->interrupt());
    for (size_t i = 0; i < n_pairs; ++i) {
      std::copy(out[i].logprobs.begin(), out[i].logprobs.end(), pairs[i].logprobs);
      pairs[i].is_greedy = out[i].is_greedy ? 1 : 0;
    }
  });
}

oelm_status oelm_session_score(oelm_session* session, const int32_t* context, size_t n_context,
                               const int32_t* continuation, size_t n_continuation, double* logprobs,
                               int32_t* is_greedy) {
  oelm_score_pair p{context, n_context, continuation, n_continuation, logprobs, 0};
  const oelm_status st = oelm_session_score_batch(session, &p, 1);
  if (st == OELM_OK && is_greedy) *is_greedy = p.is_greedy;
  return st;
}

// ---- sampling -----------------------------------------------------------------------

oelm_sampling_params oelm_sampling_params_default(void) {
  const oelm::SamplingParams d;
  oelm_sampling_params p;
  std::memset(&p, 0, sizeof p);
  p.struct_size = sizeof p;
  p.temperature = d.temperature;
  p.top_k = d.top_k;
  p.top_p = d.top_p;
  p.min_p = d.min_p;
  p.repetition_penalty = d.repetition_penalty;
  p.seed = d.seed;
  return p;
}

oelm_status oelm_session_set_sampling(oelm_session* session, const oelm_sampling_params* params) {
  return guarded([&] {
    require(session != nullptr, "oelm_session_set_sampling: session is NULL");
    require(params != nullptr, "oelm_session_set_sampling: params is NULL");
    const oelm::SamplingParams sp = sampling_from(*params);  // the session keeps its sampler on failure
    session->sampler.emplace(sp);
    session->sampling = sp;
  });
}

oelm_status oelm_session_sample(oelm_session* session, int32_t* out_token) {
  return guarded([&] {
    require(session != nullptr, "oelm_session_sample: session is NULL");
    require(out_token != nullptr, "oelm_session_sample: out_token is NULL");
    if (session->logits.empty())
      throw oelm::InvalidArgument("oelm_session_sample: no logits to sample from; evaluate at least one "
                                  "token with oelm_session_eval first");
    auto lk = session->lock();
    *out_token = session->sampler->sample(session->logits.data(), int64_t(session->logits.size()),
                                          session->rt->seq_tokens(session->seq));
  });
}

// ---- generation -----------------------------------------------------------------------

oelm_generate_result oelm_generate_result_init(void) {
  oelm_generate_result r;
  std::memset(&r, 0, sizeof r);
  r.struct_size = sizeof r;
  return r;
}

namespace {
oelm_finish_reason to_c(oelm::FinishReason r) {
  switch (r) {
    case oelm::FinishReason::none: return OELM_FINISH_NONE;
    case oelm::FinishReason::eos: return OELM_FINISH_EOS;
    case oelm::FinishReason::length: return OELM_FINISH_LENGTH;
    case oelm::FinishReason::stop: return OELM_FINISH_STOP;
    case oelm::FinishReason::context: return OELM_FINISH_CONTEXT;
    case oelm::FinishReason::cancelled: return OELM_FINISH_CANCELLED;
    case oelm::FinishReason::error: return OELM_FINISH_ERROR;
  }
  return OELM_FINISH_NONE;
}
}  // namespace

oelm_status oelm_session_generate(oelm_session* session, const int32_t* prompt, size_t n_prompt,
                                  int32_t max_new_tokens, oelm_token_callback callback, void* user_data,
                                  oelm_generate_result* result) {
  return guarded([&] {
    require(session != nullptr, "oelm_session_generate: session is NULL");
    require(prompt != nullptr || n_prompt == 0, "oelm_session_generate: prompt is NULL");
    const oelm_generate_result rd = oelm_generate_result_init();
    if (result)
      accept_struct(*result, rd, {offsetof(oelm_generate_result, n_cached), offsetof(oelm_generate_result, n_proposed)},
                    "oelm_generate_result", "oelm_generate_result_init()");
    if (session->engine->running_thread())
      throw oelm::InvalidArgument("oelm_session_generate: an engine thread runs this session (oelm_session_start); "
                                  "submit requests with oelm_session_submit instead");
    if (n_prompt > size_t(session->rt->max_context()))
      throw oelm::InvalidArgument("the prompt has " + std::to_string(n_prompt) + " tokens, more than max_context " +
                                  std::to_string(session->rt->max_context()) +
                                  "; shorten it or load the model with a larger max_context");
    {
      auto lk = session->lock();
      session->rt->seq_truncate(session->seq, 0);  // its blocks stay in the prefix cache
      session->logits.clear();
    }
    oelm::GenerateRequest req;
    req.prompt.assign(prompt, prompt + n_prompt);
    req.sampling = session->sampling;
    req.max_new_tokens = max_new_tokens;
    oelm::Engine& eng = *session->engine;
    const uint64_t id = eng.submit(std::move(req));
    const oelm::InterruptFn interrupt = session->interrupt();
    oelm_finish_reason finish = OELM_FINISH_NONE;
    oelm::Event last;
    const bool has_text = session->model->has_tokenizer();  // else the pieces are empty: NULL, 0
    std::vector<int32_t> tokens(prompt, prompt + n_prompt);
    bool stopped_by_callback = false;
    try {
      while (last.finish == oelm::FinishReason::none) {
        eng.step(interrupt);
        for (oelm::Event& e : eng.take_events()) {
          if (e.id != id) {  // another request's (oelm_session_submit): kept for oelm_session_poll
            std::lock_guard<std::mutex> lk(session->poll_mu);
            session->stash.push_back(std::move(e));
            continue;
          }
          if (e.token >= 0) tokens.push_back(e.token);
          if (e.token >= 0 && callback && !stopped_by_callback &&
              callback(user_data, e.token, has_text ? e.text.data() : nullptr, e.text.size()) != 0) {
            stopped_by_callback = true;
            eng.cancel(id);
          }
          if (e.finish != oelm::FinishReason::none) last = std::move(e);
        }
      }
    } catch (...) {  // a failed generation leaves an empty sequence, not a partial one
      eng.cancel(id);
      try {
        eng.step();  // handles the cancellation; computes nothing for it
        for (oelm::Event& e : eng.take_events())
          if (e.id != id) {
            std::lock_guard<std::mutex> lk(session->poll_mu);
            session->stash.push_back(std::move(e));
          }
      } catch (...) {
      }
      throw;
    }
    if (last.finish == oelm::FinishReason::error) {
      if (last.error_kind == oelm::ErrorKind::model) throw oelm::FormatError(last.error);  // OELM_FORMAT_ERROR
      if (last.error_kind == oelm::ErrorKind::kv_budget) throw oelm::KvBudgetExceeded(last.error);
      throw std::runtime_error(last.error);  // OELM_INTERNAL
    }
    finish = stopped_by_callback ? OELM_FINISH_CALLBACK : to_c(last.finish);
    {
      // The session's sequence: every token but the last sampled (never evaluated), shared
      // with the prefix cache entry the engine left.
      auto lk = session->lock();
      const int64_t n_eval = int64_t(tokens.size()) - (last.n_generated > 0 ? 1 : 0);
      session->rt->seq_load_prefix(session->seq, tokens.data(), n_eval, n_eval);
    }
    if (result) {
      oelm_generate_result r = rd;
      r.finish_reason = finish;
      r.n_prompt = to_i32(last.n_prompt);
      r.n_generated = to_i32(last.n_generated);
      r.prefill_seconds = last.prefill_seconds;
      r.decode_seconds = last.decode_seconds;
      r.n_cached = to_i32(last.n_cached);
      std::memcpy(static_cast<void*>(result), &r, result->struct_size == sizeof r ? sizeof r : result->struct_size);
    }
  });
}

oelm_speculation_params oelm_speculation_params_default(void) {
  oelm_speculation_params p;
  std::memset(&p, 0, sizeof p);
  p.struct_size = sizeof p;
  p.prompt_lookup_num_tokens = 10;
  p.max_matching_ngram_size = 2;
  p.mode = OELM_SPECULATION_ADAPTIVE;
  return p;
}

oelm_status oelm_session_generate_speculative(oelm_session* session, const int32_t* prompt, size_t n_prompt,
                                              int32_t max_new_tokens, const oelm_speculation_params* params,
                                              oelm_token_callback callback, void* user_data,
                                              oelm_generate_result* result) {
  return guarded([&] {
    const char* fn = "oelm_session_generate_speculative";
    require(session != nullptr, "oelm_session_generate_speculative: session is NULL");
    require(prompt != nullptr || n_prompt == 0, "oelm_session_generate_speculative: prompt is NULL");
    const oelm_generate_result rd = oelm_generate_result_init();
    if (result)
      accept_struct(*result, rd, {offsetof(oelm_generate_result, n_cached), offsetof(oelm_generate_result, n_proposed)},
                    "oelm_generate_result", "oelm_generate_result_init()");
    const oelm_speculation_params pd = oelm_speculation_params_default();
    const oelm_speculation_params p = params ? accept_struct(*params, pd, {}, "oelm_speculation_params",
                                                             "oelm_speculation_params_default()")
                                             : pd;
    if (p.prompt_lookup_num_tokens < 1)
      throw oelm::InvalidArgument(std::string(fn) + ": prompt_lookup_num_tokens must be >= 1, got " +
                                  std::to_string(p.prompt_lookup_num_tokens));
    if (p.max_matching_ngram_size < 1)
      throw oelm::InvalidArgument(std::string(fn) + ": max_matching_ngram_size must be >= 1, got " +
                                  std::to_string(p.max_matching_ngram_size));
    if (p.mode != OELM_SPECULATION_ADAPTIVE && p.mode != OELM_SPECULATION_HF)
      throw oelm::InvalidArgument(std::string(fn) + ": mode must be OELM_SPECULATION_ADAPTIVE or "
                                  "OELM_SPECULATION_HF, got " + std::to_string(p.mode));
    if (max_new_tokens < 0)
      throw oelm::InvalidArgument(std::string(fn) + ": max_new_tokens must be >= 0, got " +
                                  std::to_string(max_new_tokens));
    if (session->engine->running_thread())
      throw oelm::InvalidArgument(std::string(fn) + ": an engine thread runs this session (oelm_session_start); "
                                  "submit requests with oelm_session_submit instead");
    oelm::Runtime& rt = *session->rt;
    const int64_t V = session->model->config().vocab_size;
    if (n_prompt == 0) throw oelm::InvalidArgument(std::string(fn) + ": the prompt is empty; pass at least one token");
    if (n_prompt >= size_t(rt.max_context()))
      throw oelm::InvalidArgument(std::string(fn) + ": the prompt has " + std::to_string(n_prompt) +
                                  " tokens but max_context is " + std::to_string(rt.max_context()) +
                                  ", leaving no room to generate; shorten it or load the model with a larger "
                                  "max_context");
    std::vector<int32_t> ids(prompt, prompt + n_prompt);
    for (size_t i = 0; i < n_prompt; ++i)
      if (ids[i] < 0 || ids[i] >= V)
        throw oelm::InvalidArgument(std::string(fn) + ": prompt[" + std::to_string(i) + "] = " +
                                    std::to_string(ids[i]) + " is outside the vocabulary [0, " + std::to_string(V) +
                                    ")");
    std::mutex& mu = session->engine->runtime_mutex();
    int64_t cached = 0;
    {
      // Reuse what the session's sequence shares with the prompt (at least the last prompt
      // token is evaluated, for its logits), else the longest prefix in the prefix cache.
      std::lock_guard<std::mutex> lk(mu);
      session->logits.clear();
      const std::vector<int32_t>& have = rt.seq_tokens(session->seq);
      const size_t cap = std::min(have.size(), n_prompt - 1);
      while (size_t(cached) < cap && have[size_t(cached)] == ids[size_t(cached)]) ++cached;
      rt.seq_truncate(session->seq, cached);
      if (cached == 0) cached = rt.seq_load_prefix(session->seq, ids.data(), int64_t(n_prompt), int64_t(n_prompt) - 1);
    }
    oelm::SpecOptions so;
    so.prompt_lookup_num_tokens = p.prompt_lookup_num_tokens;
    so.max_matching_ngram_size = p.max_matching_ngram_size;
    so.adaptive = p.mode == OELM_SPECULATION_ADAPTIVE;
    const bool has_text = session->model->has_tokenizer();
    oelm::SpecTokenFn on_token;
    if (callback)
      on_token = [&](int32_t tok, const std::string& piece) {
        return callback(user_data, tok, has_text ? piece.data() : nullptr, has_text ? piece.size() : 0) == 0;
      };
    oelm::SpecResult r;
    try {
      r = oelm::speculative_generate(rt, session->seq, ids, max_new_tokens, session->sampling,
                                     has_text ? &session->model->tokenizer() : nullptr, so, session->spec_curve,
                                     on_token, session->interrupt(), &mu);
    } catch (...) {  // a failed generation leaves an empty sequence, not a partial one
      std::lock_guard<std::mutex> lk(mu);
      rt.seq_truncate(session->seq, 0);
      throw;
    }
    {
      std::lock_guard<std::mutex> lk(mu);
      rt.cache_prefix(session->seq, rt.seq_len(session->seq));  // later prompts may extend it
    }
    if (result) {
      oelm_generate_result out = rd;
      using F = oelm::SpecFinish;
      out.finish_reason = r.finish == F::eos        ? OELM_FINISH_EOS
                          : r.finish == F::length   ? OELM_FINISH_LENGTH
                          : r.finish == F::context  ? OELM_FINISH_CONTEXT
                          : r.finish == F::callback ? OELM_FINISH_CALLBACK
                                                    : OELM_FINISH_NONE;
      out.n_prompt = to_i32(int64_t(n_prompt));
      out.n_generated = to_i32(r.n_generated);
      out.prefill_seconds = r.prefill_seconds;
      out.decode_seconds = r.decode_seconds;
      out.n_cached = to_i32(cached);
      out.n_proposed = to_i32(r.stats.proposed);
      out.n_accepted = to_i32(r.stats.accepted);
      out.n_verify_steps = to_i32(r.stats.verify_steps);
      std::memcpy(static_cast<void*>(result), &out,
                  result->struct_size == sizeof out ? sizeof out : result->struct_size);
    }
  });
}

// ---- the engine ------------------------------------------------------------------------

oelm_request_params oelm_request_params_default(void) {
  oelm_request_params p;
  std::memset(&p, 0, sizeof p);
  p.struct_size = sizeof p;
  p.sampling = oelm_sampling_params_default();
  p.max_new_tokens = 128;
  p.logprobs = -1;
  p.reuse_prefix = 1;
  return p;
}

oelm_status oelm_session_submit(oelm_session* session, const int32_t* prompt, size_t n_prompt,
                                const oelm_request_params* params, oelm_request* out_request) {
  return guarded([&] {
    require(session != nullptr, "oelm_session_submit: session is NULL");
    require(prompt != nullptr || n_prompt == 0, "oelm_session_submit: prompt is NULL");
    require(out_request != nullptr, "oelm_session_submit: out_request is NULL");
    const oelm_request_params p = params ? *params : oelm_request_params_default();
    check_struct_size(p, "oelm_request_params", "oelm_request_params_default()");
    if (p.n_stop > 0 && !p.stop) throw oelm::InvalidArgument("oelm_session_submit: stop is NULL but n_stop is not 0");
    if (n_prompt > size_t(session->rt->max_context()) + 1)
      throw oelm::InvalidArgument("the prompt has " + std::to_string(n_prompt) + " tokens, more than max_context " +
                                  std::to_string(session->rt->max_context()));
    oelm::GenerateRequest req;
    req.prompt.assign(prompt, prompt + n_prompt);
    req.sampling = sampling_from(p.sampling);
    req.max_new_tokens = p.max_new_tokens;
    for (size_t i = 0; i < p.n_stop; ++i) {
      if (!p.stop[i]) throw oelm::InvalidArgument("oelm_session_submit: stop[" + std::to_string(i) + "] is NULL");
      req.stop.emplace_back(p.stop[i]);
    }
    req.logprobs = p.logprobs;
    req.reuse_prefix = p.reuse_prefix != 0;
    *out_request = session->engine->submit(std::move(req));
  });
}

oelm_status oelm_session_cancel(oelm_session* session, oelm_request request) {
  return guarded([&] {
    require(session != nullptr, "oelm_session_cancel: session is NULL");
    session->engine->cancel(request);
  });
}

oelm_status oelm_session_step(oelm_session* session, int32_t* busy) {
  return guarded([&] {
    require(session != nullptr, "oelm_session_step: session is NULL");
    if (session->engine->running_thread())
      throw oelm::InvalidArgument("oelm_session_step: an engine thread steps this session (oelm_session_start)");
    const bool did = session->engine->step(session->interrupt());
    if (busy) *busy = did ? 1 : 0;
  });
}

oelm_status oelm_session_start(oelm_session* session) {
  return guarded([&] {
    require(session != nullptr, "oelm_session_start: session is NULL");
    session->engine->start();
  });
}

void oelm_session_stop(oelm_session* session) {
  if (session) session->engine->stop();
}

oelm_status oelm_session_poll(oelm_session* session, oelm_event* events, size_t capacity, size_t* n_events,
                              double timeout_seconds) {
  return guarded([&] {
    require(session != nullptr, "oelm_session_poll: session is NULL");
    require(n_events != nullptr, "oelm_session_poll: n_events is NULL");
    require(events != nullptr || capacity == 0, "oelm_session_poll: events is NULL but capacity is not 0");
    if (!(timeout_seconds >= 0)) throw oelm::InvalidArgument("oelm_session_poll: timeout_seconds must be >= 0");
    std::lock_guard<std::mutex> lk(session->poll_mu);
    std::vector<oelm::Event> fresh;
    if (session->stash.empty()) session->engine->wait_events(fresh, timeout_seconds);
    else fresh = session->engine->take_events();
    for (oelm::Event& e : fresh) session->stash.push_back(std::move(e));
    session->polled.clear();
    session->polled_top.clear();
    session->polled_top.reserve(capacity < session->stash.size() ? capacity : session->stash.size());
    while (!session->stash.empty() && session->polled.size() < capacity) {
      session->polled.push_back(std::move(session->stash.front()));
      session->stash.pop_front();
    }
    *n_events = session->polled.size();
    for (size_t i = 0; i < session->polled.size(); ++i) {
      const oelm::Event& e = session->polled[i];
      std::vector<oelm_token_logprob> top;
      for (const oelm::TokenLogprob& t : e.top) top.push_back({t.token, t.logprob});
      session->polled_top.push_back(std::move(top));
      oelm_event& o = events[i];
      std::memset(&o, 0, sizeof o);
      o.request = e.id;
      o.token = e.token;
      o.text = e.text.data();
      o.text_len = e.text.size();
      o.logprob = e.logprob;
      o.top = session->polled_top.back().data();
      o.n_top = session->polled_top.back().size();
      o.finish = to_c(e.finish);
      o.error = e.error.c_str();
      o.n_prompt = to_i32(e.n_prompt);
      o.n_cached = to_i32(e.n_cached);
      o.n_generated = to_i32(e.n_generated);
      o.prefill_seconds = e.prefill_seconds;
      o.decode_seconds = e.decode_seconds;
    }
  });
}

}  // extern "C"
