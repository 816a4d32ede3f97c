// The C API (include/openelm_rt/openelm_rt.h) as a thin layer over the C++ core:
// oelm_model wraps a Model, oelm_session a Backend + Context + Sampler, generation
// runs the same Generator the Python module uses. Here only: argument checks, option
// structs, and turning C++ exceptions into status codes + a thread-local message.
#include "openelm_rt/openelm_rt.h"

#include <cstring>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <vector>

#include "common/error.h"
#include "format/oelm_file.h"
#include "generate/generator.h"
#include "generate/sampler.h"
#include "model/backend.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

struct oelm_model {
  std::shared_ptr<const oelm::Model> model;
  oelm_model_options options;  // n_threads / max_context resolved for its sessions
};

struct oelm_session {
  std::shared_ptr<const oelm::Model> model;
  std::optional<oelm::Context> ctx;
  std::vector<int32_t> tokens;  // the sequence in the KV cache (repetition penalty history)
  std::vector<float> logits;    // after tokens.back(); empty when there are none
  std::vector<float> scratch;   // the next logits, swapped in once an eval succeeds
  oelm::SamplingParams sampling;
  std::optional<oelm::Sampler> sampler;
  oelm_abort_callback abort_cb = nullptr;
  void* abort_user = nullptr;

  oelm::InterruptFn interrupt() const {
    if (!abort_cb) return {};
    return [cb = abort_cb, user = abort_user] { return cb(user) != 0; };
  }
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

// struct_size guards the ABI of the structs the caller passes: one from an older
// header is shorter (none exists yet: this is the first version), one from a newer
// header is longer than this library knows. Both, and an uninitialised one, are refused.
template <typename T>
void check_struct_size(const T& s, const char* type, const char* init) {
  if (s.struct_size == sizeof(T)) return;
  throw oelm::InvalidArgument(
      std::string(type) + ".struct_size is " + std::to_string(s.struct_size) + ", expected " +
      std::to_string(sizeof(T)) +
      (s.struct_size > sizeof(T)
           ? "; the program was built against a newer openelm_rt.h than this library, upgrade libopenelm_rt"
           : std::string("; initialise it with ") + init));
}

int32_t to_i32(int64_t v) { return int32_t(v); }  // every count here is < 2^31 by validation

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
    if (options) check_struct_size(*options, "oelm_model_options", "oelm_model_options_default()");
    oelm_model_options o = options ? *options : oelm_model_options_default();
    if (o.n_threads < 0)
      throw oelm::InvalidArgument("n_threads must be >= 1 (or 0 for one per hardware thread), got " +
                                  std::to_string(o.n_threads));
    if (o.max_context < 0)
      throw oelm::InvalidArgument("max_context must be >= 1 (or 0 for the model's training context), got " +
                                  std::to_string(o.max_context));
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
    auto s = std::make_unique<oelm_session>();
    s->model = model->model;
    s->ctx.emplace(s->model, oelm::Backend::create("cpu", model->options.n_threads), model->options.max_context);
    s->sampler.emplace(s->sampling);
    *out_session = s.release();
  });
}

void oelm_session_free(oelm_session* session) { delete session; }

void oelm_session_reset(oelm_session* session) {
  if (!session) return;
  session->ctx->reset();
  session->tokens.clear();
  session->logits.clear();
}

int32_t oelm_session_n_past(const oelm_session* session) { return session ? to_i32(session->ctx->n_past()) : 0; }
int32_t oelm_session_max_context(const oelm_session* session) {
  return session ? to_i32(session->ctx->max_context()) : 0;
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
    const size_t V = size_t(session->model->config().vocab_size);
    // n is checked (>= 1, fits the context) by Context::eval; bound it first so the
    // int64 conversion and the buffer below cannot overflow.
    if (n > size_t(session->ctx->max_context()))
      throw oelm::InvalidArgument("oelm_session_eval: " + std::to_string(n) + " tokens exceed max_context " +
                                  std::to_string(session->ctx->max_context()));
    std::vector<float>& next = session->scratch;
    next.resize(V);
    session->ctx->eval(tokens, int64_t(n), all_logits != nullptr, all_logits ? all_logits : next.data(),
                       session->interrupt());
    if (all_logits) std::memcpy(next.data(), all_logits + (n - 1) * V, V * sizeof(float));
    session->logits.swap(next);
    session->tokens.insert(session->tokens.end(), tokens, tokens + n);
  });
}

const float* oelm_session_logits(const oelm_session* session) {
  return session && !session->logits.empty() ? session->logits.data() : nullptr;
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
    check_struct_size(*params, "oelm_sampling_params", "oelm_sampling_params_default()");
    const oelm_sampling_params& p = *params;
    const oelm::SamplingParams sp{p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.seed};
    oelm::validate(sp);  // names the bad field; the session keeps its sampler on failure
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
    *out_token = session->sampler->sample(session->logits.data(), int64_t(session->logits.size()), session->tokens);
  });
}

// ---- generation -----------------------------------------------------------------------

oelm_generate_result oelm_generate_result_init(void) {
  oelm_generate_result r;
  std::memset(&r, 0, sizeof r);
  r.struct_size = sizeof r;
  return r;
}

oelm_status oelm_session_generate(oelm_session* session, const int32_t* prompt, size_t n_prompt,
                                  int32_t max_new_tokens, oelm_token_callback callback, void* user_data,
                                  oelm_generate_result* result) {
  return guarded([&] {
    require(session != nullptr, "oelm_session_generate: session is NULL");
    require(prompt != nullptr || n_prompt == 0, "oelm_session_generate: prompt is NULL");
    if (result) check_struct_size(*result, "oelm_generate_result", "oelm_generate_result_init()");
    if (n_prompt > size_t(session->ctx->max_context()))
      throw oelm::InvalidArgument("the prompt has " + std::to_string(n_prompt) + " tokens, more than max_context " +
                                  std::to_string(session->ctx->max_context()) +
                                  "; shorten it or load the model with a larger max_context");
    oelm::Context& ctx = *session->ctx;
    oelm::Generator gen(ctx, session->sampling, max_new_tokens);
    const oelm::InterruptFn interrupt = session->interrupt();
    oelm_finish_reason finish = OELM_FINISH_NONE;
    oelm_session_reset(session);
    // Text pieces: the prompt goes through the decoder first (its text discarded), so
    // the first piece keeps the leading space it has after the prompt. Bytes the prompt
    // leaves unfinished stay its own (flushed), as in the Python Session.
    oelm::StreamDecoder decoder(session->model->tokenizer());
    std::string piece;
    try {
      gen.start(std::vector<int32_t>(prompt, prompt + n_prompt), interrupt);
      if (callback) {
        for (size_t i = 0; i < n_prompt; ++i) decoder.push_into(prompt[i], piece);
        decoder.flush_into(piece);
      }
      for (;;) {
        const int32_t tok = gen.next(interrupt);
        if (tok < 0) break;
        if (!callback) continue;
        piece.clear();
        decoder.push_into(tok, piece);
        if (gen.done()) decoder.flush_into(piece);
        if (callback(user_data, tok, piece.data(), piece.size()) != 0) {
          finish = OELM_FINISH_CALLBACK;
          break;
        }
      }
    } catch (...) {  // a failed generation leaves an empty sequence, not a partial one
      oelm_session_reset(session);
      throw;
    }
    // The KV cache holds every token but the last one sampled (never evaluated).
    session->tokens.assign(gen.tokens().begin(), gen.tokens().begin() + ctx.n_past());
    if (finish == OELM_FINISH_NONE) {
      switch (gen.finish_reason()) {
        case oelm::FinishReason::eos: finish = OELM_FINISH_EOS; break;
        case oelm::FinishReason::length: finish = OELM_FINISH_LENGTH; break;
        case oelm::FinishReason::context: finish = OELM_FINISH_CONTEXT; break;
        case oelm::FinishReason::none: finish = OELM_FINISH_NONE; break;
      }
    }
    if (result) {
      oelm_generate_result r = oelm_generate_result_init();
      r.finish_reason = finish;
      r.n_prompt = to_i32(gen.n_prompt());
      r.n_generated = to_i32(gen.n_generated());
      r.prefill_seconds = gen.prefill_seconds();
      r.decode_seconds = gen.decode_seconds();
      *result = r;
    }
  });
}

}  // extern "C"
