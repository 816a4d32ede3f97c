// libFuzzer target: the tokenizer's encode and decode on arbitrary bytes, with a real
// vocabulary: the SentencePiece model in $OELM_FUZZ_TOKENIZER (.ci/hardening.sh and
// tests/fuzz/make_seeds.py make one; the LLaMA-2 tokenizer.model for a long campaign).
// The input is text to encode (invalid UTF-8 included, with and without BOS), and, read as
// little-endian 16-bit numbers modulo the vocabulary size, ids to decode at once and
// through the StreamDecoder. Checks the header's promises: encode gives ids inside the
// vocabulary, and the streamed pieces join to exactly decode()'s text.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/error.h"
#include "tokenizer/tokenizer.h"

namespace {
std::unique_ptr<oelm::Tokenizer> g_tok;
}

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* path = std::getenv("OELM_FUZZ_TOKENIZER");
  if (!path || !*path) {
    std::fprintf(stderr, "fuzz_tokenizer: set OELM_FUZZ_TOKENIZER to a SentencePiece tokenizer.model "
                         "(python3 tests/fuzz/make_seeds.py DIR writes DIR/tokenizer.model)\n");
    std::exit(2);
  }
  std::ifstream f(path, std::ios::binary);
  const std::string blob((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  try {
    g_tok = oelm::Tokenizer::from_sentencepiece(blob, path);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fuzz_tokenizer: %s\n", e.what());
    std::exit(2);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const oelm::Tokenizer& tok = *g_tok;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  for (bool bos : {false, true})
    for (int32_t id : tok.encode(text, bos))
      if (id < 0 || id >= tok.vocab_size()) __builtin_trap();
  std::vector<int32_t> ids;
  for (size_t i = 0; i + 1 < size; i += 2) ids.push_back(int32_t((data[i] | (data[i + 1] << 8)) % tok.vocab_size()));
  const std::string whole = tok.decode(ids.data(), ids.size());
  oelm::StreamDecoder sd(tok);
  std::string streamed;
  for (int32_t id : ids) sd.push_into(id, streamed);
  sd.flush_into(streamed);
  if (streamed != whole) __builtin_trap();  // tokenizer.h: the pieces join to decode()'s text
  try {
    const int32_t bad = tok.vocab_size();
    (void)tok.decode(&bad, 1);
    __builtin_trap();  // an id outside the vocabulary must be refused
  } catch (const oelm::InvalidArgument&) {
  }
  return 0;
}
