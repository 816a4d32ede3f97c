#include "generate/speculative.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <memory>

#include "common/error.h"
#include "generate/text_stream.h"

namespace oelm {

namespace {
// Step sizes (tokens) of the cost curve that are measured; the rest is interpolated.
constexpr int32_t kCurvePoints[] = {1, 2, 3, 5, 9, 17};
constexpr double kMinGain = 1.03;  // speculate only when the expected gain is at least this
constexpr double kDecay = 0.95;    // acceptance statistics decay per observation

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Holds rt_mutex (when given) for the lifetime of the guard.
struct MaybeLock {
  explicit MaybeLock(std::mutex* m) : lk(m ? std::unique_lock<std::mutex>(*m) : std::unique_lock<std::mutex>()) {}
  std::unique_lock<std::mutex> lk;
};
}  // namespace

// ---------------------------------------------------------------------------- prompt lookup

PromptLookup::PromptLookup(int32_t max_ngram, int32_t eos) : max_ngram_(max_ngram), eos_(eos) {
  if (max_ngram < 1) throw InvalidArgument("max_matching_ngram_size must be >= 1, got " + std::to_string(max_ngram));
  first_.resize(size_t(max_ngram));
}

std::string PromptLookup::key(int64_t start, int32_t n) const {
  return std::string(reinterpret_cast<const char*>(tokens_.data() + start), size_t(n) * sizeof(int32_t));
}

void PromptLookup::push(int32_t token) {
  tokens_.push_back(token);
  const int64_t L = int64_t(tokens_.size());
  for (int32_t n = 1; n <= max_ngram_ && n <= L; ++n) first_[size_t(n - 1)].emplace(key(L - n, n), L - n);
}

std::vector<int32_t> PromptLookup::propose(int64_t num_tokens) const {
  const int64_t L = int64_t(tokens_.size());
  for (int64_t n = std::min<int64_t>(max_ngram_, L - 1); n >= 1; --n) {
    const int64_t i = first_[size_t(n - 1)].at(key(L - n, int32_t(n)));
    if (i < L - n) {  // an earlier occurrence than the suffix itself: the first n that matches wins
      std::vector<int32_t> out;
      for (int64_t j = i + n; j < std::min(i + n + num_tokens, L) && tokens_[size_t(j)] != eos_; ++j)
        out.push_back(tokens_[size_t(j)]);
      return out;
    }
  }
  return {};
}

// ---------------------------------------------------------------------------- cost model

std::vector<double> measure_cost_curve(Runtime& rt, int32_t seq, int32_t token, const InterruptFn& interrupt) {
  // Points no longer than the context (a step longer than it can never happen).
  const int64_t longest = std::min<int64_t>(kCurvePoints[std::size(kCurvePoints) - 1], rt.max_context());
  const int64_t keep = std::max<int64_t>(0, std::min(rt.seq_len(seq), rt.max_context() - longest));
  const int64_t V = rt.model().config().vocab_size;
  std::vector<float> logits(size_t(longest * V));
  std::vector<int32_t> toks(size_t(longest), token);
  std::vector<double> xs, ys;
  for (int32_t n : kCurvePoints) {
    if (n > longest) break;
    double best = std::numeric_limits<double>::infinity();
    for (int rep = 0; rep < 2; ++rep) {
      const int32_t f = rt.seq_fork(seq, keep);
      try {
        const double t0 = now();
        rt.eval({{f, toks.data(), n, Runtime::Logits::all}}, logits.data(), interrupt);
        best = std::min(best, now() - t0);
      } catch (...) {
        rt.seq_free(f);
        throw;
      }
      rt.seq_free(f);
    }
    xs.push_back(n);
    ys.push_back(best);
  }
  std::vector<double> curve;
  for (int32_t n = 1; n <= kSpecMaxTokens + 1; ++n) {
    size_t j = 1;
    while (j + 1 < xs.size() && xs[j] < n) ++j;
    const double w = std::clamp((n - xs[j - 1]) / (xs[j] - xs[j - 1]), 0.0, 1.0);
    const double t = ys[j - 1] + w * (ys[j] - ys[j - 1]);
    curve.push_back(curve.empty() ? t : std::max(curve.back(), t));  // never cheaper for more tokens
  }
  return curve;
}

int32_t SpecController::choose(int32_t kmax) const {
  const double a = acc_ / (acc_ + rej_), t1 = curve_[0];
  int32_t best_k = 0;
  double best = 1.0, e = 1.0;
  for (int32_t k = 1; k <= std::min<int32_t>(kmax, int32_t(curve_.size()) - 1); ++k) {
    e += std::pow(a, k);
    const double g = e / (curve_[size_t(k)] / t1);
    if (g > best) {
      best_k = k;
      best = g;
    }
  }
  return best >= kMinGain ? best_k : 0;
}

void SpecController::observe(int64_t accepted, bool rejected) {
  acc_ = acc_ * kDecay + double(accepted);
  rej_ = rej_ * kDecay + (rejected ? 1.0 : 0.0);
}

// ---------------------------------------------------------------------------- generation

SpecResult speculative_generate(Runtime& rt, int32_t seq, const std::vector<int32_t>& prompt, int64_t max_new_tokens,
                                const SamplingParams& sampling, const Tokenizer* tokenizer, const SpecOptions& opts,
                                std::vector<double>& curve, const SpecTokenFn& on_token, const InterruptFn& interrupt,
                                std::mutex* rt_mutex) {
  if (opts.prompt_lookup_num_tokens < 1)
    throw InvalidArgument("prompt_lookup_num_tokens must be >= 1, got " + std::to_string(opts.prompt_lookup_num_tokens));
  const int64_t V = rt.model().config().vocab_size, max_ctx = rt.max_context();
  const int32_t eos = int32_t(rt.model().config().eos_token_id);
  const int64_t n_prompt = int64_t(prompt.size());
  SpecResult res;
  res.tokens = prompt;
  std::vector<int32_t>& tokens = res.tokens;
  Sampler sampler(sampling);
  std::unique_ptr<TextStream> text;
  if (tokenizer) text = std::make_unique<TextStream>(*tokenizer, prompt.data(), n_prompt, std::vector<std::string>{});
  PromptLookup lookup(opts.max_matching_ngram_size, eos);
  for (int32_t t : prompt) lookup.push(t);
  std::unique_ptr<SpecController> ctl;

  // Appends a generated token, hands it to on_token; returns the finish reason (none: go on).
  auto emit = [&](int32_t tok) {
    tokens.push_back(tok);
    lookup.push(tok);
    ++res.n_generated;
    SpecFinish f = tok == eos                            ? SpecFinish::eos
                   : res.n_generated >= max_new_tokens   ? SpecFinish::length
                   : int64_t(tokens.size()) >= max_ctx   ? SpecFinish::context
                                                         : SpecFinish::none;
    std::string piece;
    if (text) {
      bool stopped = false;
      piece = text->push(tok, &stopped);
      if (f != SpecFinish::none) piece += text->finish(&stopped);
    }
    if (on_token && !on_token(tok, piece)) return SpecFinish::callback;
    return f;
  };

  std::vector<float> logits(size_t((kSpecMaxTokens + 1) * V));
  if (max_new_tokens <= 0) {
    res.finish = SpecFinish::length;
    return res;
  }
  const double t_start = now();
  {
    MaybeLock lk(rt_mutex);
    const int64_t past = rt.seq_len(seq);
    rt.eval({{seq, prompt.data() + past, n_prompt - past, Runtime::Logits::last}}, logits.data(), interrupt);
  }
  res.finish = emit(sampler.sample(logits.data(), V, tokens));
  res.prefill_seconds = now() - t_start;
  if (opts.adaptive && res.finish == SpecFinish::none) {
    const double t0 = now();
    if (curve.empty()) {
      MaybeLock lk(rt_mutex);
      curve = measure_cost_curve(rt, seq, tokens.back(), interrupt);
    }
    ctl = std::make_unique<SpecController>(curve);
    res.stats.calibration_seconds = now() - t0;
  }
  const double t_decode = now();
  std::vector<int32_t> step;
  while (res.finish == SpecFinish::none) {
    // Room in the context for the step's k + 1 rows; no proposal max_new_tokens could not use.
    const int64_t kmax = std::min<int64_t>({max_new_tokens - res.n_generated - 1, max_ctx - int64_t(tokens.size()) - 1,
                                            opts.prompt_lookup_num_tokens});
    std::vector<int32_t> props = kmax > 0 ? lookup.propose(kmax) : std::vector<int32_t>{};
    int32_t shadow = -1;  // an unchecked proposal's first token, scored against what is generated
    if (!props.empty() && ctl) {
      const int32_t k = ctl->choose(int32_t(std::min<size_t>(props.size(), kSpecMaxTokens)));
      if (k == 0) {
        shadow = props[0];
        props.clear();
      } else {
        props.resize(size_t(k));
      }
    }
    step.assign(1, tokens.back());
    step.insert(step.end(), props.begin(), props.end());
    const size_t base = tokens.size();
    {
      MaybeLock lk(rt_mutex);
      rt.eval({{seq, step.data(), int64_t(step.size()), Runtime::Logits::all}}, logits.data(), interrupt);
    }
    ++res.stats.steps;
    int64_t accepted = 0;
    for (size_t i = 0; i <= props.size(); ++i) {
      const int32_t tok = sampler.sample(logits.data() + i * size_t(V), V, tokens);
      const bool ok = i < props.size() && tok == props[i];
      accepted += ok;
      res.finish = emit(tok);
      if (res.finish != SpecFinish::none || !ok) break;
    }
    if (!props.empty()) {
      ++res.stats.verify_steps;
      res.stats.proposed += int64_t(props.size());
      res.stats.accepted += accepted;
      if (ctl) ctl->observe(accepted, accepted < int64_t(props.size()));
    } else if (shadow >= 0 && ctl) {
      ctl->observe(tokens[base] == shadow ? 1 : 0, tokens[base] != shadow);
    }
    MaybeLock lk(rt_mutex);
    rt.seq_truncate(seq, int64_t(tokens.size()) - 1);  // drops the rejected proposals' keys and values
  }
  res.decode_seconds = now() - t_decode;
  return res;
}

}  // namespace oelm
