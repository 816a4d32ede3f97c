// Minimal C++ embedding of openelm_rt: the C API behind RAII handles and a lambda
// callback; streams a sampled generation to stdout.
//   simple_cpp MODEL.oelm [PROMPT] [MAX_NEW_TOKENS]
#include <openelm_rt/openelm_rt.h>

#include <cstdio>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

void check(oelm_status s) {
  if (s != OELM_OK) throw std::runtime_error(std::string(oelm_status_name(s)) + ": " + oelm_last_error());
}

struct Model {
  std::unique_ptr<oelm_model, decltype(&oelm_model_free)> h{nullptr, oelm_model_free};
  explicit Model(const std::string& path) {
    oelm_model* m;
    check(oelm_model_load(path.c_str(), nullptr, &m));
    h.reset(m);
  }
  std::vector<int32_t> tokenize(const std::string& text) const {
    size_t n = 0;  // ask for the size, then fill
    const oelm_status s = oelm_tokenize(h.get(), text.data(), text.size(), 1, nullptr, 0, &n);
    if (s != OELM_BUFFER_TOO_SMALL) check(s);
    std::vector<int32_t> ids(n);
    check(oelm_tokenize(h.get(), text.data(), text.size(), 1, ids.data(), ids.size(), &n));
    return ids;
  }
};

}  // namespace

int main(int argc, char** argv) try {
  if (argc < 2) {
    std::cerr << "usage: " << argv[0] << " MODEL.oelm [PROMPT] [MAX_NEW_TOKENS]\n";
    return 2;
  }
  const std::string prompt = argc > 2 ? argv[2] : "Once upon a time";
  const int max_new = argc > 3 ? std::stoi(argv[3]) : 64;

  Model model(argv[1]);
  oelm_session* raw;
  check(oelm_session_new(model.h.get(), &raw));
  std::unique_ptr<oelm_session, decltype(&oelm_session_free)> session(raw, oelm_session_free);

  oelm_sampling_params sp = oelm_sampling_params_default();
  sp.temperature = 0.7f;
  sp.top_p = 0.9f;
  sp.seed = 42;
  check(oelm_session_set_sampling(session.get(), &sp));

  const std::vector<int32_t> ids = model.tokenize(prompt);
  auto on_token = [](void*, int32_t, const char* piece, size_t len) -> int {
    std::fwrite(piece, 1, len, stdout);
    std::fflush(stdout);
    return 0;
  };
  oelm_generate_result r = oelm_generate_result_init();
  std::cout << prompt << std::flush;
  check(oelm_session_generate(session.get(), ids.data(), ids.size(), max_new, on_token, nullptr, &r));
  std::cerr << "\n[" << r.n_generated << " tokens, finished: " << oelm_finish_reason_name(r.finish_reason) << "]\n";
  return 0;
} catch (const std::exception& e) {
  std::cerr << "error: " << e.what() << "\n";
  return 1;
}
