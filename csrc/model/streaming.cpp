// The memory planner, the I/O engine and the weight stream (streaming.h).
#include "model/streaming.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#include "common/error.h"

namespace oelm {

namespace {

uint64_t align_down(uint64_t x) { return x / IoEngine::kAlign * IoEngine::kAlign; }
uint64_t align_up(uint64_t x) { return (x + IoEngine::kAlign - 1) / IoEngine::kAlign * IoEngine::kAlign; }

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Gaps up to this size between a layer's streamed matrices are read rather than skipped
// (one request instead of two; the exporter pads tensors to 4 KiB).
constexpr uint64_t kMaxGap = 64 * 1024;

// Buffer bytes of one layer's streamed matrices (coalesced, aligned).
uint64_t item_bytes(const LayerWeights& L, bool gate_up, bool down) {
  std::vector<std::pair<uint64_t, uint64_t>> r;
  if (gate_up) r.push_back({L.gate_up->offset, L.gate_up->size});
  if (down) r.push_back({L.down->offset, L.down->size});
  uint64_t n = 0;
  for (const IoGroup& g : coalesce(r, kMaxGap)) n += g.length;
  return n;
}

// Small pages for the whole mapped file (see the WeightStreamer constructor).
void no_huge_pages(const Model& m) {
  const TensorView& first = m.file().tensors().front();
  const uintptr_t base = reinterpret_cast<uintptr_t>(first.data) - first.offset;  // the file's first byte
  madvise(reinterpret_cast<void*>(align_down(base)), align_up(base + m.file().file_size()) - align_down(base),
          MADV_NOHUGEPAGE);
}

}  // namespace

// ------------------------------------------------------------------------------ the planner

std::string mib_text(int64_t bytes) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.1f MiB", double(bytes) / (1024.0 * 1024.0));
  return buf;
}

std::string MemoryPlan::text() const {
  std::string s = "memory plan: budget " + mib_text(budget) + " (model file " + mib_text(model_bytes) + ")\n";
  int n_res = 0, n_both = 0, n_gu = 0, n_dn = 0;
  for (const Layer& l : layers) {
    if (!l.gate_up && !l.down) ++n_res;
    else if (l.gate_up && l.down) ++n_both;
    else if (l.gate_up) ++n_gu;
    else ++n_dn;
  }
  s += "  resident: embeddings, attention, norms, tokenizer " + mib_text(resident_fixed) + "; FFN " + mib_text(resident_ffn) +
       " (" + std::to_string(n_res) + " of " + std::to_string(layers.size()) + " layers whole";
  if (n_gu + n_dn) s += ", " + std::to_string(n_gu + n_dn) + " in part";
  s += ")\n  KV cache " + mib_text(kv_bytes) + ", activations and logits " + mib_text(scratch_bytes) + ", read buffers " +
       mib_text(io_bytes) + ", other (parsed metadata, tokenizer, threads) " + mib_text(other_bytes) + "\n";
  if (streams())
    s += "  streamed per forward step: " + mib_text(streamed_bytes) + " (FFN of " + std::to_string(n_both + n_gu + n_dn) +
         " layers: " + std::to_string(n_both) + " gate_up+down, " + std::to_string(n_gu) + " gate_up only, " +
         std::to_string(n_dn) + " down only)\n";
  else
    s += "  streamed: nothing (the whole model fits)\n";
  int64_t nb = 0, nb_streamed = 0;
  for (const Layer& l : layers) {
    nb += l.n_bundles;
    if (l.gate_up) nb_streamed += l.n_bundles - l.first_bundle;
  }
  if (nb > 0)
    s += "  flash layout: " + std::to_string(nb_streamed) + " of " + std::to_string(nb) +
         " neuron bundles stream (each layer's coldest, one sequential read per layer)\n";
  s += "  total " + mib_text(total()) + " of " + mib_text(budget) + "; minimum budget " + mib_text(minimum);
  return s;
}

namespace {

[[noreturn]] void below_minimum(const MemoryPlan& p, int64_t minimum) {
  throw InvalidArgument("memory_budget of " + mib_text(p.budget) + " is below the minimum of " + mib_text(minimum) +
                        " for this model (" + mib_text(p.resident_fixed) + " always resident: embeddings, attention, "
                        "norms; KV cache " + mib_text(p.kv_bytes) + "; activations and logits " + mib_text(p.scratch_bytes) +
                        "; other " + mib_text(p.other_bytes) +
                        "; two read buffers for the largest streamed layer): raise memory_budget to at least " +
                        mib_text(minimum) + ", or shrink the KV cache (kv_budget, max_context)");
}

// The flash layout: each layer streams a tail of its coldest bundles. Every streamed byte costs
// the same read, so the plan streams as few bytes as the budget allows, spread over the layers
// as evenly as their widths permit: the read buffers hold the largest tail twice, so a cap S on
// any one layer's tail is also what the buffers cost. For each candidate cap (a tail size of
// some layer), every layer streams its longest tail within S; the smallest cap that fits the
// budget wins, and bundles beyond what it must stream go back to being resident.
MemoryPlan plan_flash(const Model& m, MemoryPlan p, int64_t base, int64_t ffn_all) {
  const std::vector<LayerWeights>& layers = m.layers();
  const size_t n = layers.size();
  std::vector<std::vector<int64_t>> tail(n);  // tail[i][k]: bytes of bundles [k, end) of layer i
  std::vector<int64_t> caps;
  for (size_t i = 0; i < n; ++i) {
    const auto& B = layers[i].bundles;
    tail[i].assign(B.size() + 1, 0);
    for (size_t k = B.size(); k-- > 0;) {
      tail[i][k] = tail[i][k + 1] + int64_t(B[k].bytes);
      caps.push_back(tail[i][k]);
    }
  }
  std::sort(caps.begin(), caps.end());
  caps.erase(std::unique(caps.begin(), caps.end()), caps.end());
  p.layers.assign(n, MemoryPlan::Layer{});
  for (size_t i = 0; i < n; ++i) p.layers[i].first_bundle = p.layers[i].n_bundles = int64_t(layers[i].bundles.size());
  int64_t minimum = base + ffn_all;
  {
    bool found = base + ffn_all <= p.budget;  // everything fits: nothing streams
    std::vector<int64_t> first(n);
    for (const int64_t cap : caps) {
      int64_t streamed = 0, slot = 0;
      for (size_t i = 0; i < n; ++i) {
        size_t k = 0;
        while (tail[i][k] > cap) ++k;
        first[i] = int64_t(k);
        streamed += tail[i][k];
        slot = std::max(slot, tail[i][k]);
      }
      const int64_t need = base + ffn_all - streamed + 2 * slot;
      minimum = std::min(minimum, need);
      if (found || need > p.budget) continue;
      found = true;
      // Stream no more than the budget requires: bundles go back to residency, the layers with
      // the longest tails first, while what still streams covers the shortfall.
      const int64_t must = base + ffn_all + 2 * slot - p.budget;
      for (bool moved = true; moved;) {
        moved = false;
        std::vector<size_t> order(n);
        for (size_t i = 0; i < n; ++i) order[i] = i;
        std::stable_sort(order.begin(), order.end(),
                         [&](size_t a, size_t b) { return tail[a][size_t(first[a])] > tail[b][size_t(first[b])]; });
        for (size_t i : order) {
          const size_t k = size_t(first[i]);
          if (k >= layers[i].bundles.size()) continue;
          const int64_t b = int64_t(layers[i].bundles[k].bytes);
          if (streamed - b >= must) {
            streamed -= b;
            ++first[i];
            moved = true;
          }
        }
      }
      int64_t io = 0;
      for (size_t i = 0; i < n; ++i) {
        MemoryPlan::Layer& l = p.layers[i];
        l.first_bundle = first[i];
        l.gate_up = l.down = first[i] < l.n_bundles;
        io = std::max(io, tail[i][size_t(first[i])]);
      }
      p.streamed_bytes = streamed;
      p.io_bytes = streamed ? 2 * io : 0;
    }
    if (!found) below_minimum(p, minimum);
  }
  p.minimum = minimum;
  p.resident_ffn = ffn_all - p.streamed_bytes;
  return p;
}

}  // namespace

MemoryPlan plan_memory(const Model& m, int64_t budget, int64_t kv_bytes, int64_t scratch_bytes) {
  const std::vector<LayerWeights>& layers = m.layers();
  const size_t n = layers.size();
  MemoryPlan p;
  p.budget = budget;
  p.kv_bytes = kv_bytes;
  p.scratch_bytes = scratch_bytes;
  p.model_bytes = int64_t(m.file().file_size());
  int64_t ffn_all = 0;
  for (const LayerWeights& L : layers) ffn_all += int64_t(L.ffn_bytes());
  p.resident_fixed = p.model_bytes - ffn_all;
  // Rounded up to 256 KiB: the measurement varies by a few KiB between loads of one file (the
  // first load in a process also initializes statics), the plan should not.
  constexpr int64_t kRound = 256 * 1024;
  p.other_bytes = (int64_t(m.load_heap_bytes()) + kRound - 1) / kRound * kRound + MemoryPlan::kOtherReserve;
  const int64_t base = p.resident_fixed + kv_bytes + scratch_bytes + p.other_bytes;
  if (m.flash()) return plan_flash(m, p, base, ffn_all);
  // The cost of a state: memory it needs and bytes it reads per step.
  auto evaluate = [&](const std::vector<MemoryPlan::Layer>& st, int64_t* need, int64_t* streamed, int64_t* io) {
    int64_t res = 0, str = 0;
    uint64_t slot = 0;
    for (size_t i = 0; i < n; ++i) {
      const LayerWeights& L = layers[i];
      (st[i].gate_up ? str : res) += int64_t(L.gate_up->size);
      (st[i].down ? str : res) += int64_t(L.down->size);
      slot = std::max(slot, item_bytes(L, st[i].gate_up, st[i].down));
    }
    *io = str ? 2 * int64_t(slot) : 0;
    *need = base + res + *io;
    *streamed = str;
  };
  // Candidates: the k largest layers' FFN resident, the rest streamed, then more matrices
  // made resident (largest first) while the budget allows. The minimum is over k.
  std::vector<size_t> by_size(n);
  for (size_t i = 0; i < n; ++i) by_size[i] = i;
  auto layer_bytes = [&](size_t i) { return layers[i].gate_up->size + layers[i].down->size; };
  std::stable_sort(by_size.begin(), by_size.end(), [&](size_t a, size_t b) { return layer_bytes(a) > layer_bytes(b); });
  int64_t minimum = base + ffn_all;
  std::vector<MemoryPlan::Layer> best;
  int64_t best_streamed = -1, best_io = 0;
  for (size_t k = 0; k <= n; ++k) {
    std::vector<MemoryPlan::Layer> st(n, MemoryPlan::Layer{true, true});
    for (size_t j = 0; j < k; ++j) st[by_size[j]] = {false, false};
    int64_t need, streamed, io;
    evaluate(st, &need, &streamed, &io);
    minimum = std::min(minimum, need);
    if (need > budget) continue;
    // Greedy: largest streamed matrix first, kept resident if it still fits.
    std::vector<std::pair<int64_t, std::pair<size_t, bool>>> cand;
    for (size_t i = 0; i < n; ++i) {
      if (st[i].gate_up) cand.push_back({int64_t(layers[i].gate_up->size), {i, true}});
      if (st[i].down) cand.push_back({int64_t(layers[i].down->size), {i, false}});
    }
    std::stable_sort(cand.begin(), cand.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    for (const auto& c : cand) {
      MemoryPlan::Layer& l = st[c.second.first];
      bool& flag = c.second.second ? l.gate_up : l.down;
      flag = false;
      int64_t need2, streamed2, io2;
      evaluate(st, &need2, &streamed2, &io2);
      if (need2 > budget) flag = true;
    }
    evaluate(st, &need, &streamed, &io);
    if (best_streamed < 0 || streamed < best_streamed) {
      best = st;
      best_streamed = streamed;
      best_io = io;
    }
  }
  p.minimum = minimum;
  if (best_streamed < 0) below_minimum(p, minimum);
  p.layers = best;
  p.streamed_bytes = best_streamed;
  p.io_bytes = best_io;
  p.resident_ffn = ffn_all - best_streamed;
  return p;
}

// -------------------------------------------------------------------------- the I/O engine

std::vector<IoGroup> coalesce(std::vector<std::pair<uint64_t, uint64_t>> ranges, uint64_t max_gap) {
  std::sort(ranges.begin(), ranges.end());
  std::vector<IoGroup> out;
  uint64_t buf = 0;
  for (const auto& r : ranges) {
    const uint64_t b = align_down(r.first), e = align_up(r.first + r.second);
    if (!out.empty() && b <= out.back().offset + out.back().length + max_gap) {
      IoGroup& g = out.back();
      const uint64_t end = std::max(g.offset + g.length, e);
      buf += end - (g.offset + g.length);
      g.length = end - g.offset;
    } else {
      out.push_back({b, e - b, buf});
      buf += e - b;
    }
  }
  return out;
}

IoEngine::IoEngine(const std::string& path, Mode mode, int threads)
    : mode_(mode), pool_(std::max(1, threads)), pread_(::pread) {
  if (mode == Mode::direct) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (fd_ < 0 && errno == EINVAL) {  // the file system has no direct I/O (tmpfs)
      fell_back_ = true;
      mode_ = Mode::buffered;
    }
  }
  if (fd_ < 0) fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw FileNotFound(path + ": cannot open for streaming: " + std::strerror(errno));
  struct stat sb;
  if (fstat(fd_, &sb) != 0) throw FileNotFound(path + ": cannot stat: " + std::strerror(errno));
  file_size_ = uint64_t(sb.st_size);
}

IoEngine::~IoEngine() {
  if (fd_ >= 0) ::close(fd_);
}

IoStats IoEngine::stats() const {
  IoStats s;
  s.bytes = bytes_.load();
  s.requests = requests_.load();
  s.syscalls = syscalls_.load();
  s.retries = retries_.load();
  s.read_s = double(read_ns_.load()) * 1e-9;
  return s;
}

void IoEngine::read_chunk(const Range& r) {
  // Bytes that exist: a range may run past the end of the file to the end of its last page.
  const uint64_t want = r.offset >= file_size_ ? 0 : std::min(r.length, file_size_ - r.offset);
  uint64_t done = 0;
  while (done < want) {
    const ssize_t got = pread_(fd_, r.dst + done, size_t(r.length - done), off_t(r.offset + done));
    syscalls_.fetch_add(1, std::memory_order_relaxed);
    if (got < 0) {
      if (errno == EINTR) {
        retries_.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      throw std::runtime_error("reading streamed weights at offset " + std::to_string(r.offset + done) + ": " +
                               std::strerror(errno));
    }
    if (got == 0)
      throw std::runtime_error("reading streamed weights: unexpected end of file at offset " +
                               std::to_string(r.offset + done) + "; the file changed after it was opened");
    uint64_t next = done + uint64_t(got);
    if (next < want) {
      retries_.fetch_add(1, std::memory_order_relaxed);
      if (mode_ == Mode::direct) next = align_down(next);  // direct reads continue from a whole block
    }
    done = next;
  }
}

void IoEngine::read(const std::vector<Range>& ranges) {
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<Range> chunks;
  uint64_t total = 0;
  for (const Range& r : ranges) {
    if (mode_ == Mode::direct &&
        (r.offset % kAlign || r.length % kAlign || reinterpret_cast<uintptr_t>(r.dst) % kAlign))
      throw InvalidArgument("direct reads need offsets, lengths and buffers aligned to 4096 bytes");
    if (r.offset + r.length > align_up(file_size_))
      throw std::runtime_error("reading streamed weights: range at " + std::to_string(r.offset) + " + " +
                               std::to_string(r.length) + " is past the end of file (" + std::to_string(file_size_) +
                               " bytes)");
    for (uint64_t o = 0; o < r.length; o += kChunk)
      chunks.push_back({r.offset + o, std::min(kChunk, r.length - o), r.dst + o});
    total += r.length;
  }
  const int64_t nc = int64_t(chunks.size());
  pool_.parallel_for(nc, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) read_chunk(chunks[size_t(i)]);
  }, 1, int(std::max<int64_t>(1, nc / pool_.size() + 1)));
  if (mode_ == Mode::buffered)  // keep the page cache from holding what was just read
    for (const Range& r : ranges) posix_fadvise(fd_, off_t(r.offset), off_t(r.length), POSIX_FADV_DONTNEED);
  bytes_ += total;
  requests_ += ranges.size();
  read_ns_ += uint64_t(seconds_since(t0) * 1e9);
}

// ------------------------------------------------------------------------ the weight stream

WeightStreamer::WeightStreamer(std::shared_ptr<const Model> model, const MemoryPlan& plan, const StreamOptions& opt)
    : model_(std::move(model)), plan_(plan), opt_(opt) {
  if (opt_.io != "direct" && opt_.io != "buffered" && opt_.io != "mmap")
    throw InvalidArgument("stream io must be 'direct', 'buffered' or 'mmap', got '" + opt_.io + "'");
  if (opt_.io_threads < 1 || opt_.io_threads > 64)
    throw InvalidArgument("io_threads must be in [1, 64], got " + std::to_string(opt_.io_threads));
  const std::vector<LayerWeights>& layers = model_->layers();
  if (plan_.layers.size() != layers.size()) throw InvalidArgument("the memory plan is for another model");
  item_of_layer_.assign(layers.size(), -1);
  for (size_t i = 0; i < layers.size(); ++i) {
    const MemoryPlan::Layer& pl = plan_.layers[i];
    if (!pl.gate_up && !pl.down) continue;
    const LayerWeights& L = layers[i];
    Item it;
    it.layer = i;
    if (!L.bundles.empty()) {  // flash layout: one sequential read of the layer's cold tail
      const size_t k = size_t(pl.first_bundle);
      if (k >= L.bundles.size()) throw InvalidArgument("the memory plan is for another model");
      const uint64_t begin = L.bundles[k].offset, end = L.bundles.back().offset + L.bundles.back().bytes;
      it.flash = true;
      it.stream_gate_up = it.stream_down = true;
      it.groups = coalesce({{begin, end - begin}}, kMaxGap);
      slot_bytes_ = std::max(slot_bytes_, it.groups[0].length);
      it.mapped.push_back({L.bundles[k].gate_up.data, end - begin});
      it.bundles[0] = it.bundles[1] = L.bundles;
      item_of_layer_[i] = int(items_.size());
      items_.push_back(std::move(it));
      continue;
    }
    it.stream_gate_up = pl.gate_up;
    it.stream_down = pl.down;
    std::vector<std::pair<uint64_t, uint64_t>> r;
    if (pl.gate_up) r.push_back({L.gate_up->offset, L.gate_up->size});
    if (pl.down) r.push_back({L.down->offset, L.down->size});
    it.groups = coalesce(r, kMaxGap);
    uint64_t bytes = 0;
    for (const IoGroup& g : it.groups) bytes += g.length;
    slot_bytes_ = std::max(slot_bytes_, bytes);
    for (const TensorView* t : {pl.gate_up ? L.gate_up : nullptr, pl.down ? L.down : nullptr})
      if (t) it.mapped.push_back({t->data, t->size});
    item_of_layer_[i] = int(items_.size());
    items_.push_back(std::move(it));
  }
  if (items_.empty()) return;
  const std::string& path = model_->file().path();
  if (opt_.io == "mmap") {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw FileNotFound(path + ": cannot open: " + std::strerror(errno));
    no_huge_pages(*model_);
    for (const Item& it : items_) drop_mapped(it);
    return;
  }
  io_ = std::make_unique<IoEngine>(path, opt_.io == "direct" ? IoEngine::Mode::direct : IoEngine::Mode::buffered,
                                   opt_.io_threads);
  for (int b = 0; b < 2; ++b) {
    void* p = mmap(nullptr, slot_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    buf_[b] = static_cast<uint8_t*>(p);
  }
  // Views of each streamed matrix (or bundle) inside either buffer.
  for (Item& it : items_) {
    const LayerWeights& L = layers[it.layer];
    if (it.flash) {
      const IoGroup& g = it.groups[0];
      for (int b = 0; b < 2; ++b)
        for (size_t k = size_t(plan_.layers[it.layer].first_bundle); k < L.bundles.size(); ++k) {
          LayerWeights::Bundle& B = it.bundles[b][k];
          B.gate_up.data = buf_[b] + g.buffer_offset + (B.gate_up.offset - g.offset);
          B.down.data = buf_[b] + g.buffer_offset + (B.down.offset - g.offset);
        }
      continue;
    }
    for (int b = 0; b < 2; ++b) {
      auto place = [&](const TensorView& t, TensorView* out) {
        *out = t;
        for (const IoGroup& g : it.groups)
          if (t.offset >= g.offset && t.offset + t.size <= g.offset + g.length)
            out->data = buf_[b] + g.buffer_offset + (t.offset - g.offset);
      };
      if (it.stream_gate_up) place(*L.gate_up, &it.gate_up[b]);
      if (it.stream_down) place(*L.down, &it.down[b]);
    }
  }
  // The mapped file is read by resident tensors only: no huge pages and no readahead there (a
  // fault on a resident tensor would otherwise read, and map, its streamed neighbours with its
  // 2 MiB folio or readahead window), the resident tensors read ahead exactly (WILLNEED), and
  // the streamed matrices' pages split off into mappings of their own (DONTDUMP) and dropped
  // (verify may have read them).
  no_huge_pages(*model_);
  // Per tensor that streams (whole, or a flash tail): how many of its first bytes stay resident.
  std::vector<std::pair<const uint8_t*, uint64_t>> resident_prefix;
  for (const Item& it : items_) {
    const LayerWeights& L = layers[it.layer];
    if (it.flash)
      resident_prefix.push_back({L.bundles_tensor->data, uint64_t(it.mapped[0].first - L.bundles_tensor->data)});
    else
      for (const TensorView* t : {it.stream_gate_up ? L.gate_up : nullptr, it.stream_down ? L.down : nullptr})
        if (t) resident_prefix.push_back({t->data, 0});
  }
  for (const Item& it : items_)
    for (const auto& m : it.mapped) {
      const uintptr_t b = align_up(reinterpret_cast<uintptr_t>(m.first));
      const uintptr_t e = align_down(reinterpret_cast<uintptr_t>(m.first) + m.second);
      if (e <= b) continue;
      madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTDUMP);
      madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED);
    }
  for (const TensorView& t : model_->file().tensors()) {
    uint64_t keep = t.size;
    for (const auto& r : resident_prefix)
      if (r.first == t.data) keep = r.second;
    if (keep == 0) continue;
    const uintptr_t b = align_down(reinterpret_cast<uintptr_t>(t.data)), e = align_up(reinterpret_cast<uintptr_t>(t.data) + keep);
    madvise(reinterpret_cast<void*>(b), e - b, MADV_RANDOM);
    madvise(reinterpret_cast<void*>(b), e - b, MADV_WILLNEED);
  }
  if (opt_.prefetch) thread_ = std::thread([this] { producer(); });
}

WeightStreamer::~WeightStreamer() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  for (uint8_t* b : buf_)
    if (b) munmap(b, slot_bytes_);
  if (fd_ >= 0) ::close(fd_);
}

void WeightStreamer::fill(const Item& it, int slot) {
  std::vector<IoEngine::Range> r;
  for (const IoGroup& g : it.groups) r.push_back({g.offset, g.length, buf_[slot] + g.buffer_offset});
  io_->read(r);
}

void WeightStreamer::drop_mapped(const Item& it) {
  // The baseline "mmap under a memory cap": what a cap too small for these pages would do to
  // them after use (unmapped from us, then out of the page cache).
  for (const auto& m : it.mapped) {
    const uintptr_t b = align_down(reinterpret_cast<uintptr_t>(m.first));
    const uintptr_t e = align_up(reinterpret_cast<uintptr_t>(m.first) + m.second);
    madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED);
  }
  for (const IoGroup& g : it.groups) posix_fadvise(fd_, off_t(g.offset), off_t(g.length), POSIX_FADV_DONTNEED);
}

void WeightStreamer::producer() {
  const uint64_t n = items_.size();
  for (uint64_t k = 0;; ++k) {
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stop_ || k < consumed_ + 2; });  // buffer k % 2 is free
      if (stop_) return;
    }
    try {
      fill(items_[k % n], int(k % 2));
    } catch (...) {
      std::lock_guard<std::mutex> lk(mu_);
      error_ = std::current_exception();
      cv_.notify_all();
      return;
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      produced_ = k + 1;
    }
    cv_.notify_all();
  }
}

void WeightStreamer::begin_step() {
  if (items_.empty() || !opt_.prefetch || opt_.io == "mmap") return;
  std::unique_lock<std::mutex> lk(mu_);
  if (held_) {
    held_ = false;
    ++consumed_;
  }
  // A step stopped part way (interrupted): skip to the start of the cycle.
  while (consumed_ % items_.size() != 0) {
    cv_.wait(lk, [&] { return produced_ > consumed_ || error_; });
    if (error_) std::rethrow_exception(error_);
    ++consumed_;
    cv_.notify_all();
  }
}

WeightStreamer::Ffn WeightStreamer::acquire(size_t li) {
  const LayerWeights& L = model_->layers()[li];
  const LayerWeights::Bundle* resident_bundles = L.bundles.empty() ? nullptr : L.bundles.data();
  const int idx = item_of_layer_[li];
  if (idx < 0) return {L.gate_up, L.down, resident_bundles};
  const Item& it = items_[size_t(idx)];
  const auto t0 = std::chrono::steady_clock::now();
  int slot = 0;
  if (opt_.io == "mmap") {
    ++layers_streamed_;
    return {L.gate_up, L.down, resident_bundles};
  }
  if (!opt_.prefetch) {
    fill(it, 0);
  } else {
    std::unique_lock<std::mutex> lk(mu_);
    const uint64_t k = consumed_;
    if (items_[k % items_.size()].layer != li)
      throw std::logic_error("weight stream: layer " + std::to_string(li) + " asked out of order");
    cv_.wait(lk, [&] { return produced_ > k || error_; });
    if (error_) std::rethrow_exception(error_);
    held_ = true;
    slot = int(k % 2);
  }
  wait_ns_ += uint64_t(seconds_since(t0) * 1e9);
  ++layers_streamed_;
  if (it.flash) return {nullptr, nullptr, it.bundles[slot].data()};
  return {it.stream_gate_up ? &it.gate_up[slot] : L.gate_up, it.stream_down ? &it.down[slot] : L.down, nullptr};
}

void WeightStreamer::release(size_t li) {
  const int idx = item_of_layer_[li];
  if (idx < 0) return;
  if (opt_.io == "mmap") {
    drop_mapped(items_[size_t(idx)]);
    return;
  }
  if (!opt_.prefetch) return;
  {
    std::lock_guard<std::mutex> lk(mu_);
    held_ = false;
    ++consumed_;
  }
  cv_.notify_all();
}

StreamStats WeightStreamer::stats() const {
  StreamStats s;
  if (io_) s.io = io_->stats();
  s.layers_streamed = layers_streamed_;
  s.wait_s = double(wait_ns_.load()) * 1e-9;
  return s;
}

}  // namespace oelm
