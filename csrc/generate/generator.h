// The decode loop, as two small steps: start() prefills the prompt in one batched
// pass; next() evaluates the previous token (if any), samples one and reports why
// generation ended. Stop strings are text-level and live in the caller.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "generate/sampler.h"
#include "model/model.h"

namespace oelm {

enum class FinishReason { none, eos, length, context };
const char* finish_reason_name(FinishReason r);

class Generator {
 public:
  // max_new_tokens >= 0. The sequence (prompt + new tokens) never exceeds the
  // context's max_context.
  Generator(Context& ctx, const SamplingParams& sampling, int64_t max_new_tokens);

  // Resets the context and prefills `prompt` (1 <= size < max_context).
  void start(const std::vector<int32_t>& prompt, const InterruptFn& interrupt = {});

  // Returns the next token, or -1 once generation has finished (see finish_reason()).
  // An EOS token is returned, then the following call returns -1.
  int32_t next(const InterruptFn& interrupt = {});

  // Whether generation has ended: the next call to next() returns -1 without evaluating.
  // True right after next() returned the last token (so a streaming caller can flush).
  bool done() const;

  FinishReason finish_reason() const { return finish_; }
  const std::vector<int32_t>& tokens() const { return history_; }  // prompt + generated
  int64_t n_prompt() const { return n_prompt_; }
  int64_t n_generated() const { return n_generated_; }
  int64_t n_decoded() const { return n_decoded_; }  // tokens evaluated after the prompt
  double prefill_seconds() const { return prefill_s_; }
  double decode_seconds() const { return decode_s_; }

 private:
  Context& ctx_;
  Sampler sampler_;
  int64_t max_new_;
  std::vector<float> logits_;
  std::vector<int32_t> history_;
  int32_t pending_ = -1;  // sampled but not yet evaluated
  FinishReason finish_ = FinishReason::none;
  bool started_ = false;
  int64_t n_prompt_ = 0, n_generated_ = 0, n_decoded_ = 0;
  double prefill_s_ = 0, decode_s_ = 0;
};

}  // namespace oelm
