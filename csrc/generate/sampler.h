// Token sampling with Hugging Face `generate` semantics: repetition penalty, then
// temperature, top-k, top-p, min-p (in HF's processor order), then a seeded draw.
// temperature == 0 is greedy (argmax of the penalised logits, first index on ties).
#pragma once
#include <cstdint>
#include <vector>

namespace oelm {

struct SamplingParams {
  float temperature = 0.0f;         // 0 = greedy
  int32_t top_k = 0;                // 0 = off
  float top_p = 1.0f;               // 1 = off; must be in (0, 1]
  float min_p = 0.0f;               // 0 = off; must be in [0, 1]
  float repetition_penalty = 1.0f;  // 1 = off; must be > 0
  uint64_t seed = 0;
};

// Throws InvalidArgument naming the first out-of-range field and its value.
void validate(const SamplingParams& p);

// xoshiro256** seeded through splitmix64: fast, and identical on every platform.
class Rng {
 public:
  explicit Rng(uint64_t seed);
  uint64_t next();
  double uniform();  // [0, 1), 53 random bits
 private:
  uint64_t s_[4];
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p);

  // The distribution that sample() draws from, written to probs[0..V) (one-hot when greedy).
  // `history` is every token of the sequence so far (prompt included), for the penalty.
  void probs(const float* logits, int64_t V, const std::vector<int32_t>& history, std::vector<float>& probs);

  int32_t sample(const float* logits, int64_t V, const std::vector<int32_t>& history);

  // A uniform draw in [0, 1) from this sampler's own generator (the speculative verifier's
  // accept/reject coin, so one seed drives the whole generation).
  double uniform() { return rng_.uniform(); }

 private:
  // Fills scores_ with the processed logits; -inf marks removed tokens.
  // Returns the argmax when greedy, else -1.
  int32_t process(const float* logits, int64_t V, const std::vector<int32_t>& history);
  // work_[i] = exp(scores_[i] - max), the unnormalised distribution; returns its sum.
  double weights();

  SamplingParams p_;
  Rng rng_;
  std::vector<float> scores_;
  std::vector<int32_t> order_;
  std::vector<double> work_;
  std::vector<uint8_t> seen_;
};

}  // namespace oelm
