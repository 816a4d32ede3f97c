/* Minimal C embedding of openelm_rt: load a model, stream a greedy generation to stdout.
 *   simple_c MODEL.oelm [PROMPT] [MAX_NEW_TOKENS]                                    */
#include <openelm_rt/openelm_rt.h>
#include <stdio.h>
#include <stdlib.h>

static int print_piece(void* user, int32_t token, const char* piece, size_t len) {
  (void)user;
  (void)token;
  fwrite(piece, 1, len, stdout);
  fflush(stdout);
  return 0; /* nonzero would stop the generation here */
}

int main(int argc, char** argv) {
  const char* prompt = argc > 2 ? argv[2] : "Once upon a time";
  const int max_new = argc > 3 ? atoi(argv[3]) : 64;
  oelm_model* model = NULL;
  oelm_session* session = NULL;
  int32_t ids[1024];
  size_t n_ids = 0;
  oelm_generate_result result = oelm_generate_result_init();
  int rc = 1;

  if (argc < 2) {
    fprintf(stderr, "usage: %s MODEL.oelm [PROMPT] [MAX_NEW_TOKENS]\n", argv[0]);
    return 2;
  }
  if (oelm_model_load(argv[1], NULL, &model) != OELM_OK ||
      oelm_session_new(model, &session) != OELM_OK ||
      oelm_tokenize(model, prompt, (size_t)-1, 1, ids, 1024, &n_ids) != OELM_OK) {
    fprintf(stderr, "error: %s\n", oelm_last_error());
    goto done;
  }
  fputs(prompt, stdout);
  if (oelm_session_generate(session, ids, n_ids, max_new, print_piece, NULL, &result) != OELM_OK) {
    fprintf(stderr, "\nerror: %s\n", oelm_last_error());
    goto done;
  }
  fprintf(stderr, "\n[%d tokens, finished: %s]\n", result.n_generated,
          oelm_finish_reason_name(result.finish_reason));
  rc = 0;
done:
  oelm_session_free(session);
  oelm_model_free(model);
  return rc;
}
