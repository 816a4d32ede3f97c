// libFuzzer target: arbitrary bytes as a SentencePiece tokenizer.model through the native
// tokenizer's protobuf reader and validation (Tokenizer::from_sentencepiece). It loads or
// throws FormatError; a loaded vocabulary then encodes and decodes a fixed text (invalid
// UTF-8 included) and every id, so whatever the validation let through is exercised.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/error.h"
#include "tokenizer/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::unique_ptr<oelm::Tokenizer> tok;
  try {
    tok = oelm::Tokenizer::from_sentencepiece(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz");
  } catch (const oelm::FormatError&) {
    return 0;
  }
  static const char kText[] = " Hello  w\xc3\xb6rld\n\xe2\x96\x81x \xff\xc3( \xf0\x9f\x99\x82 <s>a</s>";
  const std::vector<int32_t> ids = tok->encode(std::string_view(kText, sizeof kText - 1), true);
  for (int32_t id : ids)
    if (id < 0 || id >= tok->vocab_size()) __builtin_trap();  // encode gave an id outside the vocabulary
  std::vector<int32_t> all;
  for (int32_t i = 0; i < tok->vocab_size() && i < 4096; ++i) all.push_back(i);
  (void)tok->decode(ids.data(), ids.size());
  const std::string whole = tok->decode(all.data(), all.size());
  oelm::StreamDecoder sd(*tok);
  std::string streamed;
  for (int32_t id : all) sd.push_into(id, streamed);
  sd.flush_into(streamed);
  if (streamed != whole) __builtin_trap();  // tokenizer.h: the pieces join to decode()'s text
  return 0;
}
