// Runtime (runtime.h): sequences over the paged KV cache, batched evaluation, scoring.
#include "engine/runtime.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>

#include <unistd.h>

#include "common/error.h"
#include "model/cuda.h"

namespace oelm {

namespace {
// What one thread's packed f32 path keeps for the matrices of this model that take it (f32, and
// f16 / bf16 widened into f32 panels; Backend::f32_pack_thread_bytes: panels of at most a block of
// rows, and of no more rows than a matrix has, rounded up to 32); 0 if no matrix takes it.
int64_t f32_pack_bytes(const Model& m, const Backend& b) {
  const ModelConfig& c = m.config();
  const bool body = b.packs_dtype(c.weights_dtype), vocab = b.packs_dtype(c.embedding_dtype);
  bool listed = false;
  for (const auto& [name, t] : c.tensor_dtypes) listed = listed || b.packs_dtype(t);
  if (!body && !vocab && !listed) return 0;
  const int64_t K = std::max({c.d_model, m.max_q_dim(), m.max_ffn_dim()});
  const int64_t rows = std::max({c.d_model, m.max_qkv_dim(), 2 * m.max_ffn_dim(), vocab ? c.vocab_size : 0});
  return std::min(b.f32_pack_thread_bytes(K), (rows + 31) / 32 * 32 * K * 4);
}
}  // namespace

namespace {

void check_tokens(const int32_t* ids, int64_t n, int64_t vocab, const char* what) {
  for (int64_t i = 0; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= vocab)
      throw InvalidArgument(std::string(what) + ": token id " + std::to_string(ids[i]) + " at index " +
                            std::to_string(i) + " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
}

}  // namespace

double log_sum_exp(const float* x, int64_t n, int64_t* argmax) {
  int64_t arg = 0;
  for (int64_t v = 1; v < n; ++v)
    if (x[v] > x[arg]) arg = v;
  const double m = x[arg];
  double sum = 0;
  for (int64_t v = 0; v < n; ++v) sum += std::exp(double(x[v]) - m);
  if (argmax) *argmax = arg;
  return m + std::log(sum);
}

bool all_finite(const float* x, int64_t n) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) ok &= std::fabs(x[i]) <= FLT_MAX;  // false for NaN and +-inf
  return ok;
}

std::string non_finite_logits_error(const Model& model, const std::string& where) {
  const std::string& path = model.file().path();
  return "the model computed non-finite logits (NaN or infinity) " + where +
         "; its weights are most likely corrupt (tensor data is CRC-checked only on request): check the file "
         "with `openelm-rt info --verify " + path + "` (or load it with verify=True / "
         "oelm_model_options.verify = 1) and re-export or re-download it";
}

int64_t kv_budget_default(const ModelConfig& c, int64_t max_context, KvType type, int64_t sequences) {
  const int64_t blocks = (max_context + kDefaultKvBlock - 1) / kDefaultKvBlock;
  const int64_t one = blocks * kv_block_bytes(c, kDefaultKvBlock, type);
  int64_t cap = int64_t(1) << 62;
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) cap = int64_t(pages) * int64_t(page) / 4;
  return std::max(one, std::min(std::max<int64_t>(sequences, 1) * one, cap));
}

Runtime::Runtime(std::shared_ptr<const Model> model, std::shared_ptr<Backend> backend, const RuntimeOptions& o)
    : model_(std::move(model)), backend_(std::move(backend)), prefix_(o.prefix_cache_entries) {
  const ModelConfig& c = model_->config();
  const int64_t max_ctx = o.max_context > 0 ? o.max_context : c.max_context;
  const int64_t bs = o.block_size > 0 ? o.block_size : kDefaultKvBlock;
  if (bs % kKvAlign || bs > 4096)
    throw InvalidArgument("kv block size must be a multiple of " + std::to_string(kKvAlign) + " up to 4096, got " +
                          std::to_string(bs));
  if (o.kv_budget_bytes < 0) throw InvalidArgument("kv_budget must be positive, got " + std::to_string(o.kv_budget_bytes));
  if (o.prefix_cache_entries < 0) throw InvalidArgument("prefix_cache_entries must be >= 0");
  if (o.memory_budget_bytes < 0)
    throw InvalidArgument("memory_budget must be positive, got " + std::to_string(o.memory_budget_bytes));
  const bool capped = o.memory_budget_bytes > 0;
  const int64_t block_bytes = kv_block_bytes(c, bs, o.kv_type);
  budget_bytes_ = o.kv_budget_bytes > 0 ? o.kv_budget_bytes
                                        : kv_budget_default(c, max_ctx, o.kv_type, capped ? 1 : o.budget_sequences);
  if (o.kv_budget_bytes == 0 && backend_->is_cuda())  // device memory, not RAM: at most half of what is free
    budget_bytes_ = std::max(block_bytes, std::min(budget_bytes_, cuda_free_memory() / 2));
  const int64_t n_blocks = budget_bytes_ / block_bytes;
  if (n_blocks < 1)
    throw InvalidArgument("kv_budget of " + std::to_string(budget_bytes_) + " bytes is less than one KV block of " +
                          std::to_string(bs) + " positions (" + std::to_string(block_bytes) +
                          " bytes for this model); raise kv_budget");
  if (n_blocks > (int64_t(1) << 30)) throw InvalidArgument("kv_budget is too large: more than 2^30 blocks");
  KvGeometry geo;
  geo.n_blocks = int32_t(n_blocks);
  geo.block_size = bs;
  geo.type = o.kv_type;
  const int64_t step_tokens = o.max_step_tokens > 0 ? o.max_step_tokens : kDefaultStepTokens;
  if (capped) {
    if (backend_->is_cuda())
      throw InvalidArgument("memory_budget streams weights from the file into host memory: it is for the CPU "
                            "backend; leave it unset with the CUDA backend");
    // Scratch: the executor's, plus logits of a full step (scoring) and of a batch (engine), plus
    // the packed f32 path's weight panels in every thread where some matrix is f32.
    const int64_t scratch = cpu_scratch_bytes(*model_, max_ctx, step_tokens) +
                            (step_tokens + std::max<int64_t>(o.budget_sequences, 1)) * c.vocab_size * 4 +
                            backend_->threads() * f32_pack_bytes(*model_, *backend_);
    plan_ = plan_memory(*model_, o.memory_budget_bytes, n_blocks * block_bytes, scratch);
    if (plan_->streams()) stream_ = std::make_shared<WeightStreamer>(model_, *plan_, o.stream);
  }
  exec_ = backend_->is_cuda() ? make_cuda_executor(model_, backend_, geo, max_ctx, step_tokens)
                              : make_cpu_executor(model_, backend_, geo, max_ctx, step_tokens, stream_);
  Executor* ex = exec_.get();
  const std::string text = mib_text(n_blocks * block_bytes) + " (" + std::to_string(n_blocks) + " blocks of " +
                           std::to_string(bs) + " positions, " + std::to_string(block_bytes / 1024) + " KiB each, " +
                           (o.kv_type == KvType::f16 ? "f16" : "f32") + ")";
  kv_ = std::make_unique<KvCache>(int32_t(n_blocks), bs, [ex](int32_t s, int32_t d, int64_t r) { ex->copy_block(s, d, r); },
                                  text);
}

Runtime::~Runtime() {
  // Blocks go back with the pool itself; nothing to release one by one.
}

// ------------------------------------------------------------------------------- sequences

Runtime::Seq& Runtime::seq(int32_t id) {
  check_seq(id, "sequence");
  return seqs_[size_t(id)];
}
const Runtime::Seq& Runtime::seq(int32_t id) const {
  check_seq(id, "sequence");
  return seqs_[size_t(id)];
}

bool Runtime::seq_exists(int32_t id) const { return id >= 0 && size_t(id) < seqs_.size() && seqs_[size_t(id)].live; }

void Runtime::check_seq(int32_t id, const char* what) const {
  if (!seq_exists(id))
    throw InvalidArgument(std::string(what) + " " + std::to_string(id) +
                          " is not a live sequence (never created, or already freed)");
}

void Runtime::set_ffn_probe(bool on) {
  if (!on) {
    exec_->set_ffn_probe(nullptr);
    probe_.reset();
    return;
  }
  auto p = std::make_unique<FfnProbe>();
  exec_->set_ffn_probe(p.get());
  probe_ = std::move(p);
}

int32_t Runtime::seq_new() {
  int32_t id;
  if (!free_ids_.empty()) {
    id = free_ids_.back();
    free_ids_.pop_back();
  } else {
    if (seqs_.size() >= size_t(1) << 30) throw InvalidArgument("too many sequences");
    id = int32_t(seqs_.size());
    seqs_.emplace_back();
  }
  Seq& s = seqs_[size_t(id)];
  s.kv = SeqKv();
  s.tokens.clear();
  s.live = true;
  ++n_live_;
  return id;
}

int32_t Runtime::seq_fork(int32_t parent, int64_t n) {
  check_seq(parent, "fork: parent");
  const int64_t len = seqs_[size_t(parent)].kv.len;
  if (n < 0) n = len;
  if (n > len)
    throw InvalidArgument("fork: the parent holds " + std::to_string(len) + " tokens, cannot share " +
                          std::to_string(n));
  SeqKv kv = kv_->fork(seqs_[size_t(parent)].kv, n);
  const int32_t id = seq_new();
  Seq& p = seqs_[size_t(parent)];  // seq_new may have grown seqs_
  Seq& s = seqs_[size_t(id)];
  s.kv = std::move(kv);
  s.tokens.assign(p.tokens.begin(), p.tokens.begin() + n);
  return id;
}

void Runtime::seq_truncate(int32_t id, int64_t n) {
  Seq& s = seq(id);
  kv_->truncate(s.kv, n);
  s.tokens.resize(size_t(n));
}

void Runtime::seq_append(int32_t id, const int32_t* tokens, int64_t n) {
  Seq& s = seq(id);
  if (s.kv.len + n > int64_t(s.kv.blocks.size()) * kv_->block_size())
    throw InvalidArgument("seq_append: positions past the reserved blocks");
  s.tokens.insert(s.tokens.end(), tokens, tokens + n);
  s.kv.len += n;
}

void Runtime::seq_free(int32_t id) {
  Seq& s = seq(id);
  kv_->release(s.kv);
  s.tokens.clear();
  s.tokens.shrink_to_fit();
  s.live = false;
  free_ids_.push_back(id);
  --n_live_;
}

// ------------------------------------------------------------------------------- KV budget

bool Runtime::reserve(SeqKv& kv, int64_t n) {
  while (!kv_->reserve(kv, n))
    if (!prefix_.evict_one(*kv_)) return false;
  return true;
}

std::string Runtime::budget_error(const std::string& what, int64_t blocks) const {
  return "the KV cache budget is exhausted: " + what + " needs " + std::to_string(blocks) + " more block(s) of " +
         std::to_string(kv_->block_size()) + " positions but " + std::to_string(kv_->n_free()) + " of the budget's " +
         kv_->budget_text() + " are free (" + std::to_string(n_live_) +
         " sequence(s) hold the rest); raise kv_budget (Session(kv_budget=...), --kv-budget, "
         "oelm_model_options.kv_budget_mib), run fewer sequences at once, or use kv_dtype f16 to halve the KV size";
}

void Runtime::forward(const Step& step, float* logits, const InterruptFn& interrupt) {
  exec_->forward(step, logits, interrupt);
  tokens_forwarded_ += step.n_tokens;
  ++steps_;
}

void Runtime::cache_prefix(int32_t id, int64_t n) {
  Seq& s = seq(id);
  if (!prefix_.enabled() || n <= 0) return;
  prefix_.insert(s.tokens.data(), std::min(n, s.kv.len), s.kv, *kv_);
}

std::pair<int32_t, int64_t> Runtime::seq_from_cache(const int32_t* tokens, int64_t n, int64_t max_len) {
  const int32_t id = seq_new();
  return {id, seq_load_prefix(id, tokens, n, max_len)};
}

int64_t Runtime::seq_load_prefix(int32_t id, const int32_t* tokens, int64_t n, int64_t max_len) {
  Seq& s = seq(id);
  if (s.kv.len != 0 || !s.kv.blocks.empty()) throw InvalidArgument("seq_load_prefix: the sequence is not empty");
  if (!prefix_.enabled() || max_len <= 0) return 0;
  const int64_t got = prefix_.lookup(tokens, n, max_len, *kv_, &s.kv);
  s.tokens.assign(tokens, tokens + got);
  return got;
}

// ------------------------------------------------------------------------------- evaluation

int64_t Runtime::logit_rows(const std::vector<EvalEntry>& entries) {
  int64_t r = 0;
  for (const EvalEntry& e : entries) r += e.logits == Logits::all ? e.n : e.logits == Logits::last ? 1 : 0;
  return r;
}

void Runtime::eval(const std::vector<EvalEntry>& entries, float* out, const InterruptFn& interrupt) {
  const int64_t V = model_->config().vocab_size;
  std::vector<int32_t> seen;
  for (const EvalEntry& e : entries) {
    check_seq(e.seq, "eval");
    if (std::find(seen.begin(), seen.end(), e.seq) != seen.end())
      throw InvalidArgument("eval: sequence " + std::to_string(e.seq) + " appears twice in one batch; "
                            "give each sequence one entry with all its tokens");
    seen.push_back(e.seq);
    if (e.n < 1) throw InvalidArgument("eval: sequence " + std::to_string(e.seq) + " has no tokens; pass at least one");
    check_tokens(e.tokens, e.n, V, "eval");
    const int64_t len = seqs_[size_t(e.seq)].kv.len;
    if (len + e.n > max_context())
      throw InvalidArgument("context is full: sequence " + std::to_string(e.seq) + " holds " + std::to_string(len) +
                            " tokens, + " + std::to_string(e.n) + " new exceed max_context " +
                            std::to_string(max_context()) + "; truncate or free it, or use a larger max_context");
  }
  std::vector<int64_t> start(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) start[i] = seqs_[size_t(entries[i].seq)].kv.len;
  auto roll_back = [&] {
    for (size_t i = 0; i < entries.size(); ++i) seq_truncate(entries[i].seq, start[i]);
  };
  try {
    for (const EvalEntry& e : entries) {
      SeqKv& kv = seqs_[size_t(e.seq)].kv;
      if (!reserve(kv, e.n))
        throw KvBudgetExceeded(budget_error("evaluating " + std::to_string(e.n) + " tokens of sequence " +
                                               std::to_string(e.seq),
                                           kv_->blocks_needed(kv, e.n) - kv_->n_free()));
    }
    eval_steps(entries, out, interrupt);
  } catch (...) {
    roll_back();
    throw;
  }
}

void Runtime::eval_steps(const std::vector<EvalEntry>& entries, float* out, const InterruptFn& interrupt) {
  const int64_t V = model_->config().vocab_size, budget = max_step_tokens();
  std::vector<int64_t> out_row(entries.size()), done(entries.size(), 0);
  for (size_t i = 0, r = 0; i < entries.size(); ++i) {
    out_row[i] = int64_t(r);
    r += size_t(entries[i].logits == Logits::all ? entries[i].n : entries[i].logits == Logits::last ? 1 : 0);
  }
  std::vector<int32_t> tokens, rows;
  std::vector<StepSeq> seqs;
  std::vector<int64_t> dst;  // out row of each logit row
  std::vector<size_t> which;
  for (;;) {
    tokens.clear();
    rows.clear();
    seqs.clear();
    dst.clear();
    which.clear();
    for (size_t i = 0; i < entries.size() && int64_t(tokens.size()) < budget; ++i) {
      const EvalEntry& e = entries[i];
      if (done[i] == e.n) continue;
      const int64_t take = std::min(e.n - done[i], budget - int64_t(tokens.size()));
      Seq& s = seqs_[size_t(e.seq)];
      const int64_t row0 = int64_t(tokens.size());
      seqs.push_back({s.kv.blocks.data(), s.kv.len, take, row0});
      tokens.insert(tokens.end(), e.tokens + done[i], e.tokens + done[i] + take);
      for (int64_t j = 0; j < take; ++j) {
        const bool want = e.logits == Logits::all || (e.logits == Logits::last && done[i] + j == e.n - 1);
        if (!want) continue;
        rows.push_back(int32_t(row0 + j));
        dst.push_back(out_row[i] + (e.logits == Logits::all ? done[i] + j : 0));
      }
      which.push_back(i);
    }
    if (tokens.empty()) return;
    if (step_logits_.size() < rows.size() * size_t(V)) step_logits_.resize(rows.size() * size_t(V));
    const Step st{tokens.data(), int64_t(tokens.size()), seqs.data(), int64_t(seqs.size()), rows.data(),
                  int64_t(rows.size())};
    forward(st, step_logits_.data(), interrupt);
    for (size_t r = 0; r < rows.size(); ++r) {
      const float* x = step_logits_.data() + r * size_t(V);
      if (!all_finite(x, V)) {  // eval() rolls every sequence back
        size_t k = 0;
        while (k + 1 < seqs.size() && seqs[k + 1].row0 <= rows[r]) ++k;
        throw FormatError(non_finite_logits_error(
            *model_, "for sequence " + std::to_string(entries[which[k]].seq) + " at position " +
                         std::to_string(seqs[k].n_past + rows[r] - seqs[k].row0)));
      }
      std::memcpy(out + dst[r] * V, x, size_t(V) * sizeof(float));
    }
    for (size_t k = 0; k < which.size(); ++k) {
      const size_t i = which[k];
      Seq& s = seqs_[size_t(entries[i].seq)];
      const int64_t take = seqs[k].n_new;
      s.kv.len += take;
      s.tokens.insert(s.tokens.end(), entries[i].tokens + done[i], entries[i].tokens + done[i] + take);
      done[i] += take;
    }
  }
}

// ------------------------------------------------------------------------------- scoring

std::vector<ScoreResult> Runtime::score_batch(
    const std::vector<std::pair<std::vector<int32_t>, std::vector<int32_t>>>& pairs, const InterruptFn& interrupt,
    ScoreStats* stats) {
  // Steps of whole token groups (kernels.h, kF32Group) where the step allows: a full step's
  // products then leave no tokens to the slower single-token-group tail of the packed f32 path.
  const int64_t V = model_->config().vocab_size, step = max_step_tokens();
  const int64_t budget = step >= kF32Group ? step / kF32Group * kF32Group : step;
  const size_t P = pairs.size();
  // Request i forwards full_i = context + continuation[:-1] (L_i tokens); the logits of rows
  // c_i - 1 .. L_i - 1 give the continuation's log-probabilities.
  std::vector<std::vector<int32_t>> full(P);
  for (size_t i = 0; i < P; ++i) {
    const auto& [ctx, cont] = pairs[i];
    const std::string what = "score pair " + std::to_string(i);
    if (ctx.empty())
      throw InvalidArgument(what + ": the context is empty; it needs at least one token (e.g. BOS) to predict "
                                   "the first continuation token from");
    if (cont.empty()) throw InvalidArgument(what + ": the continuation is empty; pass at least one token");
    check_tokens(ctx.data(), int64_t(ctx.size()), V, (what + " context").c_str());
    check_tokens(cont.data(), int64_t(cont.size()), V, (what + " continuation").c_str());
    if (int64_t(ctx.size() + cont.size()) - 1 > max_context())
      throw InvalidArgument(what + ": context (" + std::to_string(ctx.size()) + ") + continuation (" +
                            std::to_string(cont.size()) + ") - 1 tokens exceed max_context " +
                            std::to_string(max_context()) + "; truncate the context from the left");
    full[i] = ctx;
    full[i].insert(full[i].end(), cont.begin(), cont.end() - 1);
  }
  std::vector<ScoreResult> results(P);
  ScoreStats st;
  st.pairs = int64_t(P);
  for (size_t i = 0; i < P; ++i) st.tokens_requested += int64_t(full[i].size());
  // Lexicographic order: the longest prefix request i shares with any earlier one it shares
  // with its predecessor, so forking from the predecessor computes every trie node once.
  std::vector<size_t> order(P);
  std::iota(order.begin(), order.end(), size_t(0));
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return full[a] < full[b]; });
  std::vector<int64_t> keep(P, 0);  // positions request order[k] takes from its predecessor
  std::vector<int64_t> lcp(P, 0);   // tokens request order[k] shares with its predecessor
  for (size_t k = 1; k < P; ++k) {
    const auto& a = full[order[k - 1]];
    const auto& b = full[order[k]];
    lcp[k] = std::mismatch(a.begin(), a.begin() + int64_t(std::min(a.size(), b.size())), b.begin()).first - a.begin();
    keep[k] = std::min<int64_t>(lcp[k], int64_t(pairs[order[k]].first.size()) - 1);  // recompute row c-1
  }

  struct Active {
    size_t k;  // index into order
    int32_t seq;
    bool finished;
  };
  // Requests start in order, up to kMaxActive at a time, but not strictly one after another: a
  // request whose prefix no live sequence holds yet (its predecessor is still computing it) waits,
  // and later ones within kWindow start meanwhile (e.g. the next question of a shared few-shot
  // prefix while the previous question's choices wait for its context), so steps stay full.
  constexpr size_t kMaxActive = 32, kWindow = 64;
  std::vector<Active> active;  // in order of k: earlier requests first in each step
  size_t next = 0;             // the first request (index into order) not started yet
  std::vector<uint8_t> started(P, 0);
  // Finished requests whose sequence is kept until their successor has started: it forks from
  // them (or from a sequence that holds the same prefix).
  std::vector<size_t> retained;
  std::vector<int32_t> seq_of(P, -1);  // each request's live sequence, -1 once freed
  std::vector<int32_t> tokens, rows;
  std::vector<StepSeq> steps;
  std::vector<std::pair<size_t, int64_t>> row_req;  // (request k, position) of each logit row
  std::vector<size_t> in_step;
  auto cleanup = [&] {
    for (const Active& a : active) seq_free(a.seq);
    for (size_t j : retained) seq_free(seq_of[order[j]]);
    active.clear();
    retained.clear();
  };
  // A live sequence that holds request k's first keep[k] tokens: the nearest earlier request whose
  // tokens begin with them (every one back along a chain of LCPs >= keep[k]; sorted order puts
  // them right before k) and whose sequence has got that far; -1 if none has yet.
  auto source = [&](size_t k) -> int32_t {
    int64_t m = lcp[k];
    for (size_t j = k; j-- > 0 && m >= keep[k] && k - j <= kWindow;) {
      const int32_t s = seq_of[order[j]];
      if (s >= 0 && seq_len(s) >= keep[k]) return s;
      m = std::min(m, lcp[j]);
    }
    return -1;
  };
  try {
    const int64_t bs = kv_->block_size();
    while (next < P || !active.empty()) {
      // Blocks the running requests may still take (the rest of their tokens, and a block copied
      // where a fork shares a partly filled one): a request starts only if these and its own fit
      // in what is free, so those that run can always finish and give theirs back.
      int64_t pending = 0;
      for (const Active& a : active)
        pending += (int64_t(full[order[a.k]].size()) - seq_len(a.seq) + bs - 1) / bs + 1;
      for (size_t k = next; k < P && k < next + kWindow && active.size() < kMaxActive; ++k) {
        if (started[k]) continue;
        const int64_t need = int64_t(full[order[k]].size()) - keep[k];
        int32_t src = -1;
        if (keep[k] > 0) {
          src = source(k);
          if (src < 0) continue;  // its prefix is still being computed (its predecessor holds it later)
        }
        const int64_t blocks = (need + bs - 1) / bs + 1;
        if (!active.empty() && pending + blocks > kv_->n_free()) break;  // wait for memory to come back
        pending += blocks;
        const int32_t id = src >= 0 ? seq_fork(src, keep[k]) : seq_new();
        seq_of[order[k]] = id;
        started[k] = 1;
        auto at = std::find_if(active.begin(), active.end(), [&](const Active& a) { return a.k > k; });
        active.insert(at, {k, id, false});
      }
      while (next < P && started[next]) ++next;
      // Kept sequences whose successor has started: no request needs them any more.
      for (size_t i = 0; i < retained.size();) {
        const size_t j = retained[i];
        if (j + 1 < P && !started[j + 1]) {
          ++i;
          continue;
        }
        seq_free(seq_of[order[j]]);
        seq_of[order[j]] = -1;
        retained.erase(retained.begin() + int64_t(i));
      }
      // One step: earlier requests first (their successors wait on them).
      tokens.clear();
      rows.clear();
      steps.clear();
      row_req.clear();
      in_step.clear();
      for (size_t ai = 0; ai < active.size() && int64_t(tokens.size()) < budget; ++ai) {
        Active& a = active[ai];
        const size_t r = order[a.k];
        Seq& s = seqs_[size_t(a.seq)];
        const int64_t L = int64_t(full[r].size()), c = int64_t(pairs[r].first.size());
        const int64_t take = std::min(L - s.kv.len, budget - int64_t(tokens.size()));
        if (take <= 0) continue;
        if (!reserve(s.kv, take)) continue;  // no memory for it this step
        const int64_t row0 = int64_t(tokens.size());
        steps.push_back({s.kv.blocks.data(), s.kv.len, take, row0});
        tokens.insert(tokens.end(), full[r].begin() + s.kv.len, full[r].begin() + s.kv.len + take);
        for (int64_t j = 0; j < take; ++j)
          if (s.kv.len + j >= c - 1) {
            rows.push_back(int32_t(row0 + j));
            row_req.push_back({r, s.kv.len + j - (c - 1)});
          }
        in_step.push_back(ai);
      }
      if (tokens.empty())
        throw KvBudgetExceeded(budget_error("scoring " + std::to_string(P) + " pairs", 1));
      if (step_logits_.size() < rows.size() * size_t(V)) step_logits_.resize(rows.size() * size_t(V));
      const Step stp{tokens.data(), int64_t(tokens.size()), steps.data(), int64_t(steps.size()), rows.data(),
                     int64_t(rows.size())};
      forward(stp, step_logits_.data(), interrupt);
      ++st.steps;
      st.tokens_forwarded += int64_t(tokens.size());
      // Log-softmax of each row in float64; rows in parallel.
      std::vector<double> lp(rows.size());
      std::vector<uint8_t> greedy(rows.size());
      for (size_t i = 0; i < rows.size(); ++i)
        if (!all_finite(step_logits_.data() + i * size_t(V), V))
          throw FormatError(non_finite_logits_error(
              *model_, "scoring pair " + std::to_string(row_req[i].first) + " (continuation token " +
                           std::to_string(row_req[i].second) + ")"));
      backend_->pool().parallel_for(int64_t(rows.size()), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const float* x = step_logits_.data() + size_t(i) * size_t(V);
          const auto& [r, j] = row_req[size_t(i)];
          const int32_t target = pairs[r].second[size_t(j)];
          int64_t arg = 0;
          lp[size_t(i)] = double(x[target]) - log_sum_exp(x, V, &arg);
          greedy[size_t(i)] = arg == target;
        }
      });
      for (size_t i = 0; i < rows.size(); ++i) {
        const auto& [r, j] = row_req[i];
        ScoreResult& res = results[r];
        if (res.logprobs.size() < pairs[r].second.size()) res.logprobs.resize(pairs[r].second.size());
        res.logprobs[size_t(j)] = lp[i];
        if (!greedy[i]) res.is_greedy = false;
      }
      for (size_t k2 = 0; k2 < in_step.size(); ++k2) {
        Active& a = active[in_step[k2]];
        Seq& s = seqs_[size_t(a.seq)];
        const size_t r = order[a.k];
        const int64_t take = steps[k2].n_new;
        s.tokens.insert(s.tokens.end(), full[r].begin() + s.kv.len, full[r].begin() + s.kv.len + take);
        s.kv.len += take;
        if (s.kv.len == int64_t(full[r].size())) a.finished = true;
      }
      // Finished requests: free, unless the next request to start forks from it.
      for (size_t ai = 0; ai < active.size();) {
        if (!active[ai].finished) {
          ++ai;
          continue;
        }
        const size_t k = active[ai].k;
        const int32_t id = active[ai].seq;
        if (k + 1 < P && !started[k + 1] && keep[k + 1] > 0) {
          retained.push_back(k);  // seq_of still points at it for the successor
        } else {
          seq_free(id);
          seq_of[order[k]] = -1;
        }
        active.erase(active.begin() + int64_t(ai));
      }
    }
  } catch (...) {
    cleanup();
    throw;
  }
  cleanup();
  if (stats) *stats = st;
  return results;
}

// ------------------------------------------------------------------------------- Context

namespace {
RuntimeOptions single_sequence(const Model& m, int64_t max_context) {
  if (max_context < 1 || max_context > (int64_t(1) << 20))
    throw InvalidArgument("max_context must be in [1, 1048576], got " + std::to_string(max_context));
  RuntimeOptions o;
  o.max_context = max_context;
  const int64_t blocks = (max_context + kDefaultKvBlock - 1) / kDefaultKvBlock;
  o.kv_budget_bytes = blocks * kv_block_bytes(m.config(), kDefaultKvBlock, KvType::f32);
  o.max_step_tokens = std::min(kDefaultStepTokens, max_context);
  return o;
}
}  // namespace

Context::Context(std::shared_ptr<const Model> model, std::shared_ptr<Backend> backend, int64_t max_context)
    : rt_(model, std::move(backend), single_sequence(*model, max_context)), seq_(rt_.seq_new()) {}

void Context::eval(const int32_t* ids, int64_t n, bool all_logits, float* out, const InterruptFn& interrupt) {
  if (n <= 0) throw InvalidArgument("eval needs at least one token");
  rt_.eval({{seq_, ids, n, all_logits ? Runtime::Logits::all : Runtime::Logits::last}}, out, interrupt);
}

}  // namespace oelm
