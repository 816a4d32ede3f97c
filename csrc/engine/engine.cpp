// Engine (engine.h): admission, chunked prefill, batched decode, sampling, events.
#include "engine/engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "common/error.h"

#if !defined(_WIN32)
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#endif

namespace oelm {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::none: return "";
    case FinishReason::eos: return "eos";
    case FinishReason::length: return "length";
    case FinishReason::stop: return "stop";
    case FinishReason::context: return "context";
    case FinishReason::cancelled: return "cancelled";
    case FinishReason::error: return "error";
  }
  return "";
}

const char* error_kind_name(ErrorKind k) {
  switch (k) {
    case ErrorKind::none: return "";
    case ErrorKind::kv_budget: return "kv_budget";
    case ErrorKind::model: return "model";
    case ErrorKind::internal: return "internal";
  }
  return "";
}

namespace {
double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

struct Engine::Req {
  uint64_t id = 0;
  GenerateRequest p;
  std::vector<int32_t> tokens;  // prompt, then every generated token
  int64_t n_prompt = 0, n_generated = 0, n_decoded = 0, n_cached = 0;
  int32_t seq = -1;             // its Runtime sequence while running
  std::optional<Sampler> sampler;
  std::optional<TextStream> text;
  double prefill_s = 0, decode_s = 0;
  bool sampled_once = false;
  std::vector<float> prompt_lp;
  std::vector<std::vector<TokenLogprob>> prompt_top;  // prompt_logprobs with logprobs > 0
  bool first_event_sent = false;
  bool done = false;
};

Engine::Engine(std::shared_ptr<Runtime> runtime, const EngineOptions& options)
    : rt_(std::move(runtime)),
      opt_(options),
      tok_(rt_->model().has_tokenizer() ? &rt_->model().tokenizer() : nullptr) {  // none: ids only
  if (opt_.max_batch < 1 || opt_.max_batch > 4096)
    throw InvalidArgument("max_batch must be in [1, 4096], got " + std::to_string(opt_.max_batch));
  if (opt_.max_batch > rt_->max_step_tokens())
    throw InvalidArgument("max_batch " + std::to_string(opt_.max_batch) + " exceeds the tokens of one step (" +
                          std::to_string(rt_->max_step_tokens()) + "); lower max_batch or raise max_step_tokens");
  if (opt_.max_queue < 0) throw InvalidArgument("max_queue must be >= 0 (0 = unbounded)");
  if (opt_.prefill_chunk < 0)
    throw InvalidArgument("prefill_chunk must be >= 0 (0 = up to the step's token budget), got " +
                          std::to_string(opt_.prefill_chunk));
}

Engine::~Engine() {
  stop();
#if !defined(_WIN32)
  for (int fd : notify_fd_)
    if (fd >= 0) ::close(fd);
#endif
}

int Engine::event_fd() {
#if defined(_WIN32)
  return -1;
#else
  std::lock_guard<std::mutex> lk(mu_);
  if (notify_fd_[0] < 0) {
    if (::pipe(notify_fd_) != 0)
      throw std::runtime_error(std::string("Engine::event_fd: pipe() failed: ") + std::strerror(errno) +
                               " (out of file descriptors? raise the limit, e.g. ulimit -n)");
    for (int fd : notify_fd_) {
      ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
      ::fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
    notified_ = false;
    if (!events_.empty()) {  // events already waiting: readable at once
      const char b = 1;
      notified_ = ::write(notify_fd_[1], &b, 1) == 1;
    }
  }
  return notify_fd_[0];
#endif
}

void Engine::drain_notify() {
#if !defined(_WIN32)
  if (!notified_) return;
  char buf[64];
  while (::read(notify_fd_[0], buf, sizeof buf) > 0) {
  }
  notified_ = false;
#endif
}

// ------------------------------------------------------------------------------ other threads

uint64_t Engine::submit(GenerateRequest p) {
  const ModelConfig& c = rt_->model().config();
  const int64_t n = int64_t(p.prompt.size()), max_ctx = rt_->max_context();
  if (n == 0) throw InvalidArgument("the prompt is empty; pass at least one token (e.g. BOS)");
  for (int64_t i = 0; i < n; ++i)
    if (p.prompt[size_t(i)] < 0 || p.prompt[size_t(i)] >= c.vocab_size)
      throw InvalidArgument("prompt token id " + std::to_string(p.prompt[size_t(i)]) + " at index " +
                            std::to_string(i) + " is outside the vocabulary [0, " + std::to_string(c.vocab_size) + ")");
  if (p.max_new_tokens < 0)
    throw InvalidArgument("max_new_tokens must be >= 0, got " + std::to_string(p.max_new_tokens));
  if (n > max_ctx || (n == max_ctx && p.max_new_tokens > 0))
    throw InvalidArgument("the prompt has " + std::to_string(n) + " tokens but max_context is " +
                          std::to_string(max_ctx) + (n == max_ctx ? ", leaving no room for a new token" : "") +
                          "; shorten the prompt or raise max_context");
  validate(p.sampling);
  for (const std::string& s : p.stop)
    if (s.empty()) throw InvalidArgument("a stop string is empty; stop strings must be non-empty");
  if (p.logprobs > 100) throw InvalidArgument("logprobs must be at most 100, got " + std::to_string(p.logprobs));
  auto r = std::make_unique<Req>();
  r->p = std::move(p);
  r->tokens = r->p.prompt;
  r->n_prompt = n;
  r->sampler.emplace(r->p.sampling);
  if (tok_) r->text.emplace(*tok_, r->tokens.data(), n, r->p.stop);
  else if (!r->p.stop.empty()) rt_->model().tokenizer();  // throws: stop strings need a tokenizer
  std::lock_guard<std::mutex> lk(mu_);
  if (opt_.max_queue > 0 && int64_t(incoming_.size()) + stats_.waiting >= opt_.max_queue)
    throw InvalidArgument("the queue is full: " + std::to_string(opt_.max_queue) +
                          " requests are waiting; retry later or raise max_queue");
  r->id = next_id_++;
  const uint64_t id = r->id;
  pending_ids_.insert(id);
  incoming_.push_back(std::move(r));
  ++stats_.submitted;
  ++stats_.waiting;
  work_cv_.notify_one();
  return id;
}

bool Engine::cancel(uint64_t id) {
  std::lock_guard<std::mutex> lk(mu_);
  if (!pending_ids_.count(id)) return false;
  cancels_.insert(id);
  cancel_pending_.store(true);
  work_cv_.notify_one();
  return true;
}

std::vector<Event> Engine::take_events() {
  std::lock_guard<std::mutex> lk(mu_);
  std::vector<Event> out;
  out.swap(events_);
  drain_notify();
  return out;
}

bool Engine::wait_events(std::vector<Event>& out, double timeout_s) {
  std::unique_lock<std::mutex> lk(mu_);
  events_cv_.wait_for(lk, std::chrono::duration<double>(std::max(0.0, timeout_s)), [&] { return !events_.empty(); });
  if (events_.empty()) return false;
  for (Event& e : events_) out.push_back(std::move(e));
  events_.clear();
  drain_notify();
  return true;
}

bool Engine::idle() const {
  std::lock_guard<std::mutex> lk(mu_);
  return pending_ids_.empty();
}

Engine::Stats Engine::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

void Engine::emit(Event&& e) {
  e.t_emit = now();
  std::lock_guard<std::mutex> lk(mu_);
  if (e.finish != FinishReason::none) {
    pending_ids_.erase(e.id);
    cancels_.erase(e.id);
    ++stats_.finished;
    if (e.finish == FinishReason::cancelled) ++stats_.cancelled;
  }
  events_.push_back(std::move(e));
  events_cv_.notify_all();
#if !defined(_WIN32)
  if (notify_fd_[1] >= 0 && !notified_) {
    const char b = 1;
    notified_ = ::write(notify_fd_[1], &b, 1) == 1;
  }
#endif
}

// ------------------------------------------------------------------------------ the stepping thread

void Engine::close(Req& r, Event& e, FinishReason why) {
  e.finish = why;
  if (why != FinishReason::error && why != FinishReason::stop) {
    bool stopped = false;
    if (r.text) e.text += r.text->finish(&stopped);  // held bytes and held-back text; may end in a stop string
    if (stopped && why != FinishReason::cancelled) e.finish = FinishReason::stop;
  }
  e.n_prompt = r.n_prompt;
  e.n_cached = r.n_cached;
  e.n_generated = r.n_generated;
  e.n_decoded = r.n_decoded;
  e.prefill_seconds = r.prefill_s;
  e.decode_seconds = r.decode_s;
  if (!r.first_event_sent) {
    e.prompt_logprobs = std::move(r.prompt_lp);
    e.prompt_top = std::move(r.prompt_top);
  }
  r.first_event_sent = true;
  if (r.seq >= 0) {
    if (why != FinishReason::error) rt_->cache_prefix(r.seq, rt_->seq_len(r.seq));
    rt_->seq_free(r.seq);
    r.seq = -1;
  }
  r.done = true;
  emit(std::move(e));
}

void Engine::finish(Req& r, FinishReason why, std::string error, ErrorKind kind) {
  Event e;
  e.id = r.id;
  e.error = std::move(error);
  e.error_kind = why == FinishReason::error ? kind : ErrorKind::none;
  close(r, e, why);
}

void Engine::handle_cancels() {
  std::unordered_set<uint64_t> ids;
  {
    std::lock_guard<std::mutex> lk(mu_);
    ids.swap(cancels_);
    cancel_pending_.store(false);
  }
  if (ids.empty()) return;
  for (auto it = waiting_.begin(); it != waiting_.end();) {
    if (ids.count((*it)->id)) {
      finish(**it, FinishReason::cancelled);
      it = waiting_.erase(it);
      std::lock_guard<std::mutex> lk(mu_);
      --stats_.waiting;
    } else {
      ++it;
    }
  }
  for (auto it = running_.begin(); it != running_.end();) {
    if (ids.count((*it)->id)) {
      finish(**it, FinishReason::cancelled);
      it = running_.erase(it);
      std::lock_guard<std::mutex> lk(mu_);
      --stats_.running;
    } else {
      ++it;
    }
  }
}

void Engine::admit() {
  while (!waiting_.empty() && int32_t(running_.size()) < opt_.max_batch) {
    Req& r = *waiting_.front();
    if (r.p.max_new_tokens == 0 && !r.p.prompt_logprobs) {  // nothing to compute
      finish(r, FinishReason::length);
      waiting_.pop_front();
      std::lock_guard<std::mutex> lk(mu_);
      --stats_.waiting;
      continue;
    }
    const int64_t n = int64_t(r.tokens.size());
    // The last token is always evaluated: its logits are what the next token is drawn from.
    const bool reuse = r.p.reuse_prefix && !r.p.prompt_logprobs;
    const auto [id, got] = rt_->seq_from_cache(r.tokens.data(), n, reuse ? n - 1 : 0);
    if (!rt_->reserve(rt_->seq_kv(id), n - got)) {
      const int64_t need = rt_->kv().blocks_needed(rt_->seq_kv(id), n - got);
      rt_->seq_free(id);
      if (!running_.empty()) return;  // wait until running sequences give blocks back
      r.seq = -1;
      finish(r, FinishReason::error,
             rt_->budget_error("a sequence of " + std::to_string(n) + " tokens", need - rt_->kv().n_free()),
             ErrorKind::kv_budget);
      waiting_.pop_front();
      std::lock_guard<std::mutex> lk(mu_);
      --stats_.waiting;
      continue;
    }
    r.seq = id;
    if (!r.sampled_once) r.n_cached = got;  // a preempted sequence's recomputation is not a prompt cache hit
    {
      std::lock_guard<std::mutex> lk(mu_);
      --stats_.waiting;
      ++stats_.running;
      if (!r.sampled_once) {
        stats_.prompt_tokens += r.n_prompt;
        stats_.cached_tokens += got;
      }
    }
    running_.push_back(std::move(waiting_.front()));
    waiting_.pop_front();
  }
}

bool Engine::preempt_one(const Req* keep) {
  // The most recently admitted sequence other than `keep` gives its blocks back and waits to be
  // recomputed (its tokens, sampler and text are kept; the results do not change).
  for (auto it = running_.end(); it != running_.begin();) {
    --it;
    if (it->get() == keep) continue;
    Req& r = **it;
    rt_->seq_free(r.seq);
    r.seq = -1;
    waiting_.push_front(std::move(*it));
    running_.erase(it);
    std::lock_guard<std::mutex> lk(mu_);
    --stats_.running;
    ++stats_.waiting;
    ++stats_.preempted;
    return true;
  }
  return false;
}

// The k likeliest tokens of a logits row with their log-probabilities (ties: lower id first).
static void top_logprobs(const float* x, int64_t V, int32_t k_want, double lse, std::vector<TokenLogprob>& out) {
  const int32_t k = std::min<int32_t>(k_want, int32_t(V));
  std::vector<int32_t> idx(static_cast<size_t>(V));
  for (int64_t v = 0; v < V; ++v) idx[size_t(v)] = int32_t(v);
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                    [&](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); });
  out.clear();
  for (int32_t i = 0; i < k; ++i) out.push_back({idx[size_t(i)], float(double(x[idx[size_t(i)]]) - lse)});
}

void Engine::sample_row(Req& r, const float* x, double step_seconds) {
  const int64_t V = rt_->model().config().vocab_size;
  Event e;
  e.id = r.id;
  if (r.p.logprobs >= 0) {  // log-softmax of the raw logits, accumulated in float64
    const double lse = log_sum_exp(x, V, nullptr);
    top_logprobs(x, V, r.p.logprobs, lse, e.top);
    const int32_t tok = r.sampler->sample(x, V, r.tokens);
    e.logprob = float(double(x[tok]) - lse);
    e.token = tok;
  } else {
    e.token = r.sampler->sample(x, V, r.tokens);
  }
  if (r.sampled_once) {
    r.decode_s += step_seconds;
    ++r.n_decoded;
  } else {
    r.prefill_s += step_seconds;
    r.sampled_once = true;
    // The prompt's keys and values, for later requests that share it (a system prompt).
    if (r.n_prompt >= rt_->kv().block_size()) rt_->cache_prefix(r.seq, r.n_prompt);
  }
  r.tokens.push_back(e.token);
  ++r.n_generated;
  {
    std::lock_guard<std::mutex> lk(mu_);
    ++stats_.generated;
  }
  bool stopped = false;
  if (r.text) e.text = r.text->push(e.token, &stopped);
  FinishReason why = FinishReason::none;
  if (stopped) why = FinishReason::stop;
  else if (e.token == rt_->model().config().eos_token_id) why = FinishReason::eos;
  else if (r.n_generated >= r.p.max_new_tokens) why = FinishReason::length;
  else if (int64_t(r.tokens.size()) >= rt_->max_context()) why = FinishReason::context;
  if (why != FinishReason::none) {
    close(r, e, why);  // the final event carries this token and the finish
    return;
  }
  if (!r.first_event_sent) {
    e.prompt_logprobs = std::move(r.prompt_lp);
    e.prompt_top = std::move(r.prompt_top);
  }
  r.first_event_sent = true;
  emit(std::move(e));
}

bool Engine::step(const InterruptFn& interrupt) {
  std::lock_guard<std::mutex> guard(step_mu_);
  bool did = false;
  {
    std::lock_guard<std::mutex> lk(mu_);
    did = !incoming_.empty() || !cancels_.empty();
    while (!incoming_.empty()) {
      waiting_.push_back(std::move(incoming_.front()));
      incoming_.pop_front();
    }
  }
  handle_cancels();
  admit();
  if (running_.empty()) return did;

  // Tokens of each running sequence this step: one for each decoding sequence, then prompt
  // chunks in admission order within what is left of the budget -- at most prefill_chunk of
  // them when some sequence decodes, so that its next token is not held up by a long prefill.
  const int64_t budget = rt_->max_step_tokens();
  std::vector<int64_t> take(running_.size(), 0);
  int64_t used = 0, limit = budget;
  for (int pass = 0; pass < 2; ++pass) {
    if (pass == 1 && used > 0 && opt_.prefill_chunk > 0) limit = std::min(budget, used + opt_.prefill_chunk);
    for (size_t i = 0; i < running_.size(); ++i) {
      const Req& r = *running_[i];
      const int64_t pending = int64_t(r.tokens.size()) - rt_->seq_len(r.seq);
      if ((pass == 0) != (pending == 1)) continue;
      take[i] = std::min(pending, limit - used);
      used += take[i];
    }
  }
  // Make room in the KV cache; when it is short, the newest sequences wait (preempted).
  for (size_t i = 0; i < running_.size(); ++i) {
    if (take[i] == 0) continue;
    Req* r = running_[i].get();
    bool ok = rt_->reserve(rt_->seq_kv(r->seq), take[i]);
    while (!ok && running_.size() > 1) {
      const bool self = running_.back().get() == r;  // r is the newest: it waits itself
      preempt_one(self ? nullptr : r);               // removes running_.back()
      take.pop_back();
      if (self) break;
      ok = rt_->reserve(rt_->seq_kv(r->seq), take[i]);
    }
    if (ok || i >= running_.size()) continue;
    // Alone and still short: this sequence cannot grow within the budget.
    const int64_t need = rt_->kv().blocks_needed(rt_->seq_kv(r->seq), take[i]) - rt_->kv().n_free();
    finish(*r, FinishReason::error,
           rt_->budget_error("a sequence of " + std::to_string(r->tokens.size()) + " tokens", need),
           ErrorKind::kv_budget);
    running_.clear();
    take.clear();
    std::lock_guard<std::mutex> lk(mu_);
    --stats_.running;
    return true;
  }
  // The step: rows grouped by sequence.
  std::vector<int32_t> tokens, rows;
  std::vector<StepSeq> seqs;
  struct RowUse {
    size_t req;
    int64_t pos;  // position of the row in its sequence
    bool sample;
  };
  std::vector<RowUse> uses;
  std::vector<size_t> in_step;
  int64_t decode_rows = 0, prompt_rows = 0;
  for (size_t i = 0; i < running_.size() && i < take.size(); ++i) {
    if (take[i] == 0) continue;
    Req& r = *running_[i];
    SeqKv& kv = rt_->seq_kv(r.seq);
    const int64_t row0 = int64_t(tokens.size()), len = kv.len;
    seqs.push_back({kv.blocks.data(), len, take[i], row0});
    tokens.insert(tokens.end(), r.tokens.begin() + len, r.tokens.begin() + len + take[i]);
    const bool completes = len + take[i] == int64_t(r.tokens.size());
    for (int64_t j = 0; j < take[i]; ++j) {
      const int64_t pos = len + j;
      const bool sample = completes && j == take[i] - 1 && r.p.max_new_tokens > 0;  // 0: prompt_logprobs only
      const bool prompt_lp = r.p.prompt_logprobs && !r.sampled_once && pos <= r.n_prompt - 2;
      if (sample || prompt_lp) {
        rows.push_back(int32_t(row0 + j));
        uses.push_back({i, pos, sample});
      }
    }
    if (take[i] == 1 && r.sampled_once) ++decode_rows;
    else prompt_rows += take[i];
    in_step.push_back(i);
  }
  if (tokens.empty()) return true;
  const int64_t V = rt_->model().config().vocab_size;
  if (logits_.size() < rows.size() * size_t(V)) logits_.resize(rows.size() * size_t(V));
  const Step st{tokens.data(), int64_t(tokens.size()), seqs.data(), int64_t(seqs.size()), rows.data(),
                int64_t(rows.size())};
  bool user_stop = false;
  const InterruptFn intr = [&] {
    if (interrupt && interrupt()) {
      user_stop = true;
      return true;
    }
    return cancel_pending_.load(std::memory_order_relaxed);
  };
  const double t0 = now();
  try {
    rt_->forward(st, logits_.data(), intr);
  } catch (const Interrupted&) {
    if (user_stop) throw;
    return true;  // a cancellation arrived: the next step handles it and runs without that sequence
  }
  const double dt = now() - t0;
  {
    std::lock_guard<std::mutex> lk(mu_);
    ++stats_.steps;
    stats_.step_tokens += int64_t(tokens.size());
    stats_.decode_rows += decode_rows;
    if (decode_rows > 0 && prompt_rows > 0) ++stats_.mixed_steps;
  }
  for (size_t k = 0; k < in_step.size(); ++k) {
    Req& r = *running_[in_step[k]];
    rt_->seq_append(r.seq, r.tokens.data() + seqs[k].n_past, seqs[k].n_new);
    if (!r.sampled_once && seqs[k].n_past + seqs[k].n_new < int64_t(r.tokens.size())) r.prefill_s += dt;
  }
  for (size_t u = 0; u < uses.size(); ++u) {
    Req& r = *running_[uses[u].req];
    const float* x = logits_.data() + u * size_t(V);
    if (r.done) continue;  // its logits were not finite (below)
    if (!all_finite(x, V)) {  // corrupt weights: this request ends; the others go on
      finish(r, FinishReason::error,
             non_finite_logits_error(rt_->model(), "at position " + std::to_string(uses[u].pos) + " of request " +
                                                       std::to_string(r.id)),
             ErrorKind::model);
      continue;
    }
    if (uses[u].sample) {
      sample_row(r, x, dt);
      continue;
    }
    // log p(prompt[pos + 1] | prompt[..pos]), float64 accumulation
    if (r.prompt_lp.empty()) r.prompt_lp.assign(size_t(r.n_prompt - 1), 0.0f);
    const double lse = log_sum_exp(x, V, nullptr);
    r.prompt_lp[size_t(uses[u].pos)] = float(double(x[r.tokens[size_t(uses[u].pos + 1)]]) - lse);
    if (r.p.logprobs > 0) {  // the likeliest tokens at each prompt position too (an API's echo + logprobs)
      if (r.prompt_top.empty()) r.prompt_top.resize(size_t(r.n_prompt - 1));
      top_logprobs(x, V, r.p.logprobs, lse, r.prompt_top[size_t(uses[u].pos)]);
    }
  }
  // max_new_tokens == 0 (prompt log-probabilities only): done once the prompt is evaluated.
  for (size_t k = 0; k < in_step.size(); ++k) {
    Req& r = *running_[in_step[k]];
    if (!r.done && r.p.max_new_tokens == 0 && seqs[k].n_past + seqs[k].n_new == int64_t(r.tokens.size()))
      finish(r, FinishReason::length);
  }
  // Sequences that finished leave.
  for (auto it = running_.begin(); it != running_.end();) {
    if ((*it)->done) {
      it = running_.erase(it);
      std::lock_guard<std::mutex> lk(mu_);
      --stats_.running;
    } else {
      ++it;
    }
  }
  return true;
}

// ------------------------------------------------------------------------------ own thread

void Engine::loop() {
  while (!stop_.load()) {
    bool did = false;
    try {
      did = step();
    } catch (const std::exception& e) {
      // A failed step (out of memory, a bug): end what was running with the message, keep serving.
      const ErrorKind kind = dynamic_cast<const KvBudgetExceeded*>(&e) ? ErrorKind::kv_budget
                             : dynamic_cast<const FormatError*>(&e)    ? ErrorKind::model
                                                                       : ErrorKind::internal;
      std::lock_guard<std::mutex> g(step_mu_);
      for (auto& r : running_) finish(*r, FinishReason::error, e.what(), kind);
      {
        std::lock_guard<std::mutex> lk(mu_);
        stats_.running -= int64_t(running_.size());
      }
      running_.clear();
      did = true;
    }
    if (!did) {
      std::unique_lock<std::mutex> lk(mu_);
      work_cv_.wait_for(lk, std::chrono::milliseconds(100),
                        [&] { return stop_.load() || !incoming_.empty() || !cancels_.empty(); });
    }
  }
}

void Engine::start() {
  if (thread_.joinable()) return;
  stop_.store(false);
  thread_ = std::thread([this] { loop(); });
}

void Engine::stop() {
  if (!thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_.store(true);
  }
  work_cv_.notify_all();
  thread_.join();
}

}  // namespace oelm
