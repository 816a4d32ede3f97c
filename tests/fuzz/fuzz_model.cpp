// libFuzzer target: arbitrary bytes as a .oelm file through oelm_model_load (header, metadata
// JSON, tensor table, every dtype's size rules, the stored tokenizer), then, when it loads,
// what a caller does next: tokenize (invalid UTF-8 included), detokenize, and a 3-token eval
// (the forward pass on whatever the tensors hold: NaN and inf included).
// The harness recomputes the header's metadata CRC and file size after each mutation, or
// almost every mutation would stop at those two checks (tests/test_loader.py covers them);
// tensor CRCs are checked when the input's length is odd (verify).
// A failed load must say why (a non-empty oelm_last_error); anything but OELM_OK or
// OELM_FORMAT_ERROR / OELM_INVALID_ARGUMENT from the calls is a finding.
// Under a memory budget (csrc/model/streaming.h): every file that loads (flash layout or not)
// is also run through the core's Runtime at the smallest budget its memory plan allows (the
// most streamed: with 3 or more layers a tail of bundles, or whole FFN matrices, read from the
// file at every step):
// its 3-token eval must end as the resident run's does (the same logits bit for bit, or the
// same non-finite-logits error), the plan must fit its budget, and one byte less must be
// refused with InvalidArgument.
#include <openelm_rt/openelm_rt.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/error.h"
#include "engine/runtime.h"
#include "format/oelm_file.h"
#include "model/backend.h"
#include "model/model.h"

namespace {

[[noreturn]] void finding(const char* what, oelm_status st) {
  std::fprintf(stderr, "fuzz_model: %s returned %s: %s\n", what, oelm_status_name(st), oelm_last_error());
  std::abort();
}

// Statuses a bad file may give; anything else (OELM_INTERNAL, OELM_OUT_OF_MEMORY) is a finding.
void expect_clean(oelm_status st, const char* what) {
  if (st == OELM_OK || st == OELM_FORMAT_ERROR || st == OELM_INVALID_ARGUMENT || st == OELM_BUFFER_TOO_SMALL)
    return;
  finding(what, st);
}

uint64_t le64(const std::string& b, size_t at) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | uint8_t(b[at + size_t(i)]);
  return v;
}
void put_le(std::string& b, size_t at, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) b[at + size_t(i)] = char(uint8_t(v >> (8 * i)));
}

// FORMAT.md's header: metadata_offset at 16, metadata_size at 24, metadata_crc32 at 52, file_size at 56.
void fix_header(std::string& b) {
  if (b.size() < 64) return;
  const uint64_t off = le64(b, 16), size = le64(b, 24);
  if (off <= b.size() && size <= b.size() - off)
    put_le(b, 52, oelm::crc32(reinterpret_cast<const uint8_t*>(b.data()) + off, size_t(size)), 4);
  put_le(b, 56, b.size(), 8);
}

[[noreturn]] void finding(const std::string& what) {
  std::fprintf(stderr, "fuzz_model: %s\n", what.c_str());
  std::abort();
}

// A Runtime's 3-token eval: its logits, or the FormatError it threw (non-finite logits, which
// it refuses naming the position).
struct Outcome {
  std::vector<float> logits;
  std::string error;
};

// A new Runtime on `model` with this memory budget (0: none), its plan copied to *plan.
Outcome runtime_eval(const std::shared_ptr<const oelm::Model>& model, const std::shared_ptr<oelm::Backend>& backend,
                     int64_t budget, const int32_t (&tokens)[3], oelm::MemoryPlan* plan) {
  oelm::RuntimeOptions ro;
  ro.max_context = 8;
  ro.budget_sequences = 1;
  ro.memory_budget_bytes = budget;
  ro.stream.io = "buffered";  // the memfd refuses O_DIRECT
  ro.stream.io_threads = 1;
  oelm::Runtime rt(model, backend, ro);
  if (plan && rt.memory_plan()) *plan = *rt.memory_plan();
  const std::vector<oelm::Runtime::EvalEntry> entries = {{rt.seq_new(), tokens, 3, oelm::Runtime::Logits::all}};
  Outcome o;
  o.logits.resize(size_t(oelm::Runtime::logit_rows(entries) * model->config().vocab_size));
  try {
    rt.eval(entries, o.logits.data());
  } catch (const oelm::FormatError& e) {
    o.logits.clear();
    o.error = e.what();
  }
  if (budget > 0 && rt.memory_plan()->streams() && (!rt.streamer() || rt.streamer()->stats().layers_streamed == 0))
    finding("the plan streams but the forward pass read no layer");
  return o;
}

void check_streamed(const std::string& path, const int32_t (&tokens)[3]) {
  try {
    std::shared_ptr<const oelm::Model> model = oelm::Model::load(path, false);
    std::shared_ptr<oelm::Backend> backend = oelm::Backend::create("cpu", 1);
    const Outcome resident = runtime_eval(model, backend, 0, tokens, nullptr);
    oelm::MemoryPlan plan;
    runtime_eval(model, backend, int64_t(1) << 40, tokens, &plan);
    const int64_t minimum = plan.minimum;
    if (minimum <= 0 || minimum > plan.total()) finding("memory plan minimum " + std::to_string(minimum));
    const Outcome streamed = runtime_eval(model, backend, minimum, tokens, &plan);
    if (plan.budget != minimum || plan.total() > minimum)
      finding("the plan at the minimum budget " + std::to_string(minimum) + " takes " + std::to_string(plan.total()));
    if (streamed.error != resident.error)
      finding("under the minimum memory budget the eval ended with \"" + streamed.error + "\", resident with \"" +
              resident.error + "\"");
    if (streamed.logits.size() != resident.logits.size() ||
        std::memcmp(streamed.logits.data(), resident.logits.data(), resident.logits.size() * sizeof(float)) != 0)
      finding("the logits under the minimum memory budget (" + std::to_string(plan.streamed_bytes) +
              " bytes streamed per step) differ from the resident run's");
    try {
      runtime_eval(model, backend, minimum - 1, tokens, nullptr);
      finding("a memory budget one byte below the minimum was accepted");
    } catch (const oelm::InvalidArgument& e) {
      if (!std::strstr(e.what(), "minimum")) finding(std::string("below the minimum, the error: ") + e.what());
    }
  } catch (const std::exception& e) {
    finding(std::string("the core's Runtime on a file the C API loaded and ran: ") + e.what());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const int fd = memfd_create("fuzz_model.oelm", 0);
  static const std::string path = "/proc/self/fd/" + std::to_string(fd);
  if (fd < 0) {
    std::perror("memfd_create");
    std::abort();
  }
  std::string bytes(reinterpret_cast<const char*>(data), size);
  fix_header(bytes);
  if (ftruncate(fd, 0) != 0 || pwrite(fd, bytes.data(), bytes.size(), 0) != ssize_t(bytes.size())) {
    std::perror("fuzz_model: writing the memfd");
    std::abort();
  }

  oelm_model_options o = oelm_model_options_default();
  o.n_threads = 1;
  o.max_context = 8;
  o.max_batch = 1;
  o.prefix_cache = -1;
  o.verify = int32_t(size & 1);
  oelm_model* m = nullptr;
  const oelm_status st = oelm_model_load(path.c_str(), &o, &m);
  if (st != OELM_OK) {
    if (st != OELM_FORMAT_ERROR && st != OELM_FILE_NOT_FOUND) finding("oelm_model_load", st);
    if (!*oelm_last_error()) finding("oelm_model_load (with an empty message)", st);
    return 0;
  }
  const int32_t V = oelm_model_vocab_size(m);
  if (V <= 0) finding("oelm_model_vocab_size <= 0 after a successful load", OELM_OK);

  if (oelm_model_has_tokenizer(m)) {
    static const char kText[] = "Hello w\xc3\xb6rld \xe2\x96\x81\xe2\x96\x81 \xff\xfe\xc3 <s></s><unk> \xf0\x9f\x99\x82\n\t";
    std::vector<int32_t> ids(256);
    size_t n = 0;
    expect_clean(oelm_tokenize(m, kText, sizeof kText - 1, 1, ids.data(), ids.size(), &n), "oelm_tokenize");
    ids.resize(std::min(n, ids.size()));
    for (int32_t i = 0; i < V && i < 300; ++i) ids.push_back(i);  // every kind of piece: bytes, controls
    std::vector<char> text(1 << 16);
    size_t len = 0;
    expect_clean(oelm_detokenize(m, ids.data(), ids.size(), text.data(), text.size(), &len), "oelm_detokenize");
  }

  oelm_session* s = nullptr;
  const oelm_status ss = oelm_session_new(m, &s);
  expect_clean(ss, "oelm_session_new");
  if (ss == OELM_OK) {
    const int32_t tokens[3] = {oelm_model_bos_token(m) >= 0 && oelm_model_bos_token(m) < V ? oelm_model_bos_token(m) : 0,
                               1 % V, V - 1};
    const oelm_status es = oelm_session_eval(s, tokens, 3, nullptr);
    expect_clean(es, "oelm_session_eval");
    oelm_session_free(s);
    if (es == OELM_OK || es == OELM_FORMAT_ERROR) check_streamed(path, tokens);
  }
  oelm_model_free(m);
  return 0;
}
