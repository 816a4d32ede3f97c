// Generator: prefill / decode-one; timing covers model evaluation and sampling.
#include "generate/generator.h"

#include <chrono>

#include "common/error.h"

namespace oelm {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::none: return "";
    case FinishReason::eos: return "eos";
    case FinishReason::length: return "length";
    case FinishReason::context: return "context";
  }
  return "";
}

namespace {
double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

Generator::Generator(Context& ctx, const SamplingParams& sampling, int64_t max_new_tokens)
    : ctx_(ctx), sampler_(sampling), max_new_(max_new_tokens) {
  if (max_new_tokens < 0)
    throw InvalidArgument("max_new_tokens must be >= 0, got " + std::to_string(max_new_tokens));
}

void Generator::start(const std::vector<int32_t>& prompt, const InterruptFn& interrupt) {
  if (prompt.empty()) throw InvalidArgument("the prompt is empty; pass at least one token (e.g. BOS)");
  if (int64_t(prompt.size()) >= ctx_.max_context() && max_new_ > 0)
    throw InvalidArgument("the prompt has " + std::to_string(prompt.size()) +
                          " tokens but max_context is " + std::to_string(ctx_.max_context()) +
                          ", leaving no room for a new token; shorten the prompt or raise max_context");
  if (int64_t(prompt.size()) > ctx_.max_context())
    throw InvalidArgument("the prompt has " + std::to_string(prompt.size()) + " tokens, more than max_context " +
                          std::to_string(ctx_.max_context()));
  ctx_.reset();
  history_ = prompt;
  n_prompt_ = int64_t(prompt.size());
  n_generated_ = n_decoded_ = 0;
  decode_s_ = 0;
  pending_ = -1;
  finish_ = FinishReason::none;
  logits_.resize(size_t(ctx_.model().config().vocab_size));
  started_ = true;
  const double t0 = now();
  ctx_.eval(prompt.data(), int64_t(prompt.size()), false, logits_.data(), interrupt);
  prefill_s_ = now() - t0;
}

bool Generator::done() const {
  // The sequence (prompt + generated) filling the context ends it too.
  return finish_ != FinishReason::none || n_generated_ >= max_new_ ||
         int64_t(history_.size()) >= ctx_.max_context();
}

int32_t Generator::next(const InterruptFn& interrupt) {
  if (!started_) throw InvalidArgument("Generator::next called before start");
  if (done()) {
    if (finish_ == FinishReason::none)
      finish_ = n_generated_ >= max_new_ ? FinishReason::length : FinishReason::context;
    return -1;
  }
  const double t0 = now();
  if (pending_ >= 0) {  // n_past == history size - 1 < max_context: there is room for it
    ctx_.eval(&pending_, 1, false, logits_.data(), interrupt);
    pending_ = -1;
    ++n_decoded_;
  }
  const int32_t tok = sampler_.sample(logits_.data(), int64_t(logits_.size()), history_);
  decode_s_ += now() - t0;
  history_.push_back(tok);
  ++n_generated_;
  if (tok == ctx_.model().config().eos_token_id) finish_ = FinishReason::eos;
  else pending_ = tok;
  return tok;
}

}  // namespace oelm
