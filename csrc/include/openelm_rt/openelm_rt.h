/* openelm_rt: the C API for embedding the OpenELM inference runtime in C, C++ and
 * any language with a C FFI. This header is the whole public surface: a model handle
 * (one .oelm file, loaded once, read-only, shared) and session handles (a paged KV cache
 * holding any number of sequences, a sampler, and a continuous-batching engine); plain C
 * types only, no C++ exceptions cross it. Everything else in libopenelm_rt is private.
 *
 * Three levels of use, from simplest:
 *  1. oelm_session_generate: one generation at a time on the session's own sequence;
 *     a follow-up prompt that extends the previous one (a chat's next turn) evaluates only
 *     its new tokens (prefix reuse). oelm_session_generate_speculative (since 0.3) gives the
 *     same tokens faster where the output copies from the prompt (prompt lookup).
 *  2. Sequences (oelm_seq_new / _fork / _truncate / _free) and oelm_session_eval_batch: many
 *     sequences in one forward pass, logits of any rows; oelm_session_score(_batch) for the
 *     log-probability of continuations (evaluation).
 *  3. The engine (oelm_session_submit / _step / _poll / _cancel): continuous batching of
 *     generation requests, each with its own sampling, stop strings and cancel flag;
 *     submit, cancel and poll may be called from any thread.
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
 *  - An oelm_session may be used by one thread at a time, except oelm_session_submit,
 *    oelm_session_cancel and oelm_session_poll, which any thread may call at any time
 *    (an engine thread started with oelm_session_start steps the session meanwhile; the
 *    other session calls then wait for the step in progress). Sessions of one model run in
 *    parallel safely; each has its own worker threads (oelm_model_options.n_threads), so N
 *    concurrent sessions use N x n_threads threads: size n_threads accordingly.
 *  - oelm_last_error() is per thread.
 *
 * Lifetimes: a session keeps its model's data alive, so oelm_model_free may be called
 * while sessions of that model still exist; the memory goes when the last one is
 * freed. Freeing NULL is a no-op.
 *
 * ABI: the structs begin with `struct_size`; always start from the matching
 * oelm_*_default() / _init() function (which sets it) and then change fields, so
 * that a program built against this header keeps working with a newer library that
 * adds fields (a struct from an older header is accepted: its missing fields take their
 * defaults). While the version is 0.x, a new minor version may change the ABI (the
 * library's soname is libopenelm_rt.so.MAJOR.MINOR). */
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
#define OELM_VERSION_MINOR 4
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
  OELM_FORMAT_ERROR = 3,     /* the file is not a valid .oelm file, or is too new; also from eval
                                and generate when the model computes NaN or infinite logits (its
                                tensor data is corrupt: the message says how to check the file) */
  OELM_OUT_OF_MEMORY = 4,    /* an allocation failed */
  OELM_BUFFER_TOO_SMALL = 5, /* an output buffer is too small; the size needed is returned */
  OELM_INTERRUPTED = 6,      /* the session's abort callback asked to stop */
  OELM_INTERNAL = 7,         /* a bug in openelm_rt; please report it with the message */
  OELM_KV_BUDGET = 8         /* the session's KV cache budget is exhausted (the message says by
                                what, and what to change); the session stays usable */
} oelm_status;

/* The message of the last failed call on this thread ("" if the last call succeeded).
 * Valid until the next openelm_rt call on this thread. Never NULL. */
OELM_API const char* oelm_last_error(void);

/* A short constant name for a status: "OELM_OK", "OELM_FORMAT_ERROR", ... */
OELM_API const char* oelm_status_name(oelm_status status);

/* ---- model --------------------------------------------------------------------- */

typedef struct oelm_model oelm_model;

typedef enum oelm_kv_type {
  OELM_KV_F32 = 0, /* exact (default) */
  OELM_KV_F16 = 1  /* keys and values rounded to binary16: half the KV memory and bandwidth */
} oelm_kv_type;

typedef enum oelm_backend {
  OELM_BACKEND_CPU = 0,  /* the CPU (default) */
  OELM_BACKEND_CUDA = 1, /* the GPU: a library built with the CUDA backend and a usable device;
                            otherwise oelm_session_new fails with OELM_INVALID_ARGUMENT saying why */
  OELM_BACKEND_AUTO = 2  /* CUDA when available, else the CPU */
} oelm_backend;

typedef struct oelm_model_options {
  size_t struct_size;  /* sizeof(oelm_model_options); set by oelm_model_options_default */
  int32_t n_threads;   /* worker threads per session; 0 = one per hardware thread */
  int32_t max_context; /* tokens (prompt + generated) one sequence holds; 0 = the model's
                          training context (2048 for the released OpenELM models) */
  int32_t verify;      /* nonzero: check every tensor's CRC-32 at load (reads the file) */
  /* Since 0.2: */
  int32_t kv_type;       /* oelm_kv_type */
  int64_t kv_budget_mib; /* KV cache memory of a session, all its sequences, in MiB; 0 = room
                            for max_batch sequences of max_context, at most a quarter of the
                            machine's memory. Pages are used as sequences fill them */
  int32_t kv_block_size; /* positions per KV block, a multiple of 16; 0 = the default (16) */
  int32_t max_batch;     /* engine: sequences generating at once; 0 = 16 */
  int32_t prefix_cache;  /* finished sequences kept for prefix reuse; 0 = 16, -1 = none */
  int32_t exact;         /* bf16 weights: 0 (default) or positive = exact f32 activations (f32
                            FMAs); negative = activations rounded to bf16 for the CPU's bf16 dot
                            products where it has them (AVX-512 BF16: about twice the KL, faster
                            only where those run faster than f32 FMAs; docs/WEIGHT_TYPES.md).
                            As openelm_rt.Session's `exact`. Up to 0.3.1, 0 rounded them
                            (CHANGELOG.md, 0.4.0) */
  int64_t memory_budget_mib; /* cap on the memory a session takes for the model (resident
                            weights, KV cache, activations, read buffers), in MiB; 0 = none (all
                            weights resident). Under a cap the KV cache defaults to one sequence
                            of max_context and the FFN matrices that do not fit are read from the
                            file at every step (exact: same logits). oelm_session_new fails with
                            OELM_INVALID_ARGUMENT stating the minimum when the cap is too small */
  /* Since 0.2 with the CUDA backend: */
  int32_t backend;       /* oelm_backend; n_threads is then the host threads around the GPU */
} oelm_model_options;

/* n_threads 0, max_context 0, verify 0, kv_type OELM_KV_F32, the rest 0 (defaults; exact 0: exact). */
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
/* 1 if the file holds a tokenizer, 0 if it holds token ids only (exported with
 * --no-tokenizer: then oelm_tokenize / oelm_detokenize return OELM_INVALID_ARGUMENT
 * saying so, and oelm_session_generate passes pieces of length 0 to its callback). */
OELM_API int oelm_model_has_tokenizer(const oelm_model* model);

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

/* ---- sequences and batched evaluation (since 0.2) --------------------------------- */

/* A sequence of a session: its tokens' keys and values in the session's paged KV cache.
 * Handles are small integers, reused after oelm_seq_free. OELM_SEQ_DEFAULT is the session's
 * own sequence (the one oelm_session_eval, _logits, _sample and _generate use); it cannot be
 * freed. */
typedef int32_t oelm_seq;
#define OELM_SEQ_DEFAULT 0

/* A new, empty sequence. */
OELM_API oelm_status oelm_seq_new(oelm_session* session, oelm_seq* out_seq);

/* A new sequence holding the first n_tokens tokens of `parent` (n_tokens -1: all of them),
 * sharing their KV blocks: no computation, no copy (a shared block is copied only when one
 * of the two sequences writes into it). The parent never changes. */
OELM_API oelm_status oelm_seq_fork(oelm_session* session, oelm_seq parent, int32_t n_tokens, oelm_seq* out_seq);

/* Keeps the first n_tokens tokens (0 <= n_tokens <= length): e.g. to drop rejected draft tokens. */
OELM_API oelm_status oelm_seq_truncate(oelm_session* session, oelm_seq seq, int32_t n_tokens);

/* Frees a sequence and the KV blocks only it held. */
OELM_API oelm_status oelm_seq_free(oelm_session* session, oelm_seq seq);

/* Tokens a sequence holds, or -1 when seq is not a live sequence of the session. */
OELM_API int32_t oelm_seq_length(const oelm_session* session, oelm_seq seq);

typedef enum oelm_logits_mode {
  OELM_LOGITS_NONE = 0, /* no logits for this item */
  OELM_LOGITS_LAST = 1, /* the logits after its last token */
  OELM_LOGITS_ALL = 2   /* the logits after each of its tokens */
} oelm_logits_mode;

typedef struct oelm_batch_item {
  oelm_seq seq;          /* each sequence at most once per call */
  const int32_t* tokens; /* appended to the sequence, at its next positions */
  int32_t n_tokens;      /* >= 1 */
  int32_t logits;        /* oelm_logits_mode */
} oelm_batch_item;

/* Evaluates every item's tokens in batched forward passes (the weights are read once per
 * pass for all of them) and appends them to their sequences. Writes the requested logits to
 * `logits`, vocab_size floats per row: item by item, in position order; *n_rows receives the
 * number of rows. A sequence's logits do not depend on the other items, bit for bit. When
 * logits_capacity (in floats) is too small, returns OELM_BUFFER_TOO_SMALL with the rows
 * needed in *n_rows and evaluates nothing. All or nothing: on any error every sequence is as
 * before the call. Does not change oelm_session_logits(). */
OELM_API oelm_status oelm_session_eval_batch(oelm_session* session, const oelm_batch_item* items, size_t n_items,
                                             float* logits, size_t logits_capacity, size_t* n_rows);

/* ---- scoring (since 0.2) ----------------------------------------------------------- */

/* log p(continuation[i] | context, continuation[0..i)) for every i (log-softmax accumulated
 * in double), and whether every continuation token is the argmax (greedy). n_context >= 1
 * (start with BOS), n_continuation >= 1, n_context + n_continuation - 1 <= max_context.
 * Evaluation harnesses call this with thousands of pairs: see oelm_session_score_batch. */
OELM_API oelm_status oelm_session_score(oelm_session* session, const int32_t* context, size_t n_context,
                                        const int32_t* continuation, size_t n_continuation, double* logprobs,
                                        int32_t* is_greedy);

typedef struct oelm_score_pair {
  const int32_t* context;
  size_t n_context;
  const int32_t* continuation;
  size_t n_continuation;
  double* logprobs;  /* out: n_continuation values */
  int32_t is_greedy; /* out */
} oelm_score_pair;

/* oelm_session_score for every pair; pairs that share a prefix (few-shot examples, the
 * context of several choices) compute it once. Uses sequences of its own; the session's
 * sequences are untouched. */
OELM_API oelm_status oelm_session_score_batch(oelm_session* session, oelm_score_pair* pairs, size_t n_pairs);

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
  OELM_FINISH_CALLBACK = 4, /* the token callback returned nonzero */
  OELM_FINISH_STOP = 5,     /* engine: a stop string ended the text (it is cut before it) */
  OELM_FINISH_CANCELLED = 6,/* engine: oelm_session_cancel */
  OELM_FINISH_ERROR = 7     /* engine: the request failed; the event's error says why (the KV
                               budget, or non-finite logits from a corrupt file) */
} oelm_finish_reason;

typedef struct oelm_generate_result {
  size_t struct_size; /* sizeof(oelm_generate_result); set by oelm_generate_result_init */
  oelm_finish_reason finish_reason;
  int32_t n_prompt;       /* prompt tokens */
  int32_t n_generated;    /* tokens generated (EOS included), as passed to the callback */
  double prefill_seconds; /* evaluating the prompt */
  double decode_seconds;  /* evaluating generated tokens and sampling */
  /* Since 0.2: */
  int32_t n_cached;       /* prompt tokens whose keys and values were reused, not evaluated */
  /* Since 0.3 (oelm_session_generate_speculative; 0 from oelm_session_generate): */
  int32_t n_proposed;     /* tokens proposed (prompt lookup) and checked by the model */
  int32_t n_accepted;     /* of those, kept (generated without a step of their own) */
  int32_t n_verify_steps; /* steps that checked proposals */
} oelm_generate_result;

/* An empty result with struct_size set: oelm_generate_result r = oelm_generate_result_init(); */
OELM_API oelm_generate_result oelm_generate_result_init(void);

/* Generates a continuation of prompt[0..n_prompt) (the whole sequence, not appended to
 * the session's; use oelm_tokenize with add_bos for text) with the session's sampling
 * parameters and a sampler seeded afresh from their seed, so a repeated call gives
 * the same tokens (as openelm_rt.Session.generate does with the same parameters).
 * Stops at EOS, after max_new_tokens, when the context is full, or when the callback
 * says so. callback and result may be NULL. 1 <= n_prompt < max_context.
 * Prefix reuse: the keys and values of earlier generations' sequences are kept (the
 * session's prefix cache), and only the tokens after the longest prefix the prompt shares
 * with one of them are evaluated (result->n_cached), so a chat's next turn costs its new
 * tokens only; the output is the same as without reuse.
 * A model without a tokenizer (oelm_model_has_tokenizer) passes piece NULL, len 0.
 * Afterwards the session's sequence holds the prompt and the generated tokens except the
 * last (which was sampled but not evaluated); oelm_session_logits() is NULL. On failure
 * (OELM_INTERRUPTED included) the session's sequence is left empty. */
OELM_API oelm_status oelm_session_generate(oelm_session* session, const int32_t* prompt,
                                           size_t n_prompt, int32_t max_new_tokens,
                                           oelm_token_callback callback, void* user_data,
                                           oelm_generate_result* result);

/* ---- speculative generation (since 0.3) --------------------------------------------- */

typedef enum oelm_speculation_mode {
  /* Checks as many proposed tokens per step as pay on this machine, from the measured time
   * of a k-token step (measured at the session's first speculative call: 12 steps of
   * 1 to 17 tokens, not counted as decode time) and the running acceptance rate;
   * none when speculation would be slower. */
  OELM_SPECULATION_ADAPTIVE = 0,
  /* Hugging Face's schedule: every match proposes prompt_lookup_num_tokens tokens. */
  OELM_SPECULATION_HF = 1
} oelm_speculation_mode;

typedef struct oelm_speculation_params {
  size_t struct_size;               /* sizeof(oelm_speculation_params); set by the default function */
  int32_t prompt_lookup_num_tokens; /* >= 1: the most tokens one step proposes (default 10, as the
                                       OpenELM model card's prompt_lookup_num_tokens=10) */
  int32_t max_matching_ngram_size;  /* >= 1: the longest suffix looked up (default 2, as HF) */
  int32_t mode;                     /* oelm_speculation_mode; default OELM_SPECULATION_ADAPTIVE */
} oelm_speculation_params;

/* prompt_lookup_num_tokens 10, max_matching_ngram_size 2, OELM_SPECULATION_ADAPTIVE. */
OELM_API oelm_speculation_params oelm_speculation_params_default(void);

/* oelm_session_generate with prompt lookup (Hugging Face's prompt_lookup_num_tokens): the
 * left-most earlier occurrence of the sequence's last n tokens (prompt and generated; n from
 * max_matching_ngram_size down to 1, the first n that matches wins) proposes the tokens that
 * followed it (cut before an EOS); one step of the model checks them all, and they are kept
 * while they equal what the session's sampler draws from each position's logits. The output
 * is oelm_session_generate's, token for token, greedy or seeded (one draw per generated
 * token); text that copies from the prompt comes several tokens per step. Same arguments,
 * callback and result as oelm_session_generate (result->n_proposed, n_accepted and
 * n_verify_steps say what speculation did; params NULL: the defaults). It runs on the
 * session's own sequence, reusing what it shares with the prompt (result->n_cached), not
 * through the engine: OELM_INVALID_ARGUMENT while an engine thread runs (oelm_session_start).
 * Afterwards the session's sequence holds the prompt and the generated tokens except the
 * last; on failure it is left empty. */
OELM_API oelm_status oelm_session_generate_speculative(oelm_session* session, const int32_t* prompt,
                                                       size_t n_prompt, int32_t max_new_tokens,
                                                       const oelm_speculation_params* params,
                                                       oelm_token_callback callback, void* user_data,
                                                       oelm_generate_result* result);

/* "none", "eos", "length", "context", "callback", "stop", "cancelled" or "error". */
OELM_API const char* oelm_finish_reason_name(oelm_finish_reason reason);

/* ---- the engine: continuous batching (since 0.2) ---------------------------------- */

/* A generation request's handle, unique within its session. */
typedef uint64_t oelm_request;

typedef struct oelm_request_params {
  size_t struct_size;            /* sizeof(oelm_request_params); set by oelm_request_params_default */
  oelm_sampling_params sampling; /* from oelm_sampling_params_default() */
  int32_t max_new_tokens;        /* >= 0 */
  const char* const* stop;       /* n_stop non-empty NUL-terminated UTF-8 stop strings, or NULL */
  size_t n_stop;
  int32_t logprobs;              /* < 0: none; k >= 0: each event's token log-probability and
                                    the k likeliest tokens (oelm_event.top) */
  int32_t reuse_prefix;          /* nonzero (default): start from the longest cached prefix */
} oelm_request_params;

/* Greedy sampling, max_new_tokens 128, no stop strings, no logprobs, reuse_prefix 1. */
OELM_API oelm_request_params oelm_request_params_default(void);

/* Queues a generation request (prompt: token ids, BOS first for text). The strings and the
 * prompt are copied. Bad parameters are OELM_INVALID_ARGUMENT naming the field. Any thread. */
OELM_API oelm_status oelm_session_submit(oelm_session* session, const int32_t* prompt, size_t n_prompt,
                                         const oelm_request_params* params, oelm_request* out_request);

/* Ends a queued or running request: its last event has OELM_FINISH_CANCELLED, and its KV
 * blocks are freed before the next step (a step in progress is abandoned and redone without
 * it). Unknown or finished requests are ignored. Any thread. */
OELM_API oelm_status oelm_session_cancel(oelm_session* session, oelm_request request);

/* Runs one engine step: admits queued requests (up to max_batch running), evaluates one
 * decode token of every generating request and chunks of prompts within the step's token
 * budget in one forward pass, samples, and queues events. *busy (may be NULL) is 0 when
 * there was nothing to do. The abort callback is polled between layers. Not while an engine
 * thread runs (oelm_session_start). */
OELM_API oelm_status oelm_session_step(oelm_session* session, int32_t* busy);

/* Steps the session on a thread of its own until oelm_session_stop or oelm_session_free;
 * requests are then only submitted, cancelled and polled. */
OELM_API oelm_status oelm_session_start(oelm_session* session);
OELM_API void oelm_session_stop(oelm_session* session);

typedef struct oelm_token_logprob {
  int32_t token;
  float logprob;
} oelm_token_logprob;

typedef struct oelm_event {
  oelm_request request;
  int32_t token;             /* the new token, or -1 (a final event without a new token) */
  const char* text;          /* UTF-8 text the event adds, text_len bytes (not NUL-terminated):
                                the pieces of a request join to its whole text, never split a
                                character, and hold back text a stop string may still begin */
  size_t text_len;
  float logprob;             /* of token, when the request asked for logprobs */
  const oelm_token_logprob* top; /* n_top likeliest tokens, when it asked for them */
  size_t n_top;
  oelm_finish_reason finish; /* OELM_FINISH_NONE until the request's last event */
  const char* error;         /* OELM_FINISH_ERROR: what went wrong (NUL-terminated), else "" */
  int32_t n_prompt, n_cached, n_generated; /* on the last event */
  double prefill_seconds, decode_seconds;  /* on the last event */
} oelm_event;

/* Moves up to `capacity` pending events, oldest first, into events and their count to
 * *n_events; waits up to timeout_seconds for one when there is none (0: do not wait). The
 * pointers inside the events stay valid until the next oelm_session_poll on this session:
 * poll from one thread at a time. Any thread. */
OELM_API oelm_status oelm_session_poll(oelm_session* session, oelm_event* events, size_t capacity,
                                       size_t* n_events, double timeout_seconds);

#ifdef __cplusplus
}
#endif

#endif /* OPENELM_RT_H */
