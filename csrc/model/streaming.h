// Running a model in less memory than its file ("LLM in a flash", exact mode): a planner that
// decides, under a memory budget, which feed-forward matrices stay resident and which are
// read from the file at every forward step, and the I/O that reads them.
//
// Exact by construction: a streamed matrix is read whole into a buffer and multiplied by the
// same kernel as the resident one, so the logits are the resident path's, bit for bit.
// Resident: embeddings / LM head, attention, norms, the tokenizer, and as many FFN matrices as
// the budget holds (largest first: every byte kept resident is a byte not read per step).
// Streamed layers are read in the order the forward pass uses them, by a prefetch thread into
// two buffers: layer i+1's FFN is read while layer i computes (and the next step's first layer
// while the caller samples). docs/MEMORY.md.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <sys/types.h>

#include "common/thread_pool.h"
#include "model/model.h"

namespace oelm {

// ------------------------------------------------------------------------------ the planner

struct MemoryPlan {
  int64_t budget = 0;          // bytes the runtime may allocate for the model
  int64_t resident_fixed = 0;  // always resident: every tensor but the FFN matrices
  int64_t resident_ffn = 0;    // FFN matrices kept resident
  int64_t kv_bytes = 0;        // the KV cache at its configured size
  int64_t scratch_bytes = 0;   // activations, logits, RoPE tables, quantized activations
  int64_t io_bytes = 0;        // the two read buffers (0 when nothing streams)
  // The rest the runtime allocates: what loading the model took on the heap (parsed metadata,
  // tokenizer, tables; Model::load_heap_bytes, rounded up to 256 KiB) plus kOtherReserve for thread stacks, the
  // allocator's per-thread arenas and small bookkeeping.
  int64_t other_bytes = 0;
  int64_t streamed_bytes = 0;  // read from the file per forward step
  int64_t minimum = 0;         // the smallest budget that works
  int64_t model_bytes = 0;     // the file's tensors
  struct Layer {
    bool gate_up = false, down = false;  // streamed? (flash layout: both true when a tail streams)
    // Flash layout: bundles [first_bundle, n_bundles) stream, the rest are resident.
    int64_t first_bundle = 0, n_bundles = 0;
  };
  std::vector<Layer> layers;

  bool streams() const { return streamed_bytes > 0; }
  int64_t total() const { return resident_fixed + resident_ffn + kv_bytes + scratch_bytes + io_bytes + other_bytes; }
  static constexpr int64_t kOtherReserve = int64_t(1) << 20;
  // The plan for people: what is resident, what streams, bytes per step.
  std::string text() const;
};

// "12.3 MiB": sizes in messages and plans.
std::string mib_text(int64_t bytes);

// Plans `budget` bytes for model m (whole FFN matrices, or in a flash-layout file each layer's
// coldest bundles) given the KV cache and scratch sizes; throws
// InvalidArgument stating the minimum when the budget is below it.
MemoryPlan plan_memory(const Model& m, int64_t budget, int64_t kv_bytes, int64_t scratch_bytes);

// -------------------------------------------------------------------------- the I/O engine

struct IoStats {
  uint64_t bytes = 0;     // bytes read into buffers
  uint64_t requests = 0;  // coalesced ranges read
  uint64_t syscalls = 0;  // pread calls (chunks, retries included)
  uint64_t retries = 0;   // short reads and EINTR retried
  double read_s = 0;      // wall time inside read()
};

// Reads ranges of one file into memory with pread from a small thread pool, in chunks of
// kChunk bytes. Direct mode opens the file with O_DIRECT (no page cache: offsets, lengths and
// buffers aligned to kAlign); where the file system refuses O_DIRECT (tmpfs) it falls back to
// buffered reads, each followed by POSIX_FADV_DONTNEED so the page cache does not keep what
// was read, and says so (fell_back()). Short reads and EINTR are retried; an error throws, and
// so does the end of the file before a range's last page (a range may end in the file's last,
// partial page: direct reads are whole pages).
class IoEngine {
 public:
  static constexpr uint64_t kAlign = 4096;
  static constexpr uint64_t kChunk = uint64_t(1) << 20;
  enum class Mode { direct, buffered };
  struct Range {
    uint64_t offset, length;
    uint8_t* dst;
  };
  using PreadFn = ssize_t (*)(int, void*, size_t, off_t);

  IoEngine(const std::string& path, Mode mode, int threads);
  ~IoEngine();
  IoEngine(const IoEngine&) = delete;
  IoEngine& operator=(const IoEngine&) = delete;

  Mode mode() const { return mode_; }
  bool fell_back() const { return fell_back_; }  // direct was asked for and refused
  void read(const std::vector<Range>& ranges);
  IoStats stats() const;
  // Tests: inject short reads and EINTR.
  void set_pread_for_testing(PreadFn fn) { pread_ = fn; }

 private:
  void read_chunk(const Range& r);

  int fd_ = -1;
  uint64_t file_size_ = 0;
  Mode mode_;
  bool fell_back_ = false;
  ThreadPool pool_;
  PreadFn pread_;
  std::atomic<uint64_t> bytes_{0}, requests_{0}, syscalls_{0}, retries_{0};
  std::atomic<uint64_t> read_ns_{0};
};

// Merges ranges whose gap is at most max_gap bytes (sorted by offset): the layout of one
// streamed layer's matrices inside its buffer. Each output range covers inputs [first, last].
struct IoGroup {
  uint64_t offset, length;  // in the file, aligned to IoEngine::kAlign
  uint64_t buffer_offset;   // where the group starts in the buffer
};
std::vector<IoGroup> coalesce(std::vector<std::pair<uint64_t, uint64_t>> ranges, uint64_t max_gap);

// ------------------------------------------------------------------------ the weight stream

struct StreamOptions {
  // "direct" (O_DIRECT, the default), "buffered" (pread through the page cache, dropped
  // after each read), or "mmap" (benchmarks' baseline: the mapped file, its pages of streamed
  // matrices dropped after each use, as a memory cap that cannot hold them would).
  std::string io = "direct";
  int io_threads = 4;
  bool prefetch = true;  // false: each layer read when needed, nothing overlapped (the naive baseline)
};

struct StreamStats {
  IoStats io;
  uint64_t layers_streamed = 0;  // layer reads consumed
  double wait_s = 0;             // forward time spent waiting for reads
};

class WeightStreamer {
 public:
  WeightStreamer(std::shared_ptr<const Model> model, const MemoryPlan& plan, const StreamOptions& options);
  ~WeightStreamer();
  WeightStreamer(const WeightStreamer&) = delete;
  WeightStreamer& operator=(const WeightStreamer&) = delete;

  struct Ffn {
    const TensorView* gate_up;
    const TensorView* down;
    const LayerWeights::Bundle* bundles;  // flash layout: the layer's bundles (gate_up, down null)
  };
  // Before a forward step: realigns the stream if the previous step stopped part way.
  void begin_step();
  // Layer li's FFN matrices: resident ones from the model, streamed ones once read (waits).
  Ffn acquire(size_t li);
  // The forward pass is done with layer li's matrices: their buffer may be refilled.
  void release(size_t li);

  const MemoryPlan& plan() const { return plan_; }
  const StreamOptions& options() const { return opt_; }
  bool io_fell_back() const { return io_ && io_->fell_back(); }
  StreamStats stats() const;

 private:
  struct Item {  // one streamed layer
    size_t layer;
    bool flash = false;                            // a tail of bundles, not whole matrices
    std::vector<LayerWeights::Bundle> bundles[2];  // flash: every bundle, the tail's in buffer 0 / 1
    std::vector<IoGroup> groups;
    TensorView gate_up[2], down[2];  // views into buffer 0 and 1 (unused if resident)
    bool stream_gate_up, stream_down;
    std::vector<std::pair<const uint8_t*, uint64_t>> mapped;  // mmap mode: what to drop after use
  };
  void producer();
  void fill(const Item& it, int slot);
  void drop_mapped(const Item& it);

  std::shared_ptr<const Model> model_;
  MemoryPlan plan_;
  StreamOptions opt_;
  std::unique_ptr<IoEngine> io_;
  int fd_ = -1;  // mmap mode: for posix_fadvise
  std::vector<Item> items_;
  std::vector<int> item_of_layer_;  // -1: resident
  uint8_t* buf_[2] = {nullptr, nullptr};
  uint64_t slot_bytes_ = 0;

  // Cyclic schedule: read number k is items_[k % n] into buffer k % 2.
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t produced_ = 0;  // reads completed
  uint64_t consumed_ = 0;  // reads released by the forward pass
  bool held_ = false;      // the forward pass holds read number consumed_
  bool stop_ = false;
  std::exception_ptr error_;
  std::thread thread_;
  std::atomic<uint64_t> layers_streamed_{0}, wait_ns_{0};
};

}  // namespace oelm
