// libFuzzer target: arbitrary bytes as a .oelm file through oelm_model_load (header, metadata
// JSON, tensor table, every dtype's size rules, the stored tokenizer), then, when it loads,
// what a caller does next: tokenize (invalid UTF-8 included), detokenize, and a 3-token eval
// (the forward pass on whatever the tensors hold: NaN and inf included).
// The harness recomputes the header's metadata CRC and file size after each mutation, or
// almost every mutation would stop at those two checks (tests/test_loader.py covers them);
// tensor CRCs are checked when the input's length is odd (verify).
// A failed load must say why (a non-empty oelm_last_error); anything but OELM_OK or
// OELM_FORMAT_ERROR / OELM_INVALID_ARGUMENT from the calls is a finding.
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

#include "format/oelm_file.h"

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
    expect_clean(oelm_session_eval(s, tokens, 3, nullptr), "oelm_session_eval");
    oelm_session_free(s);
  }
  oelm_model_free(m);
  return 0;
}
