// The device-neutral forward interface: what a backend implements to run OpenELM.
//
// A Step is one forward pass over any mix of sequences: prefill chunks and single decode
// tokens together. Every token row goes through the matmuls at once (the weights are read
// once per step); attention runs per sequence over that sequence's own KV blocks. Token i
// of a sequence in the step sits at position n_past + i; its key and value are written to
// the sequence's block table before attention reads them.
//
// Contract: a sequence's logits depend only on its own tokens and KV, never on what else is
// in the step, bit for bit (so batching, speculation and prefix reuse cannot change a token).
//
// The backend owns the memory of the weights, the KV blocks and the activations (host memory
// on the CPU, device memory for CUDA); block ids, block tables, scheduling, sampling and
// sequence bookkeeping live above this interface (engine/) and are the same for every
// backend. docs/ARCHITECTURE.md describes the whole shape.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/error.h"
#include "kernels/kernels.h"
#include "model/model.h"

namespace oelm {

struct StepSeq {
  const int32_t* blocks;  // block table covering positions [0, n_past + n_new), reserved and unshared
  int64_t n_past;         // positions already in the cache
  int64_t n_new;          // tokens of this sequence in the step
  int64_t row0;           // its first token's row in the step (rows are grouped by sequence)
};

struct Step {
  const int32_t* tokens;      // [n_tokens] token ids, each sequence's rows consecutive
  int64_t n_tokens;           // 1 .. max_step_tokens()
  const StepSeq* seqs;        // [n_seqs]
  int64_t n_seqs;
  const int32_t* logit_rows;  // [n_logit_rows] ascending rows whose logits are wanted
  int64_t n_logit_rows;
};

// Where and how the KV cache lives: n_blocks blocks of block_size positions, every layer.
struct KvGeometry {
  int32_t n_blocks = 0;
  int64_t block_size = 0;  // multiple of kKvAlign
  KvType type = KvType::f32;
};

// FFN activation statistics (the flash layout's calibration, python/openelm_rt/flash.py): per
// layer and neuron, in the file's order, the number of tokens on which |act| (the SwiGLU output)
// exceeded that token's mean |act| over the layer, and the sum of |act|.
struct FfnProbe {
  std::vector<std::vector<double>> active, magnitude;
  int64_t tokens = 0;  // rows recorded (each layer sees every row)
};

class Executor {
 public:
  virtual ~Executor() = default;

  virtual const char* name() const = 0;

  // Runs the step: writes the keys and values of its tokens into their blocks and the logits
  // of the requested rows to logits ([n_logit_rows, vocab], host memory). `interrupt` is polled
  // between layers; returning true aborts with oelm::Interrupted, leaving the cache's rows at
  // or past each sequence's n_past unspecified (the caller does not count them as stored).
  virtual void forward(const Step& step, float* logits, const InterruptFn& interrupt) = 0;

  // Copies the first `rows` positions of block src into block dst (every layer and head).
  virtual void copy_block(int32_t src, int32_t dst, int64_t rows) = 0;

  virtual int64_t max_step_tokens() const = 0;
  virtual int64_t max_context() const = 0;
  virtual const KvGeometry& kv_geometry() const = 0;

  // Records FFN activations of every later step into *probe (sized here), until set to nullptr.
  virtual void set_ffn_probe(FfnProbe* probe) {
    if (probe)
      throw InvalidArgument(std::string("the '") + name() + "' executor cannot record FFN activations; use the cpu backend");
  }
};

// Throws InvalidArgument unless max_context, max_step_tokens and the KV geometry are in range
// (every executor's constructor).
void check_executor_limits(const KvGeometry& kv, int64_t max_context, int64_t max_step_tokens);

// The RoPE tables every backend rotates by: [max_context][head_dim / 2] cos and sin.
void rope_tables(const ModelConfig& c, int64_t max_context, std::vector<float>* cos, std::vector<float>* sin);

// Bytes of KV memory one block of `block_size` positions takes, every layer.
int64_t kv_block_bytes(const ModelConfig& c, int64_t block_size, KvType type);

class WeightStreamer;

// The CPU backend's executor: kernels and threads of `backend`, KV blocks in host memory
// (mapped lazily: pages cost memory once written). max_context bounds positions (RoPE table).
// `stream` (optional): where the FFN matrices come from under a memory budget (streaming.h).
std::unique_ptr<Executor> make_cpu_executor(std::shared_ptr<const Model> model, std::shared_ptr<Backend> backend,
                                            const KvGeometry& kv, int64_t max_context, int64_t max_step_tokens,
                                            std::shared_ptr<WeightStreamer> stream = nullptr);

// Bytes of activations and scratch the CPU executor and its backend use for steps of up to
// max_step_tokens rows (the memory planner counts them).
int64_t cpu_scratch_bytes(const Model& m, int64_t max_context, int64_t max_step_tokens);

}  // namespace oelm
