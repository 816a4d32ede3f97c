// TextStream (text_stream.h).
#include "generate/text_stream.h"

#include <algorithm>

namespace oelm {

TextStream::TextStream(const Tokenizer& tok, const int32_t* prompt, int64_t n_prompt, std::vector<std::string> stops)
    : dec_(tok), stops_(std::move(stops)) {
  for (int64_t i = 0; i < n_prompt; ++i) dec_.push(prompt[i]);
  dec_.flush();  // bytes the prompt leaves unfinished stay its own
  for (const std::string& s : stops_) holdback_ = std::max(holdback_, s.size() - 1);
}

std::string TextStream::emit(bool final, bool* stopped) {
  *stopped = false;
  // A stop string can only start at or after the first byte not yet emitted minus the
  // longest stop's length - 1 (earlier starts were ruled out when those bytes were emitted).
  const size_t from = emitted_ > holdback_ ? emitted_ - holdback_ : 0;
  size_t cut = std::string::npos;
  for (const std::string& s : stops_) cut = std::min(cut, text_.find(s, from));
  if (cut != std::string::npos) {
    text_.resize(cut);
    *stopped = true;
    done_ = true;
    final = true;
  }
  size_t safe = final ? text_.size() : (text_.size() > holdback_ ? text_.size() - holdback_ : 0);
  // Never split a UTF-8 character (continuation bytes are 10xxxxxx).
  while (safe > emitted_ && safe < text_.size() && (static_cast<unsigned char>(text_[safe]) & 0xC0) == 0x80) --safe;
  if (safe <= emitted_) return std::string();
  std::string piece = text_.substr(emitted_, safe - emitted_);
  emitted_ = safe;
  return piece;
}

std::string TextStream::push(int32_t token, bool* stopped) {
  if (done_) {
    *stopped = true;
    return std::string();
  }
  dec_.push_into(token, text_);
  return emit(false, stopped);
}

std::string TextStream::finish(bool* stopped) {
  if (done_) {
    *stopped = false;
    return std::string();
  }
  dec_.flush_into(text_);
  std::string piece = emit(true, stopped);
  done_ = true;
  return piece;
}

}  // namespace oelm
