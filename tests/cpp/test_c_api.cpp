// Tests of the public C API (only <openelm_rt/openelm_rt.h>, linked against the
// shared library as an embedder would). Fixtures come from tests/cpp/make_fixtures.py:
// a tiny model made by the Python exporter and what the Python path computes on it.
// Run: tests/cpp/run.sh, or OELM_TEST_DATA=DIR ./test_c_api [test names].
#include <openelm_rt/openelm_rt.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstddef>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <mutex>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "check.h"

extern "C" int c_greedy_tokens(const char* path, const int32_t* prompt, size_t n_prompt, int32_t* out,
                               int max_new);  // c_usage.c

namespace {

#define CHECK_STATUS(call, expected)                                                                       \
  do {                                                                                                     \
    const oelm_status st_ = (call);                                                                        \
    if (st_ != (expected))                                                                                 \
      throw check::Failure(std::string(__FILE__) + ":" + std::to_string(__LINE__) + ": " #call " returned " + \
                           oelm_status_name(st_) + ", expected " + oelm_status_name(expected) +             \
                           " (last error: \"" + oelm_last_error() + "\")");                                 \
  } while (0)
#define CHECK_OK(call) CHECK_STATUS(call, OELM_OK)

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

std::string data_dir() {
  const char* d = std::getenv("OELM_TEST_DATA");
  if (!d || !*d)
    throw check::Failure("OELM_TEST_DATA is not set: run tests/cpp/run.sh, or make the fixtures with "
                         "`python3 tests/cpp/make_fixtures.py DIR` and set OELM_TEST_DATA=DIR");
  return d;
}

std::string model_path() { return data_dir() + "/model.oelm"; }

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw check::Failure("cannot read fixture " + path + "; re-run tests/cpp/make_fixtures.py");
  return std::string(std::istreambuf_iterator<char>(f), {});
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), std::streamsize(bytes.size()));
  if (!f) throw check::Failure("cannot write " + path);
}

// Little-endian reader of the fixture files (the layouts are in make_fixtures.py).
struct Reader {
  std::string buf;
  size_t pos = 0;
  explicit Reader(const std::string& path) : buf(read_file(path)) {}
  template <typename T>
  T get() {
    if (pos + sizeof(T) > buf.size()) throw check::Failure("fixture file is truncated; re-make the fixtures");
    T v;
    std::memcpy(&v, buf.data() + pos, sizeof v);
    pos += sizeof v;
    return v;
  }
  std::vector<int32_t> ids() {
    std::vector<int32_t> v(get<uint32_t>());
    for (auto& x : v) x = get<int32_t>();
    return v;
  }
  std::string str() {
    const uint32_t n = get<uint32_t>();
    if (pos + n > buf.size()) throw check::Failure("fixture file is truncated; re-make the fixtures");
    std::string s = buf.substr(pos, n);
    pos += n;
    return s;
  }
};

// RAII owners for the handles.
struct ModelDeleter {
  void operator()(oelm_model* m) const { oelm_model_free(m); }
};
struct SessionDeleter {
  void operator()(oelm_session* s) const { oelm_session_free(s); }
};
using ModelPtr = std::unique_ptr<oelm_model, ModelDeleter>;
using SessionPtr = std::unique_ptr<oelm_session, SessionDeleter>;

ModelPtr load(int32_t n_threads = 1, int32_t max_context = 0) {
  oelm_model_options o = oelm_model_options_default();
  o.n_threads = n_threads;
  o.max_context = max_context;
  oelm_model* m = nullptr;
  CHECK_OK(oelm_model_load(model_path().c_str(), &o, &m));
  return ModelPtr(m);
}

SessionPtr new_session(const oelm_model* m) {
  oelm_session* s = nullptr;
  CHECK_OK(oelm_session_new(m, &s));
  return SessionPtr(s);
}

struct GenCase {
  oelm_sampling_params params = oelm_sampling_params_default();
  int32_t max_new = 0;
  std::vector<int32_t> prompt, tokens;  // tokens: what the Python path generated
};

std::vector<GenCase> generate_cases() {
  Reader r(data_dir() + "/generate.bin");
  std::vector<GenCase> cases(r.get<uint32_t>());
  for (GenCase& c : cases) {
    c.params.temperature = r.get<float>();
    c.params.top_k = r.get<int32_t>();
    c.params.top_p = r.get<float>();
    c.params.min_p = r.get<float>();
    c.params.repetition_penalty = r.get<float>();
    c.params.seed = r.get<uint64_t>();
    c.max_new = r.get<int32_t>();
    c.prompt = r.ids();
    c.tokens = r.ids();
  }
  return cases;
}

// Collects the tokens (and text pieces) a generation passes to its callback, and
// stops after `stop_after` tokens when that is > 0.
struct Collector {
  std::vector<int32_t> tokens;
  std::string text;
  size_t stop_after = 0;
  static int callback(void* user, int32_t token, const char* piece, size_t len) {
    auto* c = static_cast<Collector*>(user);
    c->tokens.push_back(token);
    c->text.append(piece, len);
    return c->stop_after && c->tokens.size() >= c->stop_after;
  }
};

std::vector<int32_t> generate(oelm_session* s, const GenCase& c, oelm_generate_result* result = nullptr) {
  Collector col;
  CHECK_OK(oelm_session_set_sampling(s, &c.params));
  CHECK_OK(oelm_session_generate(s, c.prompt.data(), c.prompt.size(), c.max_new, &Collector::callback, &col, result));
  return col.tokens;
}

// ---- versions -------------------------------------------------------------------------

TEST(versions) {
  CHECK_EQ(std::string(oelm_version()), std::string(OELM_EXPECTED_VERSION));  // CMake's project version
  CHECK_EQ(std::string(oelm_version()), std::to_string(OELM_VERSION_MAJOR) + "." +
                                            std::to_string(OELM_VERSION_MINOR) + "." +
                                            std::to_string(OELM_VERSION_PATCH));
  // The exporter writes format_version 1 (2 only for the flash layout, which the library also
  // reads) and the newest names_version.
  const std::string file = read_file(model_path());
  uint32_t fmt, names;
  std::memcpy(&fmt, file.data() + 8, 4);
  std::memcpy(&names, file.data() + 12, 4);
  CHECK_EQ(fmt, 1u);
  CHECK_EQ(oelm_format_version(), 2u);
  CHECK_EQ(oelm_names_version(), names);
}

// ---- loading ----------------------------------------------------------------------------

oelm_status try_load(const std::string& path, oelm_model** m) {
  *m = reinterpret_cast<oelm_model*>(uintptr_t(0x1));  // must stay untouched on failure
  return oelm_model_load(path.c_str(), nullptr, m);
}

TEST(loader_errors) {
  const std::string dir = data_dir();
  oelm_model* m;
  CHECK_STATUS(try_load(dir + "/no-such-file.oelm", &m), OELM_FILE_NOT_FOUND);
  CHECK(contains(oelm_last_error(), "no-such-file.oelm"));
  CHECK(contains(oelm_last_error(), "openelm-rt-export"));  // says what to do
  CHECK(m == reinterpret_cast<oelm_model*>(uintptr_t(0x1)));

  CHECK_STATUS(try_load(dir, &m), OELM_FORMAT_ERROR);
  CHECK(contains(oelm_last_error(), "directory"));

  const std::string good = read_file(model_path());
  const std::string bad = dir + "/bad.oelm";
  write_file(bad, good.substr(0, 40));
  CHECK_STATUS(try_load(bad, &m), OELM_FORMAT_ERROR);
  CHECK(contains(oelm_last_error(), "truncated"));

  write_file(bad, good.substr(0, good.size() - 1));
  CHECK_STATUS(try_load(bad, &m), OELM_FORMAT_ERROR);
  CHECK(contains(oelm_last_error(), "bad.oelm"));

  std::string patched = good;
  patched[0] = 'X';
  write_file(bad, patched);
  CHECK_STATUS(try_load(bad, &m), OELM_FORMAT_ERROR);
  CHECK(contains(oelm_last_error(), "magic"));

  patched = good;
  patched[8] = char(oelm_format_version() + 1);  // format_version, little-endian u32
  write_file(bad, patched);
  CHECK_STATUS(try_load(bad, &m), OELM_FORMAT_ERROR);
  CHECK(contains(oelm_last_error(), "newer"));
  std::remove(bad.c_str());

  // The last error is cleared by a successful call.
  ModelPtr ok = load();
  CHECK_EQ(std::string(oelm_last_error()), std::string());
  CHECK_EQ(oelm_model_vocab_size(ok.get()), 1024);
  CHECK_EQ(oelm_model_bos_token(ok.get()), 1);
  CHECK_EQ(oelm_model_eos_token(ok.get()), 2);
  CHECK_EQ(oelm_model_train_context(ok.get()), 256);
}

TEST(argument_errors) {
  oelm_model* m = nullptr;
  CHECK_STATUS(oelm_model_load(nullptr, nullptr, &m), OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "path is NULL"));
  CHECK_STATUS(oelm_model_load(model_path().c_str(), nullptr, nullptr), OELM_INVALID_ARGUMENT);

  oelm_model_options o = oelm_model_options_default();
  o.struct_size = 0;  // not initialised with oelm_model_options_default()
  CHECK_STATUS(oelm_model_load(model_path().c_str(), &o, &m), OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "oelm_model_options_default"));
  o = oelm_model_options_default();
  o.struct_size += 8;  // from a newer header
  CHECK_STATUS(oelm_model_load(model_path().c_str(), &o, &m), OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "newer"));
  o = oelm_model_options_default();
  o.n_threads = -2;
  CHECK_STATUS(oelm_model_load(model_path().c_str(), &o, &m), OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "-2"));

  oelm_session* s = nullptr;
  CHECK_STATUS(oelm_session_new(nullptr, &s), OELM_INVALID_ARGUMENT);

  // Freeing NULL is a no-op; property getters tolerate NULL.
  oelm_model_free(nullptr);
  oelm_session_free(nullptr);
  CHECK_EQ(oelm_model_vocab_size(nullptr), 0);
  CHECK_EQ(std::string(oelm_status_name(OELM_FORMAT_ERROR)), std::string("OELM_FORMAT_ERROR"));
  CHECK_EQ(std::string(oelm_finish_reason_name(OELM_FINISH_CALLBACK)), std::string("callback"));
}

TEST(last_error_is_per_thread) {
  oelm_model* m;
  CHECK_STATUS(try_load(data_dir() + "/missing-here.oelm", &m), OELM_FILE_NOT_FOUND);
  std::string other_before, other_after;
  std::thread t([&] {
    other_before = oelm_last_error();
    oelm_model* m2;
    try_load(data_dir() + "/missing-there.oelm", &m2);
    other_after = oelm_last_error();
  });
  t.join();
  CHECK_EQ(other_before, std::string());
  CHECK(contains(other_after, "missing-there.oelm"));
  CHECK(contains(oelm_last_error(), "missing-here.oelm"));
}

// ---- text --------------------------------------------------------------------------------

std::vector<int32_t> tokenize(const oelm_model* m, const std::string& text, bool add_bos) {
  size_t n = 0;
  const oelm_status st = oelm_tokenize(m, text.data(), text.size(), add_bos, nullptr, 0, &n);
  if (st != OELM_BUFFER_TOO_SMALL) CHECK_OK(st);  // OK: no tokens at all
  std::vector<int32_t> ids(n);
  CHECK_OK(oelm_tokenize(m, text.data(), text.size(), add_bos, ids.data(), ids.size(), &n));
  CHECK_EQ(n, ids.size());
  return ids;
}

std::string detokenize(const oelm_model* m, const std::vector<int32_t>& ids) {
  size_t len = 0;
  CHECK_STATUS(oelm_detokenize(m, ids.data(), ids.size(), nullptr, 0, &len), OELM_BUFFER_TOO_SMALL);
  std::string text(len + 1, 'x');
  CHECK_OK(oelm_detokenize(m, ids.data(), ids.size(), &text[0], text.size(), &len));
  CHECK_EQ(text[len], '\0');
  text.resize(len);
  return text;
}

TEST(tokenizer_matches_sentencepiece) {
  ModelPtr m = load();
  Reader r(data_dir() + "/text.bin");
  const uint32_t n = r.get<uint32_t>();
  CHECK(n >= 5);
  for (uint32_t i = 0; i < n; ++i) {
    const std::string text = r.str();
    const std::vector<int32_t> ids = r.ids();
    const std::string decoded = r.str();
    const std::vector<int32_t> got = tokenize(m.get(), text, true);
    if (got != ids) throw check::Failure("tokenize(\"" + text + "\") differs from sentencepiece");
    CHECK_EQ(got.front(), oelm_model_bos_token(m.get()));
    CHECK(tokenize(m.get(), text, false) == std::vector<int32_t>(ids.begin() + 1, ids.end()));
    CHECK_EQ(detokenize(m.get(), ids), decoded);
  }
}

TEST(tokenize_buffers_and_errors) {
  ModelPtr m = load();
  const char* text = "Once upon a time";
  const std::vector<int32_t> all = tokenize(m.get(), text, true);
  CHECK(all.size() >= 3);
  // NUL-terminated text ((size_t)-1) is the same as an explicit length.
  std::vector<int32_t> ids(all.size());
  size_t n = 0;
  CHECK_OK(oelm_tokenize(m.get(), text, size_t(-1), 1, ids.data(), ids.size(), &n));
  CHECK(ids == all);
  // Too small: the count needed comes back, nothing else is promised.
  CHECK_STATUS(oelm_tokenize(m.get(), text, size_t(-1), 1, ids.data(), all.size() - 1, &n), OELM_BUFFER_TOO_SMALL);
  CHECK_EQ(n, all.size());
  CHECK(contains(oelm_last_error(), "capacity"));
  // Empty text: BOS alone, or nothing.
  CHECK(tokenize(m.get(), "", true) == std::vector<int32_t>{1});
  CHECK(tokenize(m.get(), "", false).empty());
  CHECK_STATUS(oelm_tokenize(m.get(), nullptr, 3, 1, ids.data(), ids.size(), &n), OELM_INVALID_ARGUMENT);
  CHECK_STATUS(oelm_tokenize(m.get(), text, size_t(-1), 1, nullptr, 5, &n), OELM_INVALID_ARGUMENT);

  // Detokenize: exact fit needs room for the NUL; ids are checked.
  const std::string expected = detokenize(m.get(), all);
  CHECK_EQ(expected, std::string(text));
  std::string buf(expected.size(), 'x');
  size_t len = 0;
  CHECK_STATUS(oelm_detokenize(m.get(), all.data(), all.size(), &buf[0], buf.size(), &len), OELM_BUFFER_TOO_SMALL);
  CHECK_EQ(len, expected.size());
  const int32_t bad[] = {1, 1024};
  CHECK_STATUS(oelm_detokenize(m.get(), bad, 2, &buf[0], buf.size(), &len), OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "1024"));
  CHECK_EQ(detokenize(m.get(), {}), std::string());
}

// The callback's text pieces: the same text as the Python path's generate, and the
// continuation of the prompt's decoded text (make_fixtures.py includes a continuation
// that starts with a space, which a decoder started at the first new token would drop).
TEST(streamed_text_matches_python) {
  ModelPtr m = load();
  SessionPtr s = new_session(m.get());
  Reader r(data_dir() + "/stream.bin");
  const uint32_t n = r.get<uint32_t>();
  CHECK(n >= 3);
  for (uint32_t i = 0; i < n; ++i) {
    const std::string prompt_text = r.str();
    oelm_sampling_params params = oelm_sampling_params_default();
    params.temperature = r.get<float>();
    params.seed = r.get<uint64_t>();
    const int32_t max_new = r.get<int32_t>();
    const std::vector<int32_t> tokens = r.ids();
    const std::string text = r.str();
    const std::vector<int32_t> prompt = tokenize(m.get(), prompt_text, true);
    Collector col;
    CHECK_OK(oelm_session_set_sampling(s.get(), &params));
    CHECK_OK(oelm_session_generate(s.get(), prompt.data(), prompt.size(), max_new, &Collector::callback, &col, nullptr));
    CHECK(col.tokens == tokens);
    if (col.text != text)
      throw check::Failure("streamed text for prompt \"" + prompt_text + "\" is \"" + col.text +
                           "\", the Python path gave \"" + text + "\"");
    std::vector<int32_t> all = prompt;
    all.insert(all.end(), tokens.begin(), tokens.end());
    CHECK_EQ(detokenize(m.get(), all), detokenize(m.get(), prompt) + col.text);
  }
}

// ---- evaluation -------------------------------------------------------------------------

TEST(logits_match_python) {
  Reader r(data_dir() + "/logits.bin");
  const std::vector<int32_t> ids = r.ids();
  const size_t V = r.get<uint32_t>();
  std::vector<float> expected(ids.size() * V);
  for (float& x : expected) x = r.get<float>();

  ModelPtr m = load(2);
  CHECK_EQ(size_t(oelm_model_vocab_size(m.get())), V);
  SessionPtr s = new_session(m.get());
  CHECK(oelm_session_logits(s.get()) == nullptr);
  std::vector<float> got(ids.size() * V);
  CHECK_OK(oelm_session_eval(s.get(), ids.data(), ids.size(), got.data()));
  CHECK_EQ(oelm_session_n_past(s.get()), int32_t(ids.size()));

  // Same core, same kernels: equal up to float rounding from a different thread split.
  float scale = 0, max_err = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    scale = std::max(scale, std::fabs(expected[i]));
    max_err = std::max(max_err, std::fabs(got[i] - expected[i]));
  }
  if (!(max_err <= 1e-5f * scale))
    throw check::Failure("logits differ from the Python path: max abs error " + std::to_string(max_err) +
                         " (largest logit " + std::to_string(scale) + ")");
  CHECK(std::equal(got.end() - long(V), got.end(), oelm_session_logits(s.get())));

  // Token by token through the KV cache: the last logits match the batched pass.
  oelm_session_reset(s.get());
  CHECK_EQ(oelm_session_n_past(s.get()), 0);
  CHECK(oelm_session_logits(s.get()) == nullptr);
  for (size_t i = 0; i < ids.size(); ++i) {
    CHECK_OK(oelm_session_eval(s.get(), &ids[i], 1, nullptr));
    const float* row = oelm_session_logits(s.get());
    for (size_t v = 0; v < V; ++v)
      if (!(std::fabs(row[v] - got[i * V + v]) <= 1e-5f * scale))
        throw check::Failure("incremental logits differ at position " + std::to_string(i));
  }
}

TEST(eval_errors_leave_the_session_unchanged) {
  ModelPtr m = load(1, 8);
  SessionPtr s = new_session(m.get());
  CHECK_EQ(oelm_session_max_context(s.get()), 8);
  const int32_t ids[] = {1, 50, 60, 70, 80};
  CHECK_OK(oelm_session_eval(s.get(), ids, 5, nullptr));
  const std::vector<float> before(oelm_session_logits(s.get()), oelm_session_logits(s.get()) + 1024);

  CHECK_STATUS(oelm_session_eval(s.get(), ids, 5, nullptr), OELM_INVALID_ARGUMENT);  // 5 + 5 > 8
  CHECK(contains(oelm_last_error(), "max_context 8"));
  const int32_t bad[] = {3, 1024};
  CHECK_STATUS(oelm_session_eval(s.get(), bad, 2, nullptr), OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "1024"));
  CHECK_STATUS(oelm_session_eval(s.get(), ids, 0, nullptr), OELM_INVALID_ARGUMENT);
  CHECK_STATUS(oelm_session_eval(s.get(), nullptr, 2, nullptr), OELM_INVALID_ARGUMENT);

  CHECK_EQ(oelm_session_n_past(s.get()), 5);
  CHECK(std::equal(before.begin(), before.end(), oelm_session_logits(s.get())));

  oelm_session_reset(s.get());
  int32_t tok;
  CHECK_STATUS(oelm_session_sample(s.get(), &tok), OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "oelm_session_eval"));
}

TEST(sampling_params_are_checked) {
  ModelPtr m = load();
  SessionPtr s = new_session(m.get());
  const int32_t ids[] = {1, 200, 300};
  CHECK_OK(oelm_session_eval(s.get(), ids, 3, nullptr));
  int32_t greedy;
  CHECK_OK(oelm_session_sample(s.get(), &greedy));
  const float* l = oelm_session_logits(s.get());
  CHECK_EQ(greedy, int32_t(std::max_element(l, l + 1024) - l));

  oelm_sampling_params p = oelm_sampling_params_default();
  p.top_p = 0.0f;
  CHECK_STATUS(oelm_session_set_sampling(s.get(), &p), OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "top_p must be in (0, 1]"));
  p = oelm_sampling_params_default();
  p.temperature = -1.0f;
  CHECK_STATUS(oelm_session_set_sampling(s.get(), &p), OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "got -1"));
  // The session kept its (greedy) sampler.
  int32_t again;
  CHECK_OK(oelm_session_sample(s.get(), &again));
  CHECK_EQ(again, greedy);
}

// ---- generation -------------------------------------------------------------------------

TEST(generate_matches_python) {
  ModelPtr m = load(2);
  SessionPtr s = new_session(m.get());
  for (const GenCase& c : generate_cases()) {
    oelm_generate_result r = oelm_generate_result_init();
    const std::vector<int32_t> got = generate(s.get(), c, &r);
    CHECK_EQ(got.size(), c.tokens.size());
    CHECK(got == c.tokens);
    CHECK_EQ(r.n_prompt, int32_t(c.prompt.size()));
    CHECK_EQ(r.n_generated, int32_t(got.size()));
    CHECK_EQ(r.finish_reason, got.back() == 2 ? OELM_FINISH_EOS : OELM_FINISH_LENGTH);
    CHECK(r.prefill_seconds > 0 && r.decode_seconds > 0);
    // The KV cache holds every token but the last one sampled.
    CHECK_EQ(oelm_session_n_past(s.get()), int32_t(c.prompt.size() + got.size() - 1));
    CHECK(oelm_session_logits(s.get()) == nullptr);
  }
}

// Driving the model by hand (eval + sample) gives exactly what generate gives.
TEST(eval_and_sample_match_generate) {
  ModelPtr m = load();
  SessionPtr s = new_session(m.get());
  for (const GenCase& c : generate_cases()) {
    CHECK_OK(oelm_session_set_sampling(s.get(), &c.params));
    oelm_session_reset(s.get());
    CHECK_OK(oelm_session_eval(s.get(), c.prompt.data(), c.prompt.size(), nullptr));
    std::vector<int32_t> got;
    while (int32_t(got.size()) < c.max_new) {
      int32_t tok;
      CHECK_OK(oelm_session_sample(s.get(), &tok));
      got.push_back(tok);
      if (tok == oelm_model_eos_token(m.get())) break;
      CHECK_OK(oelm_session_eval(s.get(), &tok, 1, nullptr));
    }
    CHECK(got == c.tokens);
  }
}

TEST(callback_stops_generation) {
  ModelPtr m = load();
  SessionPtr s = new_session(m.get());
  GenCase c = generate_cases()[2];  // sampled: a restart must reseed to repeat it
  CHECK(c.tokens.size() >= 6);
  for (size_t k : {size_t(1), size_t(5)}) {
    Collector col;
    col.stop_after = k;
    oelm_generate_result r = oelm_generate_result_init();
    CHECK_OK(oelm_session_set_sampling(s.get(), &c.params));
    CHECK_OK(oelm_session_generate(s.get(), c.prompt.data(), c.prompt.size(), c.max_new, &Collector::callback, &col, &r));
    CHECK_EQ(r.finish_reason, OELM_FINISH_CALLBACK);
    CHECK_EQ(r.n_generated, int32_t(k));
    CHECK(col.tokens == std::vector<int32_t>(c.tokens.begin(), c.tokens.begin() + long(k)));
    CHECK_EQ(oelm_session_n_past(s.get()), int32_t(c.prompt.size() + k - 1));
  }
  // The session is usable afterwards and a full run repeats the Python tokens.
  CHECK(generate(s.get(), c) == c.tokens);
}

TEST(generate_stops_at_the_context) {
  ModelPtr m = load(1, 12);
  SessionPtr s = new_session(m.get());
  const GenCase c = generate_cases()[0];  // a 5-token prompt
  oelm_generate_result r = oelm_generate_result_init();
  const std::vector<int32_t> got = generate(s.get(), c, &r);
  CHECK_EQ(r.finish_reason, OELM_FINISH_CONTEXT);
  CHECK_EQ(got.size(), size_t(12 - 5));
  CHECK(got == std::vector<int32_t>(c.tokens.begin(), c.tokens.begin() + 7));

  std::vector<int32_t> long_prompt(12, 5);
  CHECK_STATUS(oelm_session_generate(s.get(), long_prompt.data(), 12, 4, nullptr, nullptr, nullptr),
               OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "max_context"));
  CHECK_STATUS(oelm_session_generate(s.get(), long_prompt.data(), 0, 4, nullptr, nullptr, nullptr),
               OELM_INVALID_ARGUMENT);
  CHECK_STATUS(oelm_session_generate(s.get(), long_prompt.data(), 3, -1, nullptr, nullptr, nullptr),
               OELM_INVALID_ARGUMENT);
  oelm_generate_result unset = oelm_generate_result_init();
  unset.struct_size = 0;
  CHECK_STATUS(oelm_session_generate(s.get(), long_prompt.data(), 3, 4, nullptr, nullptr, &unset),
               OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "struct_size"));
}

struct AbortAfter {
  std::atomic<int> calls{0};
  int limit = 0;
  static int callback(void* user) {
    auto* a = static_cast<AbortAfter*>(user);
    return ++a->calls >= a->limit;
  }
};

TEST(abort_callback_interrupts) {
  ModelPtr m = load();
  SessionPtr s = new_session(m.get());
  const GenCase c = generate_cases()[0];
  AbortAfter abort;
  abort.limit = 3;  // the tiny model has 4 layers: this stops inside the prefill
  oelm_session_set_abort_callback(s.get(), &AbortAfter::callback, &abort);
  CHECK_STATUS(oelm_session_generate(s.get(), c.prompt.data(), c.prompt.size(), c.max_new, nullptr, nullptr, nullptr),
               OELM_INTERRUPTED);
  CHECK(contains(oelm_last_error(), "abort callback"));
  CHECK_EQ(abort.calls.load(), 3);
  CHECK_EQ(oelm_session_n_past(s.get()), 0);

  abort.calls = 0;
  abort.limit = 2;
  CHECK_STATUS(oelm_session_eval(s.get(), c.prompt.data(), c.prompt.size(), nullptr), OELM_INTERRUPTED);
  CHECK_EQ(oelm_session_n_past(s.get()), 0);
  CHECK(oelm_session_logits(s.get()) == nullptr);

  oelm_session_set_abort_callback(s.get(), nullptr, nullptr);
  CHECK(generate(s.get(), c) == c.tokens);
}

TEST(session_outlives_its_model) {
  ModelPtr m = load();
  SessionPtr s = new_session(m.get());
  m.reset();  // oelm_model_free: the session keeps the mapped weights alive
  const GenCase c = generate_cases()[1];
  CHECK(generate(s.get(), c) == c.tokens);
}

// One model, several threads each with its own session: the same tokens and text as
// one thread running the same work one after the other.
TEST(concurrent_sessions) {
  ModelPtr m = load(1);
  const std::vector<GenCase> cases = generate_cases();
  const std::vector<std::string> texts = {"Once upon a time", "The capital of France is", "def fibonacci(n):",
                                          "\u00dcn\u00efc\u00f6d\u00e9 caf\u00e9"};
  const size_t n_threads = 4, rounds = 3;
  // One thread's work: tokenize a text, generate from it (tokens + text), then generate
  // from a sampled case.
  auto work = [&](oelm_session* s, size_t t) {
    std::vector<int32_t> prompt = tokenize(m.get(), texts[t % texts.size()], true);
    Collector col;
    CHECK_OK(oelm_session_set_sampling(s, &cases[0].params));
    CHECK_OK(oelm_session_generate(s, prompt.data(), prompt.size(), 16, &Collector::callback, &col, nullptr));
    prompt.insert(prompt.end(), col.tokens.begin(), col.tokens.end());
    const std::vector<int32_t> sampled = generate(s, cases[t % cases.size()]);
    prompt.insert(prompt.end(), sampled.begin(), sampled.end());
    return std::make_pair(prompt, col.text);
  };
  std::vector<std::pair<std::vector<int32_t>, std::string>> sequential;
  {
    SessionPtr s = new_session(m.get());
    for (size_t t = 0; t < n_threads; ++t) sequential.push_back(work(s.get(), t));
  }
  std::vector<std::vector<std::pair<std::vector<int32_t>, std::string>>> got(n_threads);
  std::vector<std::string> errors(n_threads);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < n_threads; ++t)
    threads.emplace_back([&, t] {
      try {
        SessionPtr s = new_session(m.get());
        for (size_t r = 0; r < rounds; ++r) got[t].push_back(work(s.get(), t));
      } catch (const std::exception& e) {
        errors[t] = e.what();
      }
    });
  for (auto& th : threads) th.join();
  for (size_t t = 0; t < n_threads; ++t) {
    if (!errors[t].empty()) throw check::Failure("thread " + std::to_string(t) + ": " + errors[t]);
    for (size_t r = 0; r < rounds; ++r)
      if (got[t][r] != sequential[t])
        throw check::Failure("thread " + std::to_string(t) + " round " + std::to_string(r) +
                             " gave different tokens or text than the sequential run");
  }
}

// ---- sequences, batched evaluation, scoring (0.2) ------------------------------------------

std::vector<float> eval_alone(oelm_session* s, const std::vector<int32_t>& ids) {
  oelm_seq q;
  CHECK_OK(oelm_seq_new(s, &q));
  const size_t V = 1024;
  std::vector<float> out(ids.size() * V);
  size_t rows = 0;
  const oelm_batch_item item{q, ids.data(), int32_t(ids.size()), OELM_LOGITS_ALL};
  CHECK_OK(oelm_session_eval_batch(s, &item, 1, out.data(), out.size(), &rows));
  CHECK_EQ(rows, ids.size());
  CHECK_OK(oelm_seq_free(s, q));
  return out;
}

std::vector<int32_t> some_ids(size_t n, uint32_t seed) {
  std::vector<int32_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = int32_t(3 + (seed * 7919u + i * 104729u) % 1000u);
  v[0] = 1;
  return v;
}

TEST(sequences_and_batched_eval) {
  ModelPtr m = load(2);
  SessionPtr s = new_session(m.get());
  const size_t V = 1024;
  const std::vector<int32_t> a = some_ids(30, 1), b = some_ids(12, 2);
  const std::vector<float> ra = eval_alone(s.get(), a), rb = eval_alone(s.get(), b);
  oelm_seq qa, qb;
  CHECK_OK(oelm_seq_new(s.get(), &qa));
  CHECK_OK(oelm_seq_new(s.get(), &qb));
  // a's prefill and b's prefix in one pass: each row equals the sequence alone, bitwise
  std::vector<float> out(40 * V);
  size_t rows = 0;
  oelm_batch_item items[2] = {{qa, a.data(), 20, OELM_LOGITS_ALL}, {qb, b.data(), 5, OELM_LOGITS_LAST}};
  CHECK_OK(oelm_session_eval_batch(s.get(), items, 2, out.data(), out.size(), &rows));
  CHECK_EQ(rows, size_t(21));
  CHECK(std::equal(out.begin(), out.begin() + long(20 * V), ra.begin()));
  CHECK(std::equal(out.begin() + long(20 * V), out.begin() + long(21 * V), rb.begin() + long(4 * V)));
  CHECK_EQ(oelm_seq_length(s.get(), qa), 20);
  // a buffer too small: the rows needed, nothing evaluated
  items[0] = {qa, a.data() + 20, 10, OELM_LOGITS_ALL};
  items[1] = {qb, b.data() + 5, 7, OELM_LOGITS_ALL};
  CHECK_STATUS(oelm_session_eval_batch(s.get(), items, 2, out.data(), 5 * V, &rows), OELM_BUFFER_TOO_SMALL);
  CHECK_EQ(rows, size_t(17));
  CHECK_EQ(oelm_seq_length(s.get(), qa), 20);
  CHECK_OK(oelm_session_eval_batch(s.get(), items, 2, out.data(), out.size(), &rows));
  CHECK(std::equal(out.begin(), out.begin() + long(10 * V), ra.begin() + long(20 * V)));
  CHECK(std::equal(out.begin() + long(10 * V), out.begin() + long(17 * V), rb.begin() + long(5 * V)));
  // fork a at 25 (a partly shared block), go on with b's tokens: as that sequence alone
  oelm_seq f;
  CHECK_OK(oelm_seq_fork(s.get(), qa, 25, &f));
  CHECK_EQ(oelm_seq_length(s.get(), f), 25);
  std::vector<int32_t> fa(a.begin(), a.begin() + 25);
  fa.insert(fa.end(), b.begin(), b.end());
  const std::vector<float> rf = eval_alone(s.get(), fa);
  const oelm_batch_item fi{f, b.data(), int32_t(b.size()), OELM_LOGITS_ALL};
  CHECK_OK(oelm_session_eval_batch(s.get(), &fi, 1, out.data(), out.size(), &rows));
  CHECK(std::equal(out.begin(), out.begin() + long(b.size() * V), rf.begin() + long(25 * V)));
  // the parent is unchanged: truncate it to 29 and evaluate its last token again
  CHECK_OK(oelm_seq_truncate(s.get(), qa, 29));
  const oelm_batch_item li{qa, a.data() + 29, 1, OELM_LOGITS_LAST};
  CHECK_OK(oelm_session_eval_batch(s.get(), &li, 1, out.data(), out.size(), &rows));
  CHECK(std::equal(out.begin(), out.begin() + long(V), ra.begin() + long(29 * V)));
  // errors name the problem and change nothing
  CHECK_STATUS(oelm_seq_truncate(s.get(), qa, 31), OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "truncate a sequence of 30 tokens to 31"));
  CHECK_STATUS(oelm_seq_free(s.get(), OELM_SEQ_DEFAULT), OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "oelm_session_reset"));
  CHECK_OK(oelm_seq_free(s.get(), f));
  CHECK_STATUS(oelm_seq_free(s.get(), f), OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "not a live sequence"));
  CHECK_EQ(oelm_seq_length(s.get(), f), -1);
  oelm_seq g;
  CHECK_STATUS(oelm_seq_fork(s.get(), 77, 1, &g), OELM_INVALID_ARGUMENT);
  items[0] = {qa, a.data(), 1, OELM_LOGITS_LAST};
  items[1] = {qa, a.data(), 1, OELM_LOGITS_LAST};
  CHECK_STATUS(oelm_session_eval_batch(s.get(), items, 2, out.data(), out.size(), &rows), OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "appears twice"));
}

TEST(kv_budget_is_a_clear_error) {
  oelm_model_options o = oelm_model_options_default();
  o.n_threads = 1;
  o.kv_budget_mib = 1;  // the fixture model: 14 KiB per block of 16 positions, 73 blocks
  oelm_model* mp = nullptr;
  CHECK_OK(oelm_model_load(model_path().c_str(), &o, &mp));
  ModelPtr m(mp);
  SessionPtr s = new_session(m.get());
  std::vector<oelm_seq> q(6);
  std::vector<std::vector<int32_t>> ids;
  std::vector<oelm_batch_item> items;
  for (size_t i = 0; i < q.size(); ++i) {
    CHECK_OK(oelm_seq_new(s.get(), &q[i]));
    ids.push_back(some_ids(200, uint32_t(i)));
  }
  for (size_t i = 0; i < q.size(); ++i) items.push_back({q[i], ids[i].data(), 200, OELM_LOGITS_NONE});
  size_t rows = 0;
  CHECK_STATUS(oelm_session_eval_batch(s.get(), items.data(), items.size(), nullptr, 0, &rows), OELM_KV_BUDGET);
  CHECK(contains(oelm_last_error(), "budget is exhausted") && contains(oelm_last_error(), "1.0 MiB") &&
        contains(oelm_last_error(), "kv_budget"));
  for (oelm_seq x : q) CHECK_EQ(oelm_seq_length(s.get(), x), 0);
  CHECK_OK(oelm_session_eval_batch(s.get(), items.data(), 3, nullptr, 0, &rows));  // half of it fits
}

// memory_budget_mib: below the minimum, oelm_session_new says what the minimum is; at it, the
// session generates what the Python path generates (streamed FFN weights, same logits).
TEST(memory_budget_states_the_minimum) {
  oelm_model_options o = oelm_model_options_default();
  o.n_threads = 2;
  o.memory_budget_mib = 1;
  oelm_model* mp = nullptr;
  CHECK_OK(oelm_model_load(model_path().c_str(), &o, &mp));
  ModelPtr small(mp);
  oelm_session* sp = nullptr;
  CHECK_STATUS(oelm_session_new(small.get(), &sp), OELM_INVALID_ARGUMENT);
  const std::string err = oelm_last_error();
  const size_t at = err.find("minimum of ");
  CHECK(at != std::string::npos && contains(err.c_str(), "raise memory_budget"));
  const double minimum_mib = std::stod(err.substr(at + 11));
  o.memory_budget_mib = int64_t(std::ceil(minimum_mib + 0.05));
  CHECK_OK(oelm_model_load(model_path().c_str(), &o, &mp));
  ModelPtr m(mp);
  SessionPtr s = new_session(m.get());
  for (const GenCase& c : generate_cases()) CHECK(generate(s.get(), c) == c.tokens);
  o.memory_budget_mib = -1;
  CHECK_STATUS(oelm_model_load(model_path().c_str(), &o, &mp), OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "memory_budget_mib"));
}

TEST(score_matches_eval) {
  ModelPtr m = load(2);
  SessionPtr s = new_session(m.get());
  const size_t V = 1024;
  const std::vector<int32_t> ctx = some_ids(20, 3), cont = {17, 400, 5, 999};
  std::vector<int32_t> all = ctx;
  all.insert(all.end(), cont.begin(), cont.end());
  const std::vector<float> logits = eval_alone(s.get(), all);
  std::vector<double> want;
  bool greedy = true;
  for (size_t i = 0; i < cont.size(); ++i) {
    const float* x = logits.data() + (ctx.size() - 1 + i) * V;
    const size_t arg = size_t(std::max_element(x, x + V) - x);
    double mx = x[arg], sum = 0;
    for (size_t v = 0; v < V; ++v) sum += std::exp(double(x[v]) - mx);
    want.push_back(double(x[cont[i]]) - mx - std::log(sum));
    greedy = greedy && int32_t(arg) == cont[i];
  }
  std::vector<double> got(cont.size());
  int32_t is_greedy = -1;
  CHECK_OK(oelm_session_score(s.get(), ctx.data(), ctx.size(), cont.data(), cont.size(), got.data(), &is_greedy));
  for (size_t i = 0; i < cont.size(); ++i) CHECK(std::fabs(got[i] - want[i]) <= 1e-9 * std::fabs(want[i]));
  CHECK_EQ(is_greedy, greedy ? 1 : 0);
  // many pairs, sharing the context: the same numbers
  std::vector<std::vector<double>> outs(3, std::vector<double>(cont.size()));
  std::vector<oelm_score_pair> pairs;
  for (size_t k = 0; k < 3; ++k)
    pairs.push_back({ctx.data(), ctx.size(), cont.data(), cont.size() - k, outs[k].data(), -1});
  CHECK_OK(oelm_session_score_batch(s.get(), pairs.data(), pairs.size()));
  for (size_t k = 0; k < 3; ++k)
    for (size_t i = 0; i + k < cont.size(); ++i) CHECK_EQ(outs[k][i], got[i]);
  CHECK_STATUS(oelm_session_score(s.get(), ctx.data(), 0, cont.data(), cont.size(), got.data(), nullptr),
               OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "context is empty"));
}

// ---- the engine (0.2) ------------------------------------------------------------------------

struct Outcome {
  std::vector<int32_t> tokens;
  std::string text;
  oelm_finish_reason finish = OELM_FINISH_NONE;
  int finals = 0;
};

// Polls until every request in `want` has had its last event.
void poll_all(oelm_session* s, std::map<oelm_request, Outcome>& out, size_t n_requests, double timeout = 0) {
  size_t done = 0;
  for (const auto& kv : out) done += kv.second.finals;
  oelm_event ev[8];
  while (done < n_requests) {
    size_t n = 0;
    CHECK_OK(oelm_session_poll(s, ev, 8, &n, timeout));
    if (n == 0 && timeout == 0) {
      int32_t busy = 0;
      CHECK_OK(oelm_session_step(s, &busy));
      continue;
    }
    if (n == 0) throw check::Failure("no event within " + std::to_string(timeout) + " s");
    for (size_t i = 0; i < n; ++i) {
      Outcome& o = out[ev[i].request];
      if (ev[i].token >= 0) o.tokens.push_back(ev[i].token);
      o.text.append(ev[i].text, ev[i].text_len);
      if (ev[i].finish != OELM_FINISH_NONE) {
        o.finish = ev[i].finish;
        ++o.finals;
        ++done;
      }
    }
  }
}

TEST(engine_matches_generate) {
  ModelPtr m = load(2);
  SessionPtr s = new_session(m.get());
  const std::vector<GenCase> cases = generate_cases();
  std::map<oelm_request, Outcome> out;
  std::vector<oelm_request> ids;
  for (const GenCase& c : cases) {
    oelm_request_params p = oelm_request_params_default();
    p.sampling = c.params;
    p.max_new_tokens = c.max_new;
    oelm_request r;
    CHECK_OK(oelm_session_submit(s.get(), c.prompt.data(), c.prompt.size(), &p, &r));
    ids.push_back(r);
  }
  poll_all(s.get(), out, cases.size());
  for (size_t i = 0; i < cases.size(); ++i) {
    const Outcome& o = out[ids[i]];
    CHECK(o.tokens == cases[i].tokens);
    CHECK_EQ(o.finals, 1);
    CHECK_EQ(o.finish, o.tokens.back() == 2 ? OELM_FINISH_EOS : OELM_FINISH_LENGTH);
  }
  // a stop string: the text ends before it
  const GenCase& c = cases[0];
  Outcome full = out[ids[0]];
  CHECK(full.text.size() > 6);
  const std::string stop = full.text.substr(3, 3);
  const char* stops[] = {stop.c_str()};
  oelm_request_params p = oelm_request_params_default();
  p.sampling = c.params;
  p.max_new_tokens = c.max_new;
  p.stop = stops;
  p.n_stop = 1;
  oelm_request r;
  CHECK_OK(oelm_session_submit(s.get(), c.prompt.data(), c.prompt.size(), &p, &r));
  out.clear();
  poll_all(s.get(), out, 1);
  CHECK_EQ(out[r].finish, OELM_FINISH_STOP);
  CHECK(out[r].text == full.text.substr(0, full.text.find(stop)));
  // bad requests are refused, naming the field
  p = oelm_request_params_default();
  p.sampling.top_p = 2.0f;
  CHECK_STATUS(oelm_session_submit(s.get(), c.prompt.data(), c.prompt.size(), &p, &r), OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "top_p"));
  p = oelm_request_params_default();
  const char* empty[] = {""};
  p.stop = empty;
  p.n_stop = 1;
  CHECK_STATUS(oelm_session_submit(s.get(), c.prompt.data(), c.prompt.size(), &p, &r), OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "stop string is empty"));
}

TEST(engine_thread_submitters_and_cancels) {
  ModelPtr m = load(2);
  SessionPtr s = new_session(m.get());
  const std::vector<GenCase> cases = generate_cases();
  CHECK_OK(oelm_session_start(s.get()));
  std::mutex mu;
  std::map<oelm_request, size_t> which;
  std::vector<std::thread> threads;
  const size_t n_threads = 4, per = 6;
  for (size_t t = 0; t < n_threads; ++t)
    threads.emplace_back([&, t] {
      for (size_t k = 0; k < per; ++k) {
        const size_t i = (t + k) % cases.size();
        oelm_request_params p = oelm_request_params_default();
        p.sampling = cases[i].params;
        p.max_new_tokens = cases[i].max_new;
        oelm_request r;
        if (oelm_session_submit(s.get(), cases[i].prompt.data(), cases[i].prompt.size(), &p, &r) != OELM_OK) continue;
        {
          std::lock_guard<std::mutex> lk(mu);
          which[r] = i;
        }
        if ((t + k) % 3 == 0) oelm_session_cancel(s.get(), r);
      }
    });
  for (auto& th : threads) th.join();
  CHECK_EQ(which.size(), n_threads * per);
  std::map<oelm_request, Outcome> out;
  poll_all(s.get(), out, which.size(), 5.0);
  oelm_session_stop(s.get());
  for (const auto& [r, i] : which) {
    const Outcome& o = out[r];
    CHECK_EQ(o.finals, 1);
    if (o.finish == OELM_FINISH_CANCELLED)
      CHECK(std::equal(o.tokens.begin(), o.tokens.end(), cases[i].tokens.begin()));
    else
      CHECK(o.tokens == cases[i].tokens);
  }
  // the session works as before once the thread has stopped
  CHECK(generate(s.get(), cases[0]) == cases[0].tokens);
}

TEST(generate_reuses_the_previous_sequence) {
  ModelPtr m = load(1);
  SessionPtr s = new_session(m.get());
  GenCase c = generate_cases()[0];
  oelm_generate_result r1 = oelm_generate_result_init(), r2 = oelm_generate_result_init();
  const std::vector<int32_t> first = generate(s.get(), c, &r1);
  CHECK_EQ(r1.n_cached, 0);
  // the next turn: the previous prompt and reply, then new tokens
  GenCase next = c;
  next.prompt.insert(next.prompt.end(), first.begin(), first.end());
  for (int32_t t : {2, 30, 40, 50}) next.prompt.push_back(t);
  const std::vector<int32_t> second = generate(s.get(), next, &r2);
  CHECK_EQ(r2.n_cached, int32_t(c.prompt.size() + first.size() - 1));
  SessionPtr fresh = new_session(m.get());
  CHECK(generate(fresh.get(), next) == second);
  // a struct from the 0.1 header (no n_cached) is accepted and filled as far as it goes
  oelm_generate_result old = oelm_generate_result_init();
  old.struct_size = offsetof(oelm_generate_result, n_cached);
  old.n_cached = 12345;
  Collector col;
  CHECK_OK(oelm_session_generate(s.get(), next.prompt.data(), next.prompt.size(), 2, &Collector::callback, &col, &old));
  CHECK_EQ(old.n_generated, 2);
  CHECK_EQ(old.n_cached, 12345);
}

// ---- speculative generation (0.3) ------------------------------------------------------------

// Prompt lookup: the same tokens, pieces and finish as oelm_session_generate, greedy and
// sampled, in both modes, on prompts that repeat themselves (so proposals are accepted).
TEST(speculative_matches_generate) {
  ModelPtr m = load(2);
  SessionPtr plain = new_session(m.get()), spec = new_session(m.get());
  int64_t proposed = 0, accepted = 0;
  for (GenCase c : generate_cases()) {
    for (int repeat = 0; repeat < 2; ++repeat) {
      if (repeat) c.prompt.insert(c.prompt.end(), c.prompt.begin() + 1, c.prompt.end());
      Collector ref;
      oelm_generate_result rr = oelm_generate_result_init();
      CHECK_OK(oelm_session_set_sampling(plain.get(), &c.params));
      CHECK_OK(oelm_session_generate(plain.get(), c.prompt.data(), c.prompt.size(), c.max_new, &Collector::callback,
                                     &ref, &rr));
      CHECK_EQ(rr.n_proposed, 0);
      for (oelm_speculation_mode mode : {OELM_SPECULATION_HF, OELM_SPECULATION_ADAPTIVE}) {
        oelm_speculation_params sp = oelm_speculation_params_default();
        CHECK_EQ(sp.prompt_lookup_num_tokens, 10);
        sp.mode = mode;
        Collector col;
        oelm_generate_result r = oelm_generate_result_init();
        CHECK_OK(oelm_session_set_sampling(spec.get(), &c.params));
        CHECK_OK(oelm_session_generate_speculative(spec.get(), c.prompt.data(), c.prompt.size(), c.max_new, &sp,
                                                   &Collector::callback, &col, &r));
        CHECK(col.tokens == ref.tokens);
        CHECK(col.text == ref.text);
        CHECK_EQ(r.finish_reason, rr.finish_reason);
        CHECK_EQ(r.n_generated, rr.n_generated);
        CHECK_EQ(r.n_prompt, int32_t(c.prompt.size()));
        CHECK(r.n_accepted <= r.n_proposed && r.n_verify_steps <= r.n_generated);
        CHECK(r.n_proposed <= std::max(0, c.max_new - 1));
        CHECK_EQ(oelm_session_n_past(spec.get()), int32_t(c.prompt.size() + col.tokens.size() - 1));
        proposed += r.n_proposed;
        accepted += r.n_accepted;
      }
    }
  }
  CHECK(proposed > 0 && accepted > 0);
}

TEST(speculative_context_callback_and_errors) {
  ModelPtr m = load(1, 12);
  SessionPtr plain = new_session(m.get()), s = new_session(m.get());
  GenCase c = generate_cases()[0];  // a 5-token prompt
  c.prompt.insert(c.prompt.end(), c.prompt.begin() + 1, c.prompt.begin() + 4);  // 8 tokens, a repeat
  const std::vector<int32_t> ref = generate(plain.get(), c);
  oelm_speculation_params sp = oelm_speculation_params_default();
  sp.mode = OELM_SPECULATION_HF;
  Collector col;
  oelm_generate_result r = oelm_generate_result_init();
  CHECK_OK(oelm_session_generate_speculative(s.get(), c.prompt.data(), c.prompt.size(), 50, &sp, &Collector::callback,
                                             &col, &r));
  CHECK_EQ(r.finish_reason, OELM_FINISH_CONTEXT);
  CHECK(col.tokens == std::vector<int32_t>(ref.begin(), ref.begin() + 4));
  // the callback stops it after k tokens, even inside an accepted run
  for (size_t k : {size_t(1), size_t(3)}) {
    Collector stop;
    stop.stop_after = k;
    CHECK_OK(oelm_session_generate_speculative(s.get(), c.prompt.data(), c.prompt.size(), 50, nullptr,
                                               &Collector::callback, &stop, &r));
    CHECK_EQ(r.finish_reason, OELM_FINISH_CALLBACK);
    CHECK(stop.tokens == std::vector<int32_t>(ref.begin(), ref.begin() + long(k)));
    CHECK_EQ(oelm_session_n_past(s.get()), int32_t(c.prompt.size() + k - 1));
  }
  CHECK_OK(oelm_session_generate_speculative(s.get(), c.prompt.data(), c.prompt.size(), 0, nullptr, nullptr, nullptr,
                                             &r));
  CHECK_EQ(r.n_generated, 0);
  CHECK_EQ(r.finish_reason, OELM_FINISH_LENGTH);
  // a 0.2 result struct (no speculation fields) is accepted and filled as far as it goes
  oelm_generate_result old = oelm_generate_result_init();
  old.struct_size = offsetof(oelm_generate_result, n_proposed);
  old.n_proposed = 777;
  CHECK_OK(oelm_session_generate_speculative(s.get(), c.prompt.data(), c.prompt.size(), 2, nullptr, nullptr, nullptr,
                                             &old));
  CHECK_EQ(old.n_generated, 2);
  CHECK_EQ(old.n_proposed, 777);
  const int32_t* p = c.prompt.data();
  const size_t n = c.prompt.size();
  struct Bad {
    oelm_speculation_params params;
    const char* says;
  };
  std::vector<Bad> bad;
  bad.push_back({oelm_speculation_params_default(), "prompt_lookup_num_tokens"});
  bad.back().params.prompt_lookup_num_tokens = 0;
  bad.push_back({oelm_speculation_params_default(), "max_matching_ngram_size"});
  bad.back().params.max_matching_ngram_size = 0;
  bad.push_back({oelm_speculation_params_default(), "mode"});
  bad.back().params.mode = 7;
  bad.push_back({oelm_speculation_params_default(), "oelm_speculation_params_default"});
  bad.back().params.struct_size = 4;
  for (const Bad& b : bad) {
    CHECK_STATUS(oelm_session_generate_speculative(s.get(), p, n, 4, &b.params, nullptr, nullptr, nullptr),
                 OELM_INVALID_ARGUMENT);
    CHECK(contains(oelm_last_error(), b.says));
  }
  CHECK_STATUS(oelm_session_generate_speculative(s.get(), p, n, -1, nullptr, nullptr, nullptr, nullptr),
               OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "max_new_tokens"));
  CHECK_STATUS(oelm_session_generate_speculative(s.get(), p, 0, 4, nullptr, nullptr, nullptr, nullptr),
               OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "empty"));
  std::vector<int32_t> long_prompt(12, 5);
  CHECK_STATUS(oelm_session_generate_speculative(s.get(), long_prompt.data(), 12, 4, nullptr, nullptr, nullptr,
                                                 nullptr),
               OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "max_context"));
  std::vector<int32_t> out_of_vocab = {1, oelm_model_vocab_size(m.get())};
  CHECK_STATUS(oelm_session_generate_speculative(s.get(), out_of_vocab.data(), 2, 4, nullptr, nullptr, nullptr,
                                                 nullptr),
               OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "outside the vocabulary"));
  // after the errors the session still generates the plain tokens
  Collector again;
  CHECK_OK(oelm_session_generate_speculative(s.get(), p, n, 4, nullptr, &Collector::callback, &again, nullptr));
  CHECK(again.tokens == std::vector<int32_t>(ref.begin(), ref.begin() + 4));
}

TEST(options_from_an_older_header) {
  oelm_model_options o = oelm_model_options_default();
  o.struct_size = offsetof(oelm_model_options, kv_type);  // what a 0.1 program passes
  o.max_context = 64;
  o.kv_type = 99;  // beyond its struct: ignored
  oelm_model* mp = nullptr;
  CHECK_OK(oelm_model_load(model_path().c_str(), &o, &mp));
  ModelPtr m(mp);
  SessionPtr s = new_session(m.get());
  CHECK_EQ(oelm_session_max_context(s.get()), 64);
  o = oelm_model_options_default();
  o.kv_type = 7;
  CHECK_STATUS(oelm_model_load(model_path().c_str(), &o, &mp), OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "kv_type"));
  o = oelm_model_options_default();
  o.struct_size = 12;
  CHECK_STATUS(oelm_model_load(model_path().c_str(), &o, &mp), OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "oelm_model_options_default"));
}

// OELM_BACKEND_CUDA: a session on the GPU where this library has the backend and a device,
// otherwise a clear error; OELM_BACKEND_AUTO always gives a session (the CPU without CUDA).
TEST(cuda_backend_option) {
  oelm_model_options o = oelm_model_options_default();
  o.max_context = 64;
  o.backend = OELM_BACKEND_CUDA;
  oelm_model* mp = nullptr;
  CHECK_OK(oelm_model_load(model_path().c_str(), &o, &mp));
  ModelPtr m(mp);
  oelm_session* sp = nullptr;
  const oelm_status st = oelm_session_new(m.get(), &sp);
  if (st == OELM_OK) {
    oelm_session_free(sp);
  } else {
    CHECK_EQ(int(st), int(OELM_INVALID_ARGUMENT));
    CHECK(contains(oelm_last_error(), "cuda"));
    CHECK(contains(oelm_last_error(), "cpu") || contains(oelm_last_error(), "CUDA"));
  }
  o.backend = OELM_BACKEND_AUTO;
  CHECK_OK(oelm_model_load(model_path().c_str(), &o, &mp));
  ModelPtr m2(mp);
  SessionPtr s = new_session(m2.get());
  CHECK_EQ(oelm_session_max_context(s.get()), 64);
  o.backend = 3;
  CHECK_STATUS(oelm_model_load(model_path().c_str(), &o, &mp), OELM_INVALID_ARGUMENT);
  CHECK(contains(oelm_last_error(), "backend"));
  o = oelm_model_options_default();
  o.struct_size = offsetof(oelm_model_options, backend);  // a program built against 0.2.0's header
  CHECK_OK(oelm_model_load(model_path().c_str(), &o, &mp));
  ModelPtr m3(mp);
}

// The header compiles as C and a C program gets the same greedy tokens (c_usage.c).
TEST(usable_from_c) {
  const GenCase c = generate_cases()[0];
  std::vector<int32_t> got(size_t(c.max_new));
  const int n = c_greedy_tokens(model_path().c_str(), c.prompt.data(), c.prompt.size(), got.data(), c.max_new);
  CHECK_EQ(n, int(c.tokens.size()));
  got.resize(size_t(n));
  CHECK(got == c.tokens);
}

}  // namespace

// A file of token ids only (exported with --no-tokenizer; here also without q/k norms and with
// its own RMSNorm eps): ids in and out as in Python, text calls refused with a message.
TEST(token_id_only_model) {
  oelm_model* m = nullptr;
  CHECK_OK(oelm_model_load((data_dir() + "/noqk.oelm").c_str(), nullptr, &m));
  ModelPtr model(m);
  CHECK_EQ(oelm_model_has_tokenizer(m), 0);
  int32_t ids[8];
  size_t n = 0;
  CHECK_EQ(oelm_tokenize(m, "hello", size_t(-1), 1, ids, 8, &n), OELM_INVALID_ARGUMENT);
  CHECK(std::string(oelm_last_error()).find("has no tokenizer") != std::string::npos);
  char text[16];
  const int32_t one = 5;
  CHECK_EQ(oelm_detokenize(m, &one, 1, text, sizeof text, &n), OELM_INVALID_ARGUMENT);
  Reader r(data_dir() + "/noqk.bin");
  const std::vector<int32_t> prompt = r.ids(), want = r.ids();
  SessionPtr s = new_session(m);
  struct Pieces {
    std::vector<int32_t> tokens;
    bool all_empty = true;
    static int callback(void* user, int32_t token, const char* piece, size_t len) {
      auto* p = static_cast<Pieces*>(user);
      p->tokens.push_back(token);
      p->all_empty = p->all_empty && piece == nullptr && len == 0;
      return 0;
    }
  } got;
  CHECK_OK(oelm_session_generate(s.get(), prompt.data(), prompt.size(), int32_t(want.size()), &Pieces::callback,
                                 &got, nullptr));
  CHECK(got.tokens == want);
  CHECK(got.all_empty);
  CHECK_EQ(oelm_model_has_tokenizer(load(1).get()), 1);
}

// bf16 weights: options.exact 0 (the default) and positive multiply them by exact f32
// activations, negative by activations rounded to bf16 (bf16 dot products where the CPU has them;
// the default up to 0.3.1). With the kernels that made the fixture (make_fixtures.py: bf16.bin,
// the Python Session on one thread), each must equal its bits. With other kernels forced by
// OPENELM_RT_KERNELS (NEON under qemu) only the default = exact holds bitwise, and the exact
// logits agree with the fixture's to float rounding (a different summation order).
TEST(bf16_activations_exact_by_default) {
  Reader r(data_dir() + "/bf16.bin");
  const std::vector<int32_t> ids = r.ids();
  const std::string fixture_kernels = r.str();
  const size_t V = r.get<uint32_t>();
  const bool rounds = r.get<int32_t>() != 0;
  std::vector<float> want_exact(ids.size() * V), want_rounded(ids.size() * V);
  for (float& x : want_exact) x = r.get<float>();
  for (float& x : want_rounded) x = r.get<float>();
  auto logits = [&](int32_t exact) {
    oelm_model_options o = oelm_model_options_default();
    o.n_threads = 1;
    o.exact = exact;
    oelm_model* m = nullptr;
    CHECK_OK(oelm_model_load((data_dir() + "/model_bf16.oelm").c_str(), &o, &m));
    ModelPtr model(m);
    SessionPtr s = new_session(m);
    std::vector<float> got(ids.size() * V);
    CHECK_OK(oelm_session_eval(s.get(), ids.data(), ids.size(), got.data()));
    return got;
  };
  CHECK_EQ(oelm_model_options_default().exact, 0);
  const std::vector<float> dflt = logits(0);
  CHECK(logits(1) == dflt);
  const char* forced = std::getenv("OPENELM_RT_KERNELS");
  if (forced == nullptr || *forced == '\0' || fixture_kernels == forced) {
    CHECK(dflt == want_exact);  // same core, kernels and thread count: the same bits
    CHECK(logits(-1) == want_rounded);
    // And the two settings differ where the kernels round (else the checks above prove nothing).
    CHECK_EQ(want_exact != want_rounded, rounds);
  } else {
    float scale = 0, max_err = 0;
    for (size_t i = 0; i < dflt.size(); ++i) {
      scale = std::max(scale, std::fabs(want_exact[i]));
      max_err = std::max(max_err, std::fabs(dflt[i] - want_exact[i]));
    }
    if (!(max_err <= 1e-5f * scale))
      throw check::Failure("exact bf16 logits (kernels " + std::string(forced) + ") differ from the fixture's (" +
                           fixture_kernels + ") by " + std::to_string(max_err));
  }
}

// A corrupt file (tensor data with NaN; CRCs are checked only with verify): evaluating or
// generating from a prompt with the poisoned token is OELM_FORMAT_ERROR naming the check, the
// session unchanged; other prompts run. Under UBSan this also covers quantizing NaN
// activations for the q8 matmul (once a signed overflow in the tile's offset term).
TEST(non_finite_logits_are_a_format_error) {
  const std::string path = data_dir() + "/poisoned.oelm";
  oelm_model* m = nullptr;
  oelm_model_options vo = oelm_model_options_default();
  vo.verify = 1;
  CHECK_EQ(oelm_model_load(path.c_str(), &vo, &m), OELM_FORMAT_ERROR);
  CHECK(std::string(oelm_last_error()).find("token_embd") != std::string::npos);
  CHECK_OK(oelm_model_load(path.c_str(), nullptr, &m));
  ModelPtr model(m);
  SessionPtr s = new_session(m);
  const std::string hint = "openelm-rt info --verify " + path;
  const int32_t poisoned[] = {1, 5, 7, 300}, clean[] = {1, 5, 9, 300, 42};
  CHECK_EQ(oelm_session_eval(s.get(), poisoned, 4, nullptr), OELM_FORMAT_ERROR);
  std::string msg = oelm_last_error();
  CHECK(msg.find("non-finite logits") != std::string::npos);
  CHECK(msg.find(hint) != std::string::npos);
  CHECK_EQ(oelm_session_n_past(s.get()), 0);
  CHECK_EQ(oelm_session_generate(s.get(), poisoned, 4, 4, nullptr, nullptr, nullptr), OELM_FORMAT_ERROR);
  msg = oelm_last_error();
  CHECK(msg.find("non-finite logits") != std::string::npos);
  CHECK(msg.find(hint) != std::string::npos);
  oelm_generate_result r = oelm_generate_result_init();
  CHECK_OK(oelm_session_generate(s.get(), clean, 5, 4, nullptr, nullptr, &r));
  CHECK_EQ(r.n_generated, 4);
}

int main(int argc, char** argv) { return check::main(argc, argv); }
