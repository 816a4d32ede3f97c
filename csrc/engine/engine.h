// Engine: continuous batching of generation requests over a Runtime.
//
// Requests are admitted between steps (up to max_batch running at once); each step runs one
// forward pass over every running sequence: a decode token for those generating, and a chunk
// of prompt for those still prefilling, within a token budget per step, so a long prompt does
// not stall the others (and within a smaller one, prefill_chunk, while any sequence decodes). Each request has its own sampling parameters and seed, stop conditions
// (EOS, max_new_tokens, the context, stop strings) and cancel flag; its events (tokens with
// their text, and a final event with the finish reason) are queued for the caller.
//
// A sequence's logits do not depend on the rest of the batch (executor.h), and each request
// samples with its own generator, so a seeded request gives the same tokens alone or batched.
//
// Threads: submit(), cancel(), take_events() and wait_events() may be called from any thread.
// step() is called by one thread at a time (the owner), or by the engine's own thread after
// start(). A step holds no lock while it computes, so submitters never wait for a step.
// When the KV budget runs short the most recently admitted sequence is preempted (its blocks
// freed, its tokens kept) and recomputed later: the tokens it produces are unchanged.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

#include "engine/runtime.h"
#include "generate/sampler.h"
#include "generate/text_stream.h"

namespace oelm {

enum class FinishReason { none, eos, length, stop, context, cancelled, error };
const char* finish_reason_name(FinishReason r);
// What kind of failure a FinishReason::error is: the KV budget (the caller can ask for less),
// the model (non-finite logits: a corrupt file), or anything else (out of memory, a bug).
enum class ErrorKind { none, kv_budget, model, internal };
const char* error_kind_name(ErrorKind k);

struct GenerateRequest {
  std::vector<int32_t> prompt;  // token ids, BOS included when wanted
  SamplingParams sampling;
  int64_t max_new_tokens = 128;
  std::vector<std::string> stop;  // stop strings: the text ends before the first
  int32_t logprobs = -1;          // < 0: none; k >= 0: each token's log-probability and the k likeliest
  bool prompt_logprobs = false;   // log-probability of every prompt token after the first
  bool reuse_prefix = true;       // start from the longest cached prefix of the prompt
};

struct TokenLogprob {
  int32_t token;
  float logprob;
};

struct Event {
  uint64_t id = 0;
  int32_t token = -1;  // the new token, or -1 (a final event without one)
  std::string text;    // the text this event adds (TextStream): pieces join to the whole text
  float logprob = 0;   // of token, when logprobs were asked for (log-softmax of the raw logits)
  std::vector<TokenLogprob> top;  // the likeliest tokens, when logprobs > 0
  FinishReason finish = FinishReason::none;  // set on the request's last event
  std::string error;                         // finish == error: what went wrong
  ErrorKind error_kind = ErrorKind::none;    // finish == error: which kind of failure
  // On the last event:
  int64_t n_prompt = 0, n_cached = 0, n_generated = 0, n_decoded = 0;
  double prefill_seconds = 0, decode_seconds = 0;
  // When the engine emitted it: seconds on std::chrono::steady_clock (CLOCK_MONOTONIC on Linux,
  // the clock of Python's time.perf_counter), so a consumer can time its own delivery path.
  double t_emit = 0;
  std::vector<float> prompt_logprobs;  // on the first event, when asked: n_prompt - 1 values
  std::vector<std::vector<TokenLogprob>> prompt_top;  // with prompt_logprobs and logprobs > 0: the
                                                     // likeliest tokens at each of those positions
};

// Prompt tokens one step takes while some sequence is decoding (EngineOptions::prefill_chunk).
constexpr int64_t kDefaultPrefillChunk = 64;

struct EngineOptions {
  int32_t max_batch = 16;  // sequences running at once
  int64_t max_queue = 0;   // waiting requests beyond which submit() refuses; 0 = unbounded
  // Prompt tokens per step while any running sequence is decoding: the prefill of new requests
  // rides along with the decode rows in chunks of at most this many tokens, so a step that also
  // prefills costs a bounded multiple of a decode-only step (the generating requests'
  // inter-token latency), at the price of the new requests' time to first token. Steps with no
  // sequence decoding take prompt tokens up to the whole step budget (max_step_tokens).
  // 0: no separate limit (prefill always up to the step budget). Tokens never change: a
  // sequence's logits do not depend on how its prompt was chunked or batched.
  int64_t prefill_chunk = kDefaultPrefillChunk;
};

class Engine {
 public:
  Engine(std::shared_ptr<Runtime> runtime, const EngineOptions& options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  Runtime& runtime() { return *rt_; }
  const EngineOptions& options() const { return opt_; }

  // Validates and queues a request; returns its id. Throws InvalidArgument for a bad request
  // (naming the field) or a full queue.
  uint64_t submit(GenerateRequest request);
  // Ends a request (queued or running) with finish reason `cancelled`; its KV is freed before
  // the next step (and a step in progress is abandoned and redone without it). Unknown or
  // finished ids are ignored. Returns whether the id was pending.
  bool cancel(uint64_t id);

  // One scheduling step: handle cancellations, admit, run one forward pass, sample, emit
  // events. Returns false when there was nothing to do. `interrupt` is polled between layers;
  // when it returns true the step is abandoned (no state changes) and Interrupted is thrown.
  bool step(const InterruptFn& interrupt = {});

  // Events emitted so far (moved out). wait_events blocks until there is at least one or
  // timeout_s passes; it returns whether any were taken.
  std::vector<Event> take_events();
  bool wait_events(std::vector<Event>& out, double timeout_s);
  // A file descriptor that is readable while events wait to be taken (a pipe, made on the first
  // call; take_events/wait_events drain it), for an event loop to watch (asyncio's add_reader)
  // instead of a thread blocked in wait_events: one wake-up per batch of events, no thread
  // hand-off. Owned by the engine. -1 where pipes are not available (Windows).
  int event_fd();

  // Runs step() on a thread of the engine's own until stop() (or destruction). Errors of a
  // step end the requests in it with finish reason `error` and the message.
  void start();
  void stop();

  bool idle() const;  // nothing queued or running
  bool running_thread() const { return thread_.joinable(); }

  // Held by step() while it runs; hold it to use the Runtime from another thread between steps.
  std::mutex& runtime_mutex() { return step_mu_; }

  struct Stats {
    int64_t running = 0, waiting = 0;
    int64_t submitted = 0, finished = 0, cancelled = 0, preempted = 0;
    int64_t steps = 0, step_tokens = 0, decode_rows = 0, prompt_tokens = 0, cached_tokens = 0, generated = 0;
    int64_t mixed_steps = 0;  // steps that prefilled while some sequence decoded
  };
  Stats stats() const;

 private:
  struct Req;
  void handle_cancels();
  void admit();
  bool preempt_one(const Req* keep);
  void finish(Req& r, FinishReason why, std::string error = {}, ErrorKind kind = ErrorKind::none);
  void close(Req& r, Event& e, FinishReason why);  // completes e as r's final event and emits it
  void emit(Event&& e);
  void sample_row(Req& r, const float* logits, double step_seconds);
  void loop();

  std::shared_ptr<Runtime> rt_;
  EngineOptions opt_;
  const Tokenizer* tok_;

  // Shared with other threads (mu_).
  mutable std::mutex mu_;
  std::condition_variable events_cv_, work_cv_;
  std::deque<std::unique_ptr<Req>> incoming_;
  std::unordered_set<uint64_t> cancels_, pending_ids_;
  std::vector<Event> events_;
  int notify_fd_[2] = {-1, -1};  // event_fd()'s pipe (read, write ends)
  bool notified_ = false;        // a byte is in the pipe
  void drain_notify();           // with mu_ held
  uint64_t next_id_ = 1;
  std::atomic<bool> cancel_pending_{false};
  Stats stats_;

  // Owned by the stepping thread.
  std::mutex step_mu_;  // one step at a time
  std::deque<std::unique_ptr<Req>> waiting_;
  std::vector<std::unique_ptr<Req>> running_;  // admission order
  std::vector<float> logits_;

  std::thread thread_;
  std::atomic<bool> stop_{false};
};

}  // namespace oelm
