/* The C API used from C (compiled as C99 with warnings as errors): proves the header
 * is valid C and gives test_c_api.cpp a C caller to compare with. */
#include <openelm_rt/openelm_rt.h>
#include <stdio.h>

struct sink {
  int32_t* out;
  int n;
};

static int on_token(void* user, int32_t token, const char* piece, size_t len) {
  struct sink* s = (struct sink*)user;
  (void)piece;
  (void)len;
  s->out[s->n++] = token;
  return 0;
}

/* Greedy tokens after `prompt` (at most max_new); returns their count, or -1 with the
 * error printed. */
int c_greedy_tokens(const char* path, const int32_t* prompt, size_t n_prompt, int32_t* out, int max_new) {
  oelm_model_options opts = oelm_model_options_default();
  oelm_model* model = NULL;
  oelm_session* session = NULL;
  struct sink sink;
  oelm_generate_result result = oelm_generate_result_init();
  int n = -1;
  sink.out = out;
  sink.n = 0;
  opts.n_threads = 1;
  if (oelm_model_load(path, &opts, &model) != OELM_OK || oelm_session_new(model, &session) != OELM_OK ||
      oelm_session_generate(session, prompt, n_prompt, max_new, on_token, &sink, &result) != OELM_OK) {
    fprintf(stderr, "c_greedy_tokens: %s\n", oelm_last_error());
  } else if (result.n_generated == sink.n) {
    n = sink.n;
  }
  oelm_session_free(session);
  oelm_model_free(model);
  return n;
}
