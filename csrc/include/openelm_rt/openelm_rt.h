/* openelm_rt: the C API for embedding the OpenELM inference runtime in C, C++ and
 * any language with a C FFI. This header is the whole public surface: a model handle
 * (one .oelm file, loaded once, read-only, shared) and session handles (one sequence
 * each: KV cache, sampler state); plain C types only, no C++ exceptions cross it.
 * Everything else in libopenelm_rt is private and hidden.
 *
 * Typical use:
 *
 *     oelm_model* model;
 *     if (oelm_model_load("model.oelm", NULL, &model) != OELM_OK) {
 *         fprintf(stderr, "%s\n", oelm_last_error());
 *         return 1;
 *     }
 *     oelm_session* s;
 *     oelm_session_new(model, &s);
 *     int32_t ids[256]; size_t n;
 *     oelm_tokenize(model, "Once upon a time", (size_t)-1, 1, ids, 256, &n);
 *     oelm_session_generate(s, ids, n, 64, print_piece, NULL, NULL);
 *     oelm_session_free(s);
 *     oelm_model_free(model);
 *
 * Errors: every function that can fail returns an oelm_status. OELM_OK is 0; on any
 * other value, oelm_last_error() gives a message for this thread saying what went
 * wrong, with the values involved, and what to do. Output parameters are written
 * only on success unless documented otherwise.
 *
 * Thread safety:
 *  - An oelm_model is immutable after oelm_model_load: any number of threads may use
 *    it at the same time (tokenize, detokenize, create sessions, read its properties).
 *  - An oelm_session may be used by one thread at a time. Use one session per thread
 *    (or serialise access yourself). Sessions of one model run in parallel safely;
 *    each has its own worker threads (oelm_model_options.n_threads), so N concurrent
 *    sessions use N x n_threads threads: size n_threads accordingly.
 *  - oelm_last_error() is per thread.
 *
 * Lifetimes: a session keeps its model's data alive, so oelm_model_free may be called
 * while sessions of that model still exist; the memory goes when the last one is
 * freed. Freeing NULL is a no-op.
 *
 * ABI: the structs begin with `struct_size`; always start from the matching
 * oelm_*_default() / _init() function (which sets it) and then change fields, so
 * that a program built against this header keeps working with a newer library that
 * adds fields. While the version is 0.x, a new minor version may change the ABI
 * (the library's soname is libopenelm_rt.so.MAJOR.MINOR). */
#ifndef OPENELM_RT_H
#define OPENELM_RT_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#  if defined(OPENELM_RT_BUILDING)
#    define OELM_API __declspec(dllexport)
#  else
#    define OELM_API __declspec(dllimport)
#  endif
#elif defined(__GNUC__)
#  define OELM_API __attribute__((visibility("default")))
#else
#  define OELM_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---- versions ------------------------------------------------------------------ */

#define OELM_VERSION_MAJOR 0
#define OELM_VERSION_MINOR 1
#define OELM_VERSION_PATCH 0

/* The library's version, "MAJOR.MINOR.PATCH" (that of the library actually loaded,
 * which may differ from the OELM_VERSION_* macros a program was compiled with). */
OELM_API const char* oelm_version(void);

/* The newest .oelm format_version and names_version this library reads (see
 * docs/FORMAT.md). Files with a higher version are refused with OELM_FORMAT_ERROR. */
OELM_API uint32_t oelm_format_version(void);
OELM_API uint32_t oelm_names_version(void);

/* ---- errors -------------------------------------------------------------------- */

typedef enum oelm_status {
  OELM_OK = 0,
  OELM_INVALID_ARGUMENT = 1, /* an argument is NULL, out of range or inconsistent */
  OELM_FILE_NOT_FOUND = 2,   /* the model file does not exist or cannot be opened */
  OELM_FORMAT_ERROR = 3,     /* the file is not a valid .oelm file, or is too new */
  OELM_OUT_OF_MEMORY = 4,    /* an allocation failed */
  OELM_BUFFER_TOO_SMALL = 5, /* an output buffer is too small; the size needed is returned */
  OELM_INTERRUPTED = 6,      /* the session's abort callback asked to stop */
  OELM_INTERNAL = 7          /* a bug in openelm_rt; please report it with the message */
} oelm_status;

/* The message of the last failed call on this thread ("" if the last call succeeded).
 * Valid until the next openelm_rt call on this thread. Never NULL. */
OELM_API const char* oelm_last_error(void);

/* A short constant name for a status: "OELM_OK", "OELM_FORMAT_ERROR", ... */
OELM_API const char* oelm_status_name(oelm_status status);

/* ---- model --------------------------------------------------------------------- */

typedef struct oelm_model oelm_model;

typedef struct oelm_model_options {
  size_t struct_size;  /* sizeof(oelm_model_options); set by oelm_model_options_default */
  int32_t n_threads;   /* worker threads per session; 0 = one per hardware thread */
  int32_t max_context; /* tokens (prompt + generated) a session holds; 0 = the model's
                          training context (2048 for the released OpenELM models) */
  int32_t verify;      /* nonzero: check every tensor's CRC-32 at load (reads the file) */
} oelm_model_options;

/* n_threads 0, max_context 0, verify 0. */
OELM_API oelm_model_options oelm_model_options_default(void);

/* Maps and validates an .oelm file (written by openelm-rt-export). options may be NULL
 * for the defaults; they become the defaults of this model's sessions.
 * Returns OELM_FILE_NOT_FOUND, OELM_FORMAT_ERROR (with what is wrong), or
 * OELM_INVALID_ARGUMENT. The weights are mapped, not copied. */
OELM_API oelm_status oelm_model_load(const char* path, const oelm_model_options* options,
                                     oelm_model** out_model);

OELM_API void oelm_model_free(oelm_model* model);

OELM_API int32_t oelm_model_vocab_size(const oelm_model* model);
OELM_API int32_t oelm_model_bos_token(const oelm_model* model);
OELM_API int32_t oelm_model_eos_token(const oelm_model* model);
/* The context length the checkpoint was trained with. */
OELM_API int32_t oelm_model_train_context(const oelm_model* model);

/* ---- text ---------------------------------------------------------------------- */

/* Token ids of UTF-8 `text` (text_len bytes, or (size_t)-1 for a NUL-terminated
 * string), with the BOS token first when add_bos is nonzero (as OpenELM was trained).
 * Writes at most `capacity` ids to `tokens` and the count to *n_tokens. When capacity
 * is too small, returns OELM_BUFFER_TOO_SMALL with the count needed in *n_tokens
 * (so capacity 0 and tokens NULL asks for the size). */
OELM_API oelm_status oelm_tokenize(const oelm_model* model, const char* text, size_t text_len,
                                   int add_bos, int32_t* tokens, size_t capacity,
                                   size_t* n_tokens);

/* UTF-8 text of n ids; BOS, EOS and other control tokens produce no text. Writes the
 * text and a terminating NUL to `text` and its length (without the NUL) to *text_len.
 * When capacity < length + 1, returns OELM_BUFFER_TOO_SMALL with the length in
 * *text_len. Ids outside [0, vocab_size) are OELM_INVALID_ARGUMENT. */
OELM_API oelm_status oelm_detokenize(const oelm_model* model, const int32_t* tokens, size_t n,
                                     char* text, size_t capacity, size_t* text_len);

/* ---- sessions ------------------------------------------------------------------ */

typedef struct oelm_session oelm_session;

/* Creates a session (an empty sequence) on `model` with the model's options
 * (n_threads, max_context). Allocates the KV cache for max_context tokens. */
OELM_API oelm_status oelm_session_new(const oelm_model* model, oelm_session** out_session);

OELM_API void oelm_session_free(oelm_session* session);

/* Empties the sequence (the KV cache and the logits); the sampler is kept. */
OELM_API void oelm_session_reset(oelm_session* session);

/* Tokens held: evaluated so far since the last reset. */
OELM_API int32_t oelm_session_n_past(const oelm_session* session);
OELM_API int32_t oelm_session_max_context(const oelm_session* session);

/* Called between layers during evaluation and generation; a nonzero return aborts
 * the call with OELM_INTERRUPTED and leaves the session as before that evaluation.
 * May be used to cancel from another thread (the callback reads a flag). NULL
 * removes it. */
typedef int (*oelm_abort_callback)(void* user_data);
OELM_API void oelm_session_set_abort_callback(oelm_session* session, oelm_abort_callback callback,
                                              void* user_data);

/* Evaluates tokens[0..n) at the next n positions and appends them to the sequence.
 * Afterwards oelm_session_logits() gives the logits after the last one. When
 * all_logits is not NULL it receives the logits of every position, n * vocab_size
 * floats, row i after token i. n must be >= 1 and fit: n_past + n <= max_context. */
OELM_API oelm_status oelm_session_eval(oelm_session* session, const int32_t* tokens, size_t n,
                                       float* all_logits);

/* The logits (vocab_size floats) after the last evaluated token, or NULL when the
 * sequence is empty or after oelm_session_generate. Valid until the next call that
 * changes the session. */
OELM_API const float* oelm_session_logits(const oelm_session* session);

/* ---- sampling ------------------------------------------------------------------ */

/* Hugging Face `generate` semantics, in its order: repetition penalty (on every
 * distinct token of the sequence: s/p if s > 0 else s*p), temperature, top-k, top-p,
 * min-p, then a draw seeded by `seed`. temperature 0 is greedy (argmax; lowest id on
 * ties) and ignores top_k/top_p/min_p/seed. */
typedef struct oelm_sampling_params {
  size_t struct_size;       /* sizeof(oelm_sampling_params); set by the default function */
  float temperature;        /* >= 0; 0 = greedy */
  int32_t top_k;            /* >= 0; 0 = off */
  float top_p;              /* in (0, 1]; 1 = off */
  float min_p;              /* in [0, 1]; 0 = off */
  float repetition_penalty; /* > 0; 1 = off */
  uint64_t seed;            /* the same seed and inputs give the same tokens */
} oelm_sampling_params;

/* Greedy: temperature 0, top_k 0, top_p 1, min_p 0, repetition_penalty 1, seed 0. */
OELM_API oelm_sampling_params oelm_sampling_params_default(void);

/* Sets the session's sampler (and reseeds it); used by oelm_session_sample and
 * oelm_session_generate. A new session is greedy. Out-of-range values are
 * OELM_INVALID_ARGUMENT naming the field and the value. */
OELM_API oelm_status oelm_session_set_sampling(oelm_session* session,
                                               const oelm_sampling_params* params);

/* Draws the next token from oelm_session_logits() with the session's sampler; the
 * repetition penalty sees every token of the sequence. Does not evaluate the token:
 * pass it to oelm_session_eval to continue. */
OELM_API oelm_status oelm_session_sample(oelm_session* session, int32_t* out_token);

/* ---- generation ---------------------------------------------------------------- */

/* Called once per generated token, in order, with the token id and the text it adds
 * (UTF-8, `len` bytes, not NUL-terminated). The pieces are the text the generated
 * tokens add after the prompt's (the same text as openelm_rt.Session.generate): when
 * the prompt ends with a complete character (text from oelm_tokenize always does),
 * oelm_detokenize(prompt + generated) is oelm_detokenize(prompt) followed by the
 * pieces, so a continuation keeps its leading space. A piece never ends inside a
 * multi-byte character: it is empty for EOS and while such a character is incomplete;
 * one still incomplete at the end comes out as U+FFFD in the last piece (not when the
 * callback stopped the generation). Return 0 to continue, nonzero to stop: generation
 * then ends with OELM_FINISH_CALLBACK after this token. */
typedef int (*oelm_token_callback)(void* user_data, int32_t token, const char* piece, size_t len);

typedef enum oelm_finish_reason {
  OELM_FINISH_NONE = 0,     /* not finished (generation failed) */
  OELM_FINISH_EOS = 1,      /* the model produced EOS (it is passed to the callback) */
  OELM_FINISH_LENGTH = 2,   /* max_new_tokens were generated */
  OELM_FINISH_CONTEXT = 3,  /* the sequence filled max_context */
  OELM_FINISH_CALLBACK = 4  /* the token callback returned nonzero */
} oelm_finish_reason;

typedef struct oelm_generate_result {
  size_t struct_size; /* sizeof(oelm_generate_result); set by oelm_generate_result_init */
  oelm_finish_reason finish_reason;
  int32_t n_prompt;       /* prompt tokens */
  int32_t n_generated;    /* tokens generated (EOS included), as passed to the callback */
  double prefill_seconds; /* evaluating the prompt */
  double decode_seconds;  /* evaluating generated tokens and sampling */
} oelm_generate_result;

/* An empty result with struct_size set: oelm_generate_result r = oelm_generate_result_init(); */
OELM_API oelm_generate_result oelm_generate_result_init(void);

/* Generates a continuation of prompt[0..n_prompt) (the whole sequence: the session is
 * reset first; use oelm_tokenize with add_bos for text) with the session's sampling
 * parameters and a sampler seeded afresh from their seed, so a repeated call gives
 * the same tokens (as openelm_rt.Session.generate does with the same parameters).
 * Stops at EOS, after max_new_tokens, when the context is full, or when the callback
 * says so. callback and result may be NULL. 1 <= n_prompt < max_context.
 * Afterwards the session holds the prompt and the generated tokens except the last
 * (which was sampled but not evaluated); oelm_session_logits() is NULL. On failure
 * (OELM_INTERRUPTED included) the session is left empty. */
OELM_API oelm_status oelm_session_generate(oelm_session* session, const int32_t* prompt,
                                           size_t n_prompt, int32_t max_new_tokens,
                                           oelm_token_callback callback, void* user_data,
                                           oelm_generate_result* result);

/* "none", "eos", "length", "context" or "callback". */
OELM_API const char* oelm_finish_reason_name(oelm_finish_reason reason);

#ifdef __cplusplus
}
#endif

#endif /* OPENELM_RT_H */
