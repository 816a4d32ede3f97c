// Block pool, block tables and the prefix cache (kv_cache.h).
#include "engine/kv_cache.h"

#include <algorithm>

#include "common/error.h"

namespace oelm {

KvCache::KvCache(int32_t n_blocks, int64_t block_size, CopyFn copy, std::string budget_text)
    : bs_(block_size), copy_(std::move(copy)), budget_text_(std::move(budget_text)) {
  if (n_blocks < 1) throw InvalidArgument("the KV cache needs at least one block");
  if (block_size < 16 || block_size % 16)
    throw InvalidArgument("kv block size must be a positive multiple of 16, got " + std::to_string(block_size));
  refs_.assign(size_t(n_blocks), 0);
  free_.reserve(size_t(n_blocks));
  for (int32_t i = n_blocks - 1; i >= 0; --i) free_.push_back(i);  // block 0 goes out first
}

int64_t KvCache::blocks_needed(const SeqKv& kv, int64_t n) const {
  if (n <= 0) return 0;
  const int64_t first = kv.len / bs_, end = (kv.len + n + bs_ - 1) / bs_, have = int64_t(kv.blocks.size());
  int64_t need = std::max<int64_t>(0, end - have);
  for (int64_t i = first; i < std::min(end, have); ++i)
    if (refs_[size_t(kv.blocks[size_t(i)])] > 1) ++need;  // shared: copied before the write
  return need;
}

bool KvCache::reserve(SeqKv& kv, int64_t n) {
  if (n <= 0) return true;
  if (blocks_needed(kv, n) > int64_t(free_.size())) return false;
  const int64_t first = kv.len / bs_, end = (kv.len + n + bs_ - 1) / bs_;
  for (int64_t i = first; i < std::min<int64_t>(end, int64_t(kv.blocks.size())); ++i) {
    int32_t& id = kv.blocks[size_t(i)];
    if (refs_[size_t(id)] <= 1) continue;
    const int32_t fresh = free_.back();
    free_.pop_back();
    refs_[size_t(fresh)] = 1;
    const int64_t rows = std::clamp<int64_t>(kv.len - i * bs_, 0, bs_);
    if (rows > 0) copy_(id, fresh, rows);
    --refs_[size_t(id)];  // still > 0: the other holders keep it
    id = fresh;
  }
  while (int64_t(kv.blocks.size()) < end) {
    const int32_t fresh = free_.back();
    free_.pop_back();
    refs_[size_t(fresh)] = 1;
    kv.blocks.push_back(fresh);
  }
  return true;
}

void KvCache::unref(int32_t id) {
  if (--refs_[size_t(id)] == 0) free_.push_back(id);
}

void KvCache::truncate(SeqKv& kv, int64_t n) {
  if (n < 0 || n > kv.len)
    throw InvalidArgument("cannot truncate a sequence of " + std::to_string(kv.len) + " tokens to " +
                          std::to_string(n) + "; the length must be in [0, " + std::to_string(kv.len) + "]");
  const size_t keep = size_t((n + bs_ - 1) / bs_);
  while (kv.blocks.size() > keep) {
    unref(kv.blocks.back());
    kv.blocks.pop_back();
  }
  kv.len = n;
}

SeqKv KvCache::fork(const SeqKv& kv, int64_t n) {
  if (n < 0 || n > kv.len)
    throw InvalidArgument("cannot fork the first " + std::to_string(n) + " tokens of a sequence of " +
                          std::to_string(kv.len));
  SeqKv child;
  child.blocks.assign(kv.blocks.begin(), kv.blocks.begin() + (n + bs_ - 1) / bs_);
  for (int32_t id : child.blocks) ++refs_[size_t(id)];
  child.len = n;
  return child;
}

void KvCache::release(SeqKv& kv) {
  for (int32_t id : kv.blocks) unref(id);
  kv.blocks.clear();
  kv.len = 0;
}

// ---------------------------------------------------------------------------- prefix cache

namespace {
int64_t common_prefix(const int32_t* a, int64_t na, const int32_t* b, int64_t nb) {
  const int64_t n = std::min(na, nb);
  int64_t i = 0;
  while (i < n && a[i] == b[i]) ++i;
  return i;
}
}  // namespace

int64_t PrefixCache::lookup(const int32_t* tokens, int64_t n, int64_t max_len, KvCache& kv, SeqKv* out) {
  auto best = entries_.end();
  int64_t best_len = 0;
  for (auto it = entries_.begin(); it != entries_.end(); ++it) {
    const int64_t l = std::min(max_len, common_prefix(tokens, n, it->tokens.data(), int64_t(it->tokens.size())));
    if (l > best_len) {
      best_len = l;
      best = it;
    }
  }
  if (best_len == 0) return 0;
  entries_.splice(entries_.begin(), entries_, best);  // most recently used
  *out = kv.fork(best->kv, best_len);
  return best_len;
}

void PrefixCache::insert(const int32_t* tokens, int64_t n, const SeqKv& kv, KvCache& cache) {
  if (max_entries_ <= 0 || n <= 0) return;
  for (auto it = entries_.begin(); it != entries_.end();) {
    const int64_t len = int64_t(it->tokens.size());
    const int64_t l = common_prefix(tokens, n, it->tokens.data(), len);
    if (l == n) {  // the new one is already covered: just mark the entry used
      entries_.splice(entries_.begin(), entries_, it);
      return;
    }
    if (l == len) {  // the entry is a prefix of the new one: superseded
      cache.release(it->kv);
      it = entries_.erase(it);
    } else {
      ++it;
    }
  }
  entries_.push_front(Entry{std::vector<int32_t>(tokens, tokens + n), cache.fork(kv, n)});
  while (int32_t(entries_.size()) > max_entries_) evict_one(cache);
}

bool PrefixCache::evict_one(KvCache& cache) {
  if (entries_.empty()) return false;
  cache.release(entries_.back().kv);
  entries_.pop_back();
  return true;
}

void PrefixCache::clear(KvCache& cache) {
  while (evict_one(cache)) {
  }
}

}  // namespace oelm
