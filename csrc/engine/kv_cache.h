// The paged KV cache's bookkeeping, the same for every backend: a pool of fixed-size blocks
// (ids and reference counts only; the backend owns the memory behind the ids), each
// sequence's block table, and the operations on it: reserve (append), truncate, fork, release.
// Fork shares every block of the parent; the first write into a block that is shared copies
// it (copy on write, through the backend's copy function), so a fork never changes its parent.
// Also the prefix cache: finished sequences' blocks kept for reuse, least recently used first out.
#pragma once
#include <cstdint>
#include <functional>
#include <list>
#include <string>
#include <vector>

namespace oelm {

// One sequence's KV: block ids covering positions [0, len) (and perhaps more, reserved).
struct SeqKv {
  std::vector<int32_t> blocks;
  int64_t len = 0;  // positions whose keys and values are stored
};

class KvCache {
 public:
  // copy(src, dst, rows): copy the first `rows` positions of block src into block dst, every
  // layer and head (the backend's memory).
  using CopyFn = std::function<void(int32_t src, int32_t dst, int64_t rows)>;

  // n_blocks >= 1; block_size a multiple of 16 (kernels.h, kKvAlign). `budget_text` names the
  // budget in errors ("256.0 MiB (2048 blocks of 16 tokens)") with what to change.
  KvCache(int32_t n_blocks, int64_t block_size, CopyFn copy, std::string budget_text);

  int64_t block_size() const { return bs_; }
  int32_t n_blocks() const { return int32_t(refs_.size()); }
  int32_t n_free() const { return int32_t(free_.size()); }
  int32_t refcount(int32_t id) const { return refs_[size_t(id)]; }
  const std::string& budget_text() const { return budget_text_; }

  // Blocks reserve(kv, n) would take from the pool: new blocks past the table, plus one if the
  // block that position kv.len falls in is shared (it is copied before it is written).
  int64_t blocks_needed(const SeqKv& kv, int64_t n) const;

  // Makes positions [kv.len, kv.len + n) writable by this sequence alone: appends blocks and
  // copies a shared block that will be written. Does not change kv.len. Returns false, having
  // changed nothing, when the pool has fewer free blocks than blocks_needed(kv, n).
  bool reserve(SeqKv& kv, int64_t n);

  // Keeps the first n positions (n <= kv.len); blocks past them go back to the pool.
  void truncate(SeqKv& kv, int64_t n);

  // A new sequence sharing the blocks of kv's first n positions (n <= kv.len).
  SeqKv fork(const SeqKv& kv, int64_t n);

  // Returns every block of kv (kv becomes empty).
  void release(SeqKv& kv);

 private:
  void unref(int32_t id);

  int64_t bs_;
  CopyFn copy_;
  std::string budget_text_;
  std::vector<int32_t> refs_;
  std::vector<int32_t> free_;  // LIFO: the block freed last, still in the CPU's caches, goes out first
};

// Finished sequences (token ids and the blocks holding their keys and values), looked up by
// the longest common token prefix with a new prompt. Bounded by entries; when the pool runs
// short the least recently used entry is evicted first. An entry that is a prefix of a new one
// is replaced by it (its blocks are shared anyway).
class PrefixCache {
 public:
  explicit PrefixCache(int32_t max_entries) : max_entries_(max_entries) {}

  int32_t size() const { return int32_t(entries_.size()); }
  bool enabled() const { return max_entries_ > 0; }

  // The longest common prefix of tokens[0..n) with an entry, capped at max_len; when it is
  // >= 1, *out becomes a fork of that entry's first lcp positions. Returns lcp (0: no match).
  int64_t lookup(const int32_t* tokens, int64_t n, int64_t max_len, KvCache& kv, SeqKv* out);

  // Keeps tokens[0..n), whose keys and values are kv's first n positions (n <= kv.len).
  void insert(const int32_t* tokens, int64_t n, const SeqKv& kv, KvCache& cache);

  // Releases the least recently used entry; false when there is none.
  bool evict_one(KvCache& cache);

  void clear(KvCache& cache);

 private:
  struct Entry {
    std::vector<int32_t> tokens;
    SeqKv kv;
  };
  int32_t max_entries_;
  std::list<Entry> entries_;  // most recently used first
};

}  // namespace oelm
