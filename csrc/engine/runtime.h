// Runtime: one model on one backend with a paged KV cache, and the sequences that live in
// it. It turns sequence operations (new, fork, truncate, free, append tokens) into batched
// Executor steps and keeps the block tables; scoring (score_batch) and the generation engine
// (engine.h) are built on it. Not thread-safe: one thread drives a Runtime at a time (the
// Engine serialises its callers).
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "engine/kv_cache.h"
#include "model/executor.h"
#include "model/model.h"
#include "model/streaming.h"

namespace oelm {

// The default KV budget's room when no max_batch says otherwise, in sequences of max_context.
constexpr int64_t kDefaultBudgetSequences = 4;

struct RuntimeOptions {
  int64_t max_context = 0;      // positions a sequence may hold; 0: the model's training context
  int64_t kv_budget_bytes = 0;  // KV memory, all sequences; 0: kv_budget_default()
  int64_t budget_sequences = kDefaultBudgetSequences;  // the default budget's room, in sequences of max_context
  int64_t block_size = 0;       // positions per KV block (multiple of 16); 0: kDefaultKvBlock
  KvType kv_type = KvType::f32;
  int64_t max_step_tokens = 0;  // rows per forward step; 0: kDefaultStepTokens
  int32_t prefix_cache_entries = 0;  // finished sequences kept for prefix reuse; 0: none
  // Cap on the memory the model takes (resident weights, KV cache, activations, logits, read
  // buffers); 0: none, every weight resident. Under a cap the KV cache defaults to one
  // sequence of max_context, and FFN matrices that do not fit are read from the file at every
  // step (streaming.h); below the minimum the constructor throws, stating it.
  int64_t memory_budget_bytes = 0;
  StreamOptions stream;
};

// Positions per KV block; docs/ARCHITECTURE.md gives the measurement behind the choice.
constexpr int64_t kDefaultKvBlock = 16;
constexpr int64_t kDefaultStepTokens = 256;

struct ScoreResult {
  std::vector<double> logprobs;  // log p(continuation[i] | context, continuation[:i])
  bool is_greedy = true;         // every continuation token is the argmax (lowest id on ties)
};

struct ScoreStats {
  int64_t pairs = 0;
  int64_t tokens_requested = 0;  // sum over pairs of len(context) + len(continuation) - 1
  int64_t tokens_forwarded = 0;  // rows actually run through the model
  int64_t steps = 0;
};

class Runtime {
 public:
  Runtime(std::shared_ptr<const Model> model, std::shared_ptr<Backend> backend, const RuntimeOptions& options);
  ~Runtime();

  const Model& model() const { return *model_; }
  const std::shared_ptr<const Model>& model_ptr() const { return model_; }
  Executor& executor() { return *exec_; }
  Backend& backend() { return *backend_; }
  KvCache& kv() { return *kv_; }
  PrefixCache& prefix_cache() { return prefix_; }
  int64_t max_context() const { return exec_->max_context(); }
  int64_t max_step_tokens() const { return exec_->max_step_tokens(); }
  int64_t kv_budget_bytes() const { return budget_bytes_; }
  // The memory plan (null without memory_budget_bytes) and the weight stream (null when
  // nothing streams).
  const MemoryPlan* memory_plan() const { return plan_ ? &*plan_ : nullptr; }
  const WeightStreamer* streamer() const { return stream_.get(); }
  // FFN activation statistics of later steps (executor.h, FfnProbe); false stops and frees them.
  void set_ffn_probe(bool on);
  const FfnProbe* ffn_probe() const { return probe_.get(); }

  // ---- sequences: small integer handles, reused after seq_free ----
  int32_t seq_new();
  // A new sequence sharing parent's first n positions (n < 0: all of them).
  int32_t seq_fork(int32_t parent, int64_t n = -1);
  void seq_truncate(int32_t id, int64_t n);
  void seq_free(int32_t id);
  int64_t seq_len(int32_t id) const { return seq(id).kv.len; }
  const std::vector<int32_t>& seq_tokens(int32_t id) const { return seq(id).tokens; }
  SeqKv& seq_kv(int32_t id) { return seq(id).kv; }
  bool seq_exists(int32_t id) const;
  int32_t n_seqs() const { return n_live_; }
  // Throws InvalidArgument naming `what` when id is not a live sequence.
  void check_seq(int32_t id, const char* what) const;

  // ---- evaluation ----
  enum class Logits { none, last, all };
  struct EvalEntry {
    int32_t seq;
    const int32_t* tokens;
    int64_t n;
    Logits logits;
  };
  // Rows of logits eval() writes for these entries.
  static int64_t logit_rows(const std::vector<EvalEntry>& entries);
  // Appends each entry's tokens to its sequence (distinct sequences), in batched steps of up
  // to max_step_tokens rows, and writes the requested logits to out [logit_rows, vocab]:
  // entry by entry, position order. All or nothing: on an error or interruption every
  // sequence is as before the call.
  void eval(const std::vector<EvalEntry>& entries, float* out, const InterruptFn& interrupt = {});

  // Log-probabilities of each continuation given its context (log-softmax in float64).
  // Pairs sharing a prefix compute it once: requests start in lexicographic order, up to 32 at a
  // time, each forking its shared prefix from a live sequence that holds it (its predecessor's,
  // or an earlier one's while the predecessor has not got that far: then later requests do not
  // wait for it), and run in batched steps of whole 12-token groups.
  std::vector<ScoreResult> score_batch(const std::vector<std::pair<std::vector<int32_t>, std::vector<int32_t>>>& pairs,
                                       const InterruptFn& interrupt = {}, ScoreStats* stats = nullptr);

  // ---- for the engine ----
  // reserve() on the pool, evicting prefix-cache entries (least recently used first) until it fits.
  bool reserve(SeqKv& kv, int64_t n);
  // The error when `what` needs `blocks` more KV blocks than the budget can give.
  std::string budget_error(const std::string& what, int64_t blocks) const;
  // After a step: the sequence's next n positions (reserved, just written by the step) now
  // hold tokens[0..n).
  void seq_append(int32_t id, const int32_t* tokens, int64_t n);
  // Runs one step through the executor and counts it.
  void forward(const Step& step, float* logits, const InterruptFn& interrupt);
  // Puts tokens[0..n) of sequence id into the prefix cache (n <= its length).
  void cache_prefix(int32_t id, int64_t n);
  // A new sequence starting from the longest cached prefix of tokens[0..n) of at most max_len
  // positions (the sequence's tokens are that prefix); returns its id and the prefix length.
  std::pair<int32_t, int64_t> seq_from_cache(const int32_t* tokens, int64_t n, int64_t max_len);
  // The same into an existing empty sequence; returns the prefix length.
  int64_t seq_load_prefix(int32_t id, const int32_t* tokens, int64_t n, int64_t max_len);

  int64_t tokens_forwarded() const { return tokens_forwarded_; }
  int64_t steps() const { return steps_; }

 private:
  struct Seq {
    SeqKv kv;
    std::vector<int32_t> tokens;  // the tokens of positions [0, kv.len)
    bool live = false;
  };
  Seq& seq(int32_t id);
  const Seq& seq(int32_t id) const;
  void eval_steps(const std::vector<EvalEntry>& entries, float* out, const InterruptFn& interrupt);

  std::shared_ptr<const Model> model_;
  std::shared_ptr<Backend> backend_;
  std::optional<MemoryPlan> plan_;
  std::shared_ptr<WeightStreamer> stream_;
  std::unique_ptr<FfnProbe> probe_;
  std::unique_ptr<Executor> exec_;
  std::unique_ptr<KvCache> kv_;
  PrefixCache prefix_;
  int64_t budget_bytes_ = 0;
  std::vector<Seq> seqs_;
  std::vector<int32_t> free_ids_;
  int32_t n_live_ = 0;
  std::vector<float> step_logits_;
  int64_t tokens_forwarded_ = 0, steps_ = 0;
};

// log(sum_v exp(x[v])) over a row of logits, accumulated in float64, and the argmax (lowest
// index on ties) in *argmax: log-softmax(x)[t] = x[t] - log_sum_exp(x). Scoring and the
// engine's logprobs use it.
double log_sum_exp(const float* x, int64_t n, int64_t* argmax);

// Whether x[0..n) holds no NaN and no infinity.
bool all_finite(const float* x, int64_t n);
// The error for logits holding a NaN or an infinity (`where`: which sequence and position):
// a model file whose tensor data is corrupt computes them (tensor CRCs are checked only with
// verify), so it names the file and the check (openelm-rt info --verify). eval() and
// score_batch() throw it as a FormatError; the engine ends the request with it.
std::string non_finite_logits_error(const Model& model, const std::string& where);

// The default KV budget: room for `sequences` sequences of max_context (a session's max_batch),
// but at most a quarter of the machine's memory (and at least one sequence). The pages are
// committed only as sequences fill them.
int64_t kv_budget_default(const ModelConfig& c, int64_t max_context, KvType type, int64_t sequences);

// One sequence with an append-only API, as the runtime had before paging (tests, benchmarks
// and Session.logits use it): its own Runtime sized for exactly max_context positions.
class Context {
 public:
  Context(std::shared_ptr<const Model> model, std::shared_ptr<Backend> backend, int64_t max_context);

  const Model& model() const { return rt_.model(); }
  int64_t n_past() const { return rt_.seq_len(seq_); }
  int64_t max_context() const { return rt_.max_context(); }
  void reset() { rt_.seq_truncate(seq_, 0); }

  // Evaluates ids[0..n) at positions n_past .. n_past+n-1 and appends them. Writes logits
  // for every token (all_logits: out is [n, vocab]) or only the last one (out is [vocab]).
  // On an exception the sequence is as before the call.
  void eval(const int32_t* ids, int64_t n, bool all_logits, float* out, const InterruptFn& interrupt = {});

 private:
  Runtime rt_;
  int32_t seq_;
};

}  // namespace oelm
