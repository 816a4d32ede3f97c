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
#include <fstream>
#include <iterator>
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
  // The exporter writes the newest versions; the library must read exactly those.
  const std::string file = read_file(model_path());
  uint32_t fmt, names;
  std::memcpy(&fmt, file.data() + 8, 4);
  std::memcpy(&names, file.data() + 12, 4);
  CHECK_EQ(oelm_format_version(), fmt);
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

int main(int argc, char** argv) { return check::main(argc, argv); }
