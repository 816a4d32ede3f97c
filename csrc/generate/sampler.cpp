// Sampler implementation. Each filter reproduces the matching transformers logits
// processor (RepetitionPenalty, Temperature, TopK, TopP, MinP LogitsWarper/Processor,
// v4.39-4.44) including its tie and "keep at least one token" rules.
#include "generate/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

#include "common/error.h"

namespace oelm {

void validate(const SamplingParams& p) {
  auto num = [](float v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", double(v));
    return std::string(buf);
  };
  if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature))
    throw InvalidArgument("temperature must be >= 0 (0 = greedy), got " + num(p.temperature));
  if (p.top_k < 0) throw InvalidArgument("top_k must be >= 0 (0 = off), got " + std::to_string(p.top_k));
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f))
    throw InvalidArgument("top_p must be in (0, 1] (1 = off), got " + num(p.top_p));
  if (!(p.min_p >= 0.0f && p.min_p <= 1.0f))
    throw InvalidArgument("min_p must be in [0, 1] (0 = off), got " + num(p.min_p));
  if (!(p.repetition_penalty > 0.0f) || !std::isfinite(p.repetition_penalty))
    throw InvalidArgument("repetition_penalty must be > 0 (1 = off), got " + num(p.repetition_penalty));
}

namespace {
uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
}  // namespace

Rng::Rng(uint64_t seed) {
  for (auto& s : s_) s = splitmix64(seed);
}

uint64_t Rng::next() {
  const uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

double Rng::uniform() { return double(next() >> 11) * 0x1.0p-53; }

Sampler::Sampler(const SamplingParams& p) : p_(p), rng_(p.seed) { validate(p); }

int32_t Sampler::process(const float* logits, int64_t V, const std::vector<int32_t>& history) {
  scores_.assign(logits, logits + V);
  // Repetition penalty: once per distinct id in the sequence; s<0 -> s*p, else s/p.
  if (p_.repetition_penalty != 1.0f) {
    seen_.assign(size_t(V), 0);
    for (int32_t id : history) {
      if (id < 0 || id >= V || seen_[size_t(id)]) continue;
      seen_[size_t(id)] = 1;
      float& s = scores_[size_t(id)];
      s = s < 0 ? s * p_.repetition_penalty : s / p_.repetition_penalty;
    }
  }
  if (p_.temperature == 0.0f)
    return int32_t(std::max_element(scores_.begin(), scores_.end()) - scores_.begin());

  const float inv_t = 1.0f / p_.temperature;
  if (p_.temperature != 1.0f)
    for (float& s : scores_) s *= inv_t;

  // Top-k: drop scores strictly below the k-th largest (ties with it survive).
  if (p_.top_k > 0 && p_.top_k < V) {
    std::vector<float> tmp(scores_);
    std::nth_element(tmp.begin(), tmp.begin() + (p_.top_k - 1), tmp.end(), std::greater<float>());
    const float kth = tmp[size_t(p_.top_k - 1)];
    for (float& s : scores_)
      if (s < kth) s = -INFINITY;
  }

  // Top-p: sort ascending, drop tokens whose cumulative probability is <= 1 - top_p;
  // the most likely token always survives.
  if (p_.top_p < 1.0f) {
    order_.clear();
    for (int64_t i = 0; i < V; ++i)
      if (scores_[size_t(i)] != -INFINITY) order_.push_back(int32_t(i));
    std::stable_sort(order_.begin(), order_.end(),
                     [&](int32_t a, int32_t b) { return scores_[size_t(a)] < scores_[size_t(b)]; });
    const double mx = scores_[size_t(order_.back())];
    double z = 0;
    for (int32_t i : order_) z += std::exp(double(scores_[size_t(i)]) - mx);
    double cum = 0;
    for (size_t r = 0; r + 1 < order_.size(); ++r) {
      cum += std::exp(double(scores_[size_t(order_[r])]) - mx) / z;
      if (cum <= 1.0 - double(p_.top_p)) scores_[size_t(order_[r])] = -INFINITY;
      else break;  // cumulative sums only grow: everything after stays
    }
  }

  // Min-p: drop tokens whose probability is below min_p times the top probability.
  if (p_.min_p > 0.0f) {
    const float mx = *std::max_element(scores_.begin(), scores_.end());
    // p_i / p_max = exp(s_i - s_max); compare in log space to avoid the normaliser.
    const double log_thr = std::log(double(p_.min_p));
    for (float& s : scores_)
      if (s != -INFINITY && double(s) - double(mx) < log_thr) s = -INFINITY;
  }
  return -1;
}

double Sampler::weights() {
  const float mx = *std::max_element(scores_.begin(), scores_.end());
  work_.resize(scores_.size());
  double z = 0;
  for (size_t i = 0; i < scores_.size(); ++i) z += (work_[i] = std::exp(double(scores_[i]) - mx));
  return z;
}

void Sampler::probs(const float* logits, int64_t V, const std::vector<int32_t>& history,
                    std::vector<float>& out) {
  out.assign(size_t(V), 0.0f);
  const int32_t greedy = process(logits, V, history);
  if (greedy >= 0) {
    out[size_t(greedy)] = 1.0f;
    return;
  }
  const double z = weights();
  for (int64_t i = 0; i < V; ++i) out[size_t(i)] = float(work_[size_t(i)] / z);
}

int32_t Sampler::sample(const float* logits, int64_t V, const std::vector<int32_t>& history) {
  const int32_t greedy = process(logits, V, history);
  if (greedy >= 0) return greedy;
  const double u = rng_.uniform() * weights();
  double cum = 0;
  for (int64_t i = 0; i < V; ++i) {
    cum += work_[size_t(i)];
    if (cum > u) return int32_t(i);
  }
  // u landed in the rounding slack at the very top: take the last token still allowed.
  int64_t last = V - 1;
  while (last > 0 && work_[size_t(last)] == 0) --last;
  return int32_t(last);
}

}  // namespace oelm
