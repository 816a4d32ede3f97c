// .oelm reader: mmap, then validate header -> metadata -> tensor table, in that order,
// each step checking sizes against what the previous step has proven to be in bounds.
#include "format/oelm_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "common/error.h"

namespace oelm {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::f16: return "f16";
    case DType::bf16: return "bf16";
    case DType::u8: return "u8";
    case DType::q8: return "q8_b32r16i";
    case DType::q4: return "q4_b32r16i";
    case DType::q6: return "q6_b32r16i";
    case DType::q5: return "q5_b32r16i";
    case DType::q4k: return "q4k_b32r16i";
    case DType::i32: return "i32";
  }
  return "?";
}

size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f16: return 2;
    case DType::bf16: return 2;
    case DType::u8: return 1;
    case DType::i32: return 4;
    case DType::q8:
    case DType::q4:
    case DType::q6:
    case DType::q5:
    case DType::q4k: return 0;  // block types: see tensor_bytes()
  }
  return 0;
}

namespace {
constexpr DType kAllDTypes[] = {DType::f32, DType::f16, DType::bf16, DType::u8, DType::q8,
                                DType::q4,  DType::q6,  DType::q5,   DType::q4k, DType::i32};
}  // namespace

bool dtype_from_name(std::string_view name, DType* out) {
  for (DType t : kAllDTypes)
    if (name == dtype_name(t)) {
      *out = t;
      return true;
    }
  return false;
}

std::string dtype_names(bool weights_only) {
  std::string s;
  for (DType t : kAllDTypes)
    if (!weights_only || dtype_is_weight(t)) s += (s.empty() ? "" : ", ") + std::string(dtype_name(t));
  return s;
}

const char* reader_version() {
#ifdef OPENELM_RT_VERSION_STRING
  return OPENELM_RT_VERSION_STRING;
#else
  return "(unknown version)";
#endif
}

std::string upgrade_advice(const json::Value& metadata) {
  std::string writer;
  if (const json::Value* w = metadata.is_object() ? metadata.find("writer") : nullptr; w && w->is_string()) {
    for (char c : w->as_string().substr(0, 80)) writer += (c >= 0x20 && c < 0x7F) ? c : '?';
    if (w->as_string().size() > 80) writer += "...";
  }
  return std::string("this is openelm_rt ") + reader_version() +
         (writer.empty() ? "" : ", the file was written by " + writer) +
         "; upgrade openelm_rt, or re-export the model with the installed openelm-rt-export";
}

bool dtype_is_weight(DType t) { return t != DType::u8 && t != DType::i32; }

bool dtype_is_quantized(DType t) {
  return t == DType::q8 || t == DType::q4 || t == DType::q6 || t == DType::q5 || t == DType::q4k;
}

std::string legacy_dtype_hint(std::string_view name) {
  if (name != "q8_b32r16" && name != "q4_b32r16") return "";
  return "dtype \"" + std::string(name) + "\" is the quantized layout of earlier openelm_rt versions " +
         "(scales stored apart from their blocks), which this version no longer reads; re-export the " +
         "checkpoint with openelm-rt-export (it writes \"" + std::string(name) + "i\")";
}

bool tensor_bytes(DType t, const std::vector<int64_t>& shape, uint64_t* out) {
  constexpr uint64_t kMax = ~uint64_t(0);
  for (int64_t d : shape)
    if (d < 0) return false;
  if (dtype_is_quantized(t)) {
    if (shape.size() != 2 || shape[0] > (int64_t(1) << 40) || shape[1] > (int64_t(1) << 40)) return false;
    // Np/16 panels of nb blocks of (32 bytes of scales + 16 rows x 32 weights): 17 Kp (q8), 13 Kp (q6),
    // 11 Kp (q5), 9 Kp (q4).
    const uint64_t panels = (uint64_t(shape[0]) + 15) / 16;
    const uint64_t kp = (uint64_t(shape[1]) + 31) / 32 * 32;
    if (t == DType::q4k) {  // per panel: nb / S super-blocks of 64 + 280 S bytes
      const uint64_t nb = kp / 32, S = uint64_t(q4k_subs(int64_t(nb)));
      const uint64_t per_panel = nb / S * (64 + 280 * S);
      if (per_panel != 0 && panels > kMax / per_panel) return false;
      *out = panels * per_panel;
      return true;
    }
    const uint64_t per_col = t == DType::q8 ? 17 : t == DType::q6 ? 13 : t == DType::q5 ? 11 : 9;
    if (kp != 0 && panels > kMax / per_col / kp) return false;
    *out = panels * per_col * kp;
    return true;
  }
  uint64_t n = dtype_size(t);
  for (int64_t d : shape) {
    if (d != 0 && n > kMax / uint64_t(d)) return false;
    n *= uint64_t(d);
  }
  *out = n;
  return true;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// Table-driven CRC-32 (IEEE 802.3 polynomial, reflected), identical to zlib.crc32.
uint32_t crc32(const uint8_t* data, size_t n, uint32_t crc) {
  static const auto table = [] {
    std::vector<uint32_t> t(256);
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ data[i]) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

namespace {

constexpr uint8_t kMagic[8] = {'O', 'E', 'L', 'M', '-', 'R', 'T', 0};
constexpr uint64_t kHeaderSize = 64;
constexpr uint64_t kMaxMetadata = 256ull << 20;  // far above any real model's table

template <typename T>
T read_le(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof v);  // the format is little-endian; so are supported hosts
  return v;
}

// Maps the whole file read-only at a 2 MiB-aligned address and asks for transparent
// huge pages. Decode streams every weight once per token; with 4 KiB pages that is a TLB
// miss every 4 KiB, and the CPU's prefetchers stop at each page boundary. When the kernel
// reads the file into the page cache itself (page faults on this mapping) and the file
// system supports large folios (ext4, xfs, tmpfs on recent Linux), it then uses 2 MiB
// folios that map with one TLB entry each: one-thread decode ~8 % faster, measured.
// Pages already cached as small folios (e.g. a file just written) stay small; the
// exporter drops its output from the page cache for that reason. The mapping is shared
// page cache either way, never a private copy. Returns nullptr (errno set) on failure.
const void* map_file(int fd, uint64_t size, void** map_base, size_t* map_size) {
  constexpr size_t kHuge = size_t(2) << 20;
  *map_base = nullptr;
  *map_size = 0;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (size >= kHuge) {
    // Reserve size + 2 MiB of address space, then map the file at the first aligned
    // address inside it; the reservation's unused ends stay PROT_NONE and are unmapped
    // with the rest.
    const size_t reserve = size_t(size) + kHuge;
    void* r = ::mmap(nullptr, reserve, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (r != MAP_FAILED) {
      const uintptr_t aligned = (reinterpret_cast<uintptr_t>(r) + kHuge - 1) & ~uintptr_t(kHuge - 1);
      void* p = ::mmap(reinterpret_cast<void*>(aligned), size_t(size), PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, 0);
      if (p != MAP_FAILED) {
        ::madvise(p, size_t(size), MADV_HUGEPAGE);  // advisory: failure only costs speed
        *map_base = r;
        *map_size = reserve;
        return p;
      }
      const int err = errno;
      ::munmap(r, reserve);
      errno = err;
      return nullptr;
    }
  }
#endif
  void* p = ::mmap(nullptr, size_t(size), PROT_READ, MAP_PRIVATE, fd, 0);
  if (p == MAP_FAILED) return nullptr;
  *map_base = p;
  *map_size = size_t(size);
  return p;
}

[[noreturn]] void bad(const std::string& path, const std::string& what) {
  throw FormatError(path + ": " + what);
}

}  // namespace

OelmFile::~OelmFile() {
  if (map_base_) munmap(map_base_, map_size_);
}

const TensorView* OelmFile::find(std::string_view name) const {
  auto it = by_name_.find(std::string(name));
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

std::unique_ptr<OelmFile> OelmFile::open(const std::string& path, bool verify) {
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, ".oelm reader needs a little-endian host");
  std::unique_ptr<OelmFile> f(new OelmFile());
  f->path_ = path;
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT || errno == ENOTDIR)
      throw FileNotFound(path + ": no such file; export a model with openelm-rt-export first");
    throw FileNotFound(path + ": cannot open: " + std::strerror(errno));
  }
  if (S_ISDIR(st.st_mode))
    throw FormatError(path + ": is a directory, not an .oelm file; to convert a Hugging Face "
                             "checkpoint directory run openelm-rt-export DIR -o model.oelm");
  if (!S_ISREG(st.st_mode)) throw FormatError(path + ": not a regular file");
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw FileNotFound(path + ": cannot open: " + std::strerror(errno));
  f->size_ = uint64_t(st.st_size);
  if (f->size_ < kHeaderSize) {
    ::close(fd);
    bad(path, "truncated: the file is " + std::to_string(f->size_) +
                  " bytes, smaller than the 64-byte header; re-export it");
  }
  const void* p = map_file(fd, f->size_, &f->map_base_, &f->map_size_);
  int err = errno;
  ::close(fd);
  if (p == nullptr) bad(path, std::string("mmap failed: ") + std::strerror(err));
  f->base_ = static_cast<const uint8_t*>(p);
  f->validate_and_index(verify);
  return f;
}

void OelmFile::validate_and_index(bool verify) {
  const uint8_t* h = base_;
  if (std::memcmp(h, kMagic, 8) != 0)
    bad(path_, "not an .oelm file (bad magic bytes); convert a Hugging Face checkpoint with "
               "openelm-rt-export");
  format_version_ = read_le<uint32_t>(h + 8);
  names_version_ = read_le<uint32_t>(h + 12);
  if (format_version_ == 0 || names_version_ == 0)
    bad(path_, "invalid version 0 in header (format_version " + std::to_string(format_version_) +
                   ", names_version " + std::to_string(names_version_) + ")");
  if (format_version_ > kFormatVersion || names_version_ > kNamesVersion)
    bad(path_, "file is newer than this openelm_rt: it has format_version " +
                   std::to_string(format_version_) + " / names_version " +
                   std::to_string(names_version_) + ", this reader supports up to format_version " +
                   std::to_string(kFormatVersion) + " / names_version " +
                   std::to_string(kNamesVersion) + " (" + upgrade_advice(json::Value()) + ")");
  const uint64_t meta_off = read_le<uint64_t>(h + 16);
  const uint64_t meta_size = read_le<uint64_t>(h + 24);
  const uint64_t data_off = read_le<uint64_t>(h + 32);
  const uint64_t data_size = read_le<uint64_t>(h + 40);
  const uint32_t align = read_le<uint32_t>(h + 48);
  const uint32_t meta_crc = read_le<uint32_t>(h + 52);
  const uint64_t file_size = read_le<uint64_t>(h + 56);

  if (file_size != size_) {
    if (file_size > size_)
      bad(path_, "truncated: the header says the file is " + std::to_string(file_size) +
                     " bytes but it is " + std::to_string(size_) +
                     "; the export or copy was interrupted, re-export or copy it again");
    bad(path_, "the header says the file is " + std::to_string(file_size) + " bytes but it is " +
                   std::to_string(size_) + " (trailing bytes); the file is corrupt, re-export it");
  }
  if (meta_off != kHeaderSize)
    bad(path_, "metadata_offset is " + std::to_string(meta_off) + ", expected 64");
  if (meta_size == 0 || meta_size > kMaxMetadata || meta_size > size_ - kHeaderSize)
    bad(path_, "metadata_size " + std::to_string(meta_size) + " is out of range for a " +
                   std::to_string(size_) + "-byte file; the file is corrupt, re-export it");
  if (align < 64 || (align & (align - 1)) != 0 || align > (1u << 24))
    bad(path_, "alignment " + std::to_string(align) + " is not a power of two in [64, 16 MiB]");
  if (data_off < meta_off + meta_size || data_off % align != 0 || data_off > size_)
    bad(path_, "data_offset " + std::to_string(data_off) +
                   " is out of range or misaligned (metadata ends at " +
                   std::to_string(meta_off + meta_size) + ", alignment " + std::to_string(align) +
                   ", file size " + std::to_string(size_) + ")");
  if (data_size != size_ - data_off)
    bad(path_, "data_size " + std::to_string(data_size) + " does not match the file (" +
                   std::to_string(size_ - data_off) + " bytes after data_offset)");
  if (crc32(base_ + meta_off, meta_size) != meta_crc)
    bad(path_, "metadata checksum mismatch: the file is corrupt, re-export or copy it again");

  try {
    meta_ = json::parse(std::string_view(reinterpret_cast<const char*>(base_ + meta_off), meta_size));
  } catch (const FormatError& e) {
    bad(path_, e.what());
  }
  if (!meta_.is_object()) bad(path_, "metadata is not a JSON object");
  const json::Value* fmt = meta_.find("format");
  if (!fmt || !fmt->is_string() || fmt->as_string() != "openelm_rt")
    bad(path_, "metadata \"format\" is not \"openelm_rt\"");
  const json::Value* tensors = meta_.find("tensors");
  if (!tensors || !tensors->is_array()) bad(path_, "metadata has no \"tensors\" array");

  struct Span {
    uint64_t begin, end;
    size_t index;
  };
  std::vector<Span> spans;
  for (const json::Value& t : tensors->items()) {
    if (!t.is_object()) bad(path_, "a \"tensors\" entry is not an object");
    const json::Value* name = t.find("name");
    if (!name || !name->is_string() || name->as_string().empty())
      bad(path_, "a tensor entry has no \"name\" string");
    const std::string& nm = name->as_string();
    auto field_u64 = [&](const char* key) -> uint64_t {
      const json::Value* v = t.find(key);
      if (!v || !v->is_integer() || v->as_int() < 0)
        bad(path_, "tensor '" + nm + "': \"" + key + "\" is missing or not a non-negative integer");
      return uint64_t(v->as_int());
    };
    TensorView tv;
    tv.name = nm;
    const json::Value* dt = t.find("dtype");
    if (!dt || !dt->is_string()) bad(path_, "tensor '" + nm + "': \"dtype\" missing");
    const std::string& d = dt->as_string();
    if (const std::string hint = legacy_dtype_hint(d); !hint.empty()) bad(path_, "tensor '" + nm + "': " + hint);
    if (!dtype_from_name(d, &tv.dtype))
      bad(path_, "tensor '" + nm + "': unknown dtype \"" + d + "\" (this reader knows " + dtype_names(false) +
                     "); " + upgrade_advice(meta_));
    const json::Value* shape = t.find("shape");
    if (!shape || !shape->is_array() || shape->items().empty() || shape->items().size() > 4)
      bad(path_, "tensor '" + nm + "': \"shape\" must be an array of 1 to 4 dimensions");
    for (const json::Value& dim : shape->items()) {
      if (!dim.is_integer() || dim.as_int() < 0 || dim.as_int() > (int64_t(1) << 40))
        bad(path_, "tensor '" + nm + "': bad dimension in \"shape\"");
      tv.shape.push_back(dim.as_int());
    }
    if (dtype_is_quantized(tv.dtype) && tv.shape.size() != 2)
      bad(path_, "tensor '" + nm + "': dtype " + d + " stores 2-D matrices only, but \"shape\" has " +
                     std::to_string(tv.shape.size()) + " dimensions");
    uint64_t want = 0;
    if (!tensor_bytes(tv.dtype, tv.shape, &want) || want > size_)
      bad(path_, "tensor '" + nm + "': shape is larger than the file");
    uint64_t off = field_u64("offset"), sz = field_u64("size");
    tv.crc32 = uint32_t(field_u64("crc32"));
    if (sz != want)
      bad(path_, "tensor '" + nm + "': size " + std::to_string(sz) + " bytes does not match its " +
                     d + " shape (" + std::to_string(want) + " bytes)");
    if (off % align != 0) bad(path_, "tensor '" + nm + "': offset " + std::to_string(off) + " is not aligned to " + std::to_string(align));
    if (off > data_size || sz > data_size - off)
      bad(path_, "tensor '" + nm + "': bytes [" + std::to_string(off) + ", " + std::to_string(off + sz) +
                     ") lie outside the data section (" + std::to_string(data_size) +
                     " bytes); the file is truncated or corrupt, re-export it");
    tv.offset = data_off + off;
    tv.size = sz;
    tv.data = base_ + tv.offset;
    if (by_name_.count(nm)) bad(path_, "tensor '" + nm + "' appears twice");
    by_name_[nm] = tensors_.size();
    spans.push_back({off, off + sz, tensors_.size()});
    tensors_.push_back(std::move(tv));
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i].begin < spans[i - 1].end)
      bad(path_, "tensors '" + tensors_[spans[i - 1].index].name + "' and '" +
                     tensors_[spans[i].index].name + "' overlap; the file is corrupt, re-export it");
  if (verify) verify_checksums();
}

void OelmFile::verify_checksums() const {
  for (const TensorView& t : tensors_) {
    uint32_t c = crc32(t.data, t.size);
    if (c != t.crc32)
      bad(path_, "checksum mismatch in tensor '" + t.name + "' (stored " + std::to_string(t.crc32) +
                     ", computed " + std::to_string(c) + "): the data is corrupt, re-export or copy it again");
  }
}

}  // namespace oelm
