// The text a generation adds after its prompt, piece by piece, with stop strings: tokens go
// through a StreamDecoder that has seen the prompt (so the first piece keeps the space it has
// after the prompt, and bytes the prompt leaves unfinished stay the prompt's), pieces never
// end inside a UTF-8 character or a possible stop string, and the text is cut before the first
// stop string. The concatenation of the pieces is text().
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace oelm {

class TextStream {
 public:
  // stops: non-empty strings (checked by the caller).
  TextStream(const Tokenizer& tok, const int32_t* prompt, int64_t n_prompt, std::vector<std::string> stops);

  // Adds a generated token; returns the text that became safe to emit. Sets *stopped when a
  // stop string appeared: the text then ends before it and nothing more may be pushed.
  std::string push(int32_t token, bool* stopped);

  // The generation ended for another reason: the held bytes (an unfinished character becomes
  // U+FFFD) and held-back text; a stop string may still be found in them (*stopped).
  std::string finish(bool* stopped);

  const std::string& text() const { return text_; }

 private:
  std::string emit(bool final, bool* stopped);

  StreamDecoder dec_;
  std::vector<std::string> stops_;
  size_t holdback_ = 0;  // bytes: a stop string could still start within the last holdback_ bytes
  std::string text_;
  size_t emitted_ = 0;
  bool done_ = false;
};

}  // namespace oelm
