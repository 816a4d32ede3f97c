// Speculative generation with prompt lookup, for the C API (python/openelm_rt/speculative.py
// is the reference and has the assistant model, the n-gram cache and batches too).
//
// Prompt lookup proposes the continuation of the left-most earlier occurrence of the
// sequence's last n tokens (Hugging Face's PromptLookupCandidateGenerator); one Runtime step
// over the last token and the k proposals returns k + 1 rows of logits, each sampled as plain
// generation samples it; proposals are kept while they match and the sequence is truncated to
// what was kept. A row's logits do not depend on the rest of its step, so greedy output (and
// seeded sampling) is the plain generation's, token for token.
//
// The adaptive mode checks the k that maximises expected tokens per unit of time, from the
// measured time of an n-token step and the running acceptance rate, and 0 (a plain step) when
// speculation would not pay; the HF mode checks every proposal.
#pragma once
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "engine/runtime.h"
#include "generate/sampler.h"
#include "tokenizer/tokenizer.h"

namespace oelm {

// Hugging Face's rule, O(1) per step: the first start of every n-gram (n <= max_ngram) is
// kept as tokens are appended, and the left-most occurrence of the suffix is that first start.
class PromptLookup {
 public:
  PromptLookup(int32_t max_ngram, int32_t eos);
  void push(int32_t token);
  // Up to num_tokens proposed tokens (never past the end of the sequence, cut before an EOS).
  std::vector<int32_t> propose(int64_t num_tokens) const;

 private:
  std::string key(int64_t start, int32_t n) const;
  int32_t max_ngram_, eos_;
  std::vector<int32_t> tokens_;
  std::vector<std::unordered_map<std::string, int64_t>> first_;  // [n - 1]: n-gram -> first start
};

// The most tokens the adaptive mode checks per step; the cost curve has one entry per step
// size 1 .. kSpecMaxTokens + 1.
constexpr int32_t kSpecMaxTokens = 16;

// Seconds of a step of n = 1 .. kSpecMaxTokens + 1 tokens on a fork of seq (its context),
// measured at a few sizes (fastest of two runs) and interpolated; non-decreasing.
std::vector<double> measure_cost_curve(Runtime& rt, int32_t seq, int32_t token, const InterruptFn& interrupt);

// Chooses how many proposals to check: k maximising E(k) / C(k), E(k) = 1 + a + ... + a^k with
// a the decayed acceptance rate (prior 1/2), C(k) = t(k + 1) / t(1); 0 below a 3 % gain.
class SpecController {
 public:
  explicit SpecController(std::vector<double> curve) : curve_(std::move(curve)) {}
  int32_t choose(int32_t kmax) const;
  void observe(int64_t accepted, bool rejected);

 private:
  std::vector<double> curve_;
  double acc_ = 1.0, rej_ = 1.0;
};

struct SpecOptions {
  int32_t prompt_lookup_num_tokens = 10;
  int32_t max_matching_ngram_size = 2;
  bool adaptive = true;
};

struct SpecStats {
  int64_t proposed = 0, accepted = 0, steps = 0, verify_steps = 0;
  double calibration_seconds = 0.0;
};

enum class SpecFinish { none, eos, length, context, stop, callback };

struct SpecResult {
  SpecFinish finish = SpecFinish::none;
  std::vector<int32_t> tokens;  // prompt and generated tokens
  int64_t n_generated = 0;
  double prefill_seconds = 0.0, decode_seconds = 0.0;
  SpecStats stats;
};

// Called per generated token with its text piece (empty without a tokenizer); false stops
// the generation after this token.
using SpecTokenFn = std::function<bool(int32_t token, const std::string& piece)>;

// Generates a continuation of prompt on sequence seq, which holds a prefix of the prompt
// (n_past tokens, at most prompt.size() - 1). Afterwards seq holds every token but the last.
// rt_mutex (may be null) is held around each use of the Runtime; curve caches the measured
// cost curve across calls (measured when empty, in the adaptive mode).
SpecResult speculative_generate(Runtime& rt, int32_t seq, const std::vector<int32_t>& prompt, int64_t max_new_tokens,
                                const SamplingParams& sampling, const Tokenizer* tokenizer, const SpecOptions& opts,
                                std::vector<double>& curve, const SpecTokenFn& on_token, const InterruptFn& interrupt,
                                std::mutex* rt_mutex);

}  // namespace oelm
