// Reader of the .oelm file format (docs/FORMAT.md): maps the file read-only and
// validates the header, the metadata and the tensor table against the file length
// before anything is used. Knows nothing about OpenELM itself (model/ does).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "common/json.h"

namespace oelm {

// q8, q4, q6 and q5 are the block-quantized weight types "q8_b32r16i", "q4_b32r16i", "q6_b32r16i"
// and "q5_b32r16i" (FORMAT.md).
// q4k is "q4k_b32r16i": 4-bit weights with 6-bit scales and minimums in super-blocks (FORMAT.md).
// i32 holds a flash-layout file's neuron permutations only, never weights.
enum class DType : uint8_t { f32 = 0, f16 = 1, bf16 = 2, u8 = 3, q8 = 4, q4 = 5, q6 = 6, q5 = 7, q4k = 8, i32 = 9 };

const char* dtype_name(DType t);
size_t dtype_size(DType t);  // bytes per element; 0 for the block-quantized types
// The DType whose dtype_name() is `name`; false if there is none.
bool dtype_from_name(std::string_view name, DType* out);
// A dtype weights may have: not u8 (bytes: tokenizer, flash bundles) nor i32 (flash permutations).
bool dtype_is_weight(DType t);
bool dtype_is_quantized(DType t);  // q8, q4, q6, q5, q4k: 2-D only, sized by tensor_bytes()
// The names of every dtype this reader knows ("f32, f16, ..."), or only of those weights may have.
std::string dtype_names(bool weights_only);
// The version of this openelm_rt ("0.4.0"), which error messages name.
const char* reader_version();
// The end of a message refusing something a newer openelm_rt wrote: this reader's version, the
// file's "writer" metadata (if any, made printable and cut short: it is untrusted), and the fix.
std::string upgrade_advice(const json::Value& metadata);
// For "q8_b32r16" / "q4_b32r16", the quantized layout of older files that this reader no
// longer accepts: what happened and the fix. Empty for any other name.
std::string legacy_dtype_hint(std::string_view name);

// Bytes a tensor of this dtype and logical shape occupies (FORMAT.md): product(shape) x
// dtype_size, or for the block-quantized types (2-D [N, K] only) (Np / 16) * 17 * Kp (q8),
// * 13 * Kp (q6), * 11 * Kp (q5) or * 9 * Kp (q4); q4k: (Np / 16) * (nb / S) * (64 + 280 S). Returns false (out untouched) if the shape is invalid for the dtype
// (negative, not 2-D for a block type) or the size does not fit in 64 bits.
bool tensor_bytes(DType t, const std::vector<int64_t>& shape, uint64_t* out);

// q4k: blocks of 32 per super-block for a row of nb blocks, the largest of 8, 7, ..., 1 that
// divides nb (FORMAT.md; 8 when the row is a multiple of 256 long).
inline int64_t q4k_subs(int64_t nb) {
  for (int64_t s = 8; s > 1; --s)
    if (nb % s == 0) return s;
  return 1;
}

// A tensor inside the mapped file: no copy, valid while the OelmFile lives.
struct TensorView {
  std::string name;
  DType dtype = DType::f32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  uint64_t offset = 0;  // from the start of the file
  uint64_t size = 0;    // bytes
  uint32_t crc32 = 0;

  int64_t rows() const { return shape.empty() ? 0 : shape[0]; }
  int64_t cols() const { return shape.size() < 2 ? 1 : shape[1]; }
  int64_t numel() const;
};

// The versions this reader understands (see FORMAT.md, "Versioning").
constexpr uint32_t kFormatVersion = 2;  // 2: the flash layout (FORMAT.md); 1 still read
constexpr uint32_t kNamesVersion = 1;

class OelmFile {
 public:
  // Throws FileNotFound or FormatError. `verify` checks every tensor's CRC-32.
  static std::unique_ptr<OelmFile> open(const std::string& path, bool verify);
  ~OelmFile();
  OelmFile(const OelmFile&) = delete;
  OelmFile& operator=(const OelmFile&) = delete;

  const std::string& path() const { return path_; }
  uint64_t file_size() const { return size_; }
  uint32_t format_version() const { return format_version_; }
  uint32_t names_version() const { return names_version_; }
  const json::Value& metadata() const { return meta_; }
  const std::vector<TensorView>& tensors() const { return tensors_; }
  const TensorView* find(std::string_view name) const;

  // Recomputes each tensor's CRC-32 and throws FormatError naming the first mismatch.
  void verify_checksums() const;

 private:
  OelmFile() = default;
  void validate_and_index(bool verify);

  std::string path_;
  const uint8_t* base_ = nullptr;  // the file's first byte
  uint64_t size_ = 0;
  void* map_base_ = nullptr;  // what to munmap (may start before base_, see map_file)
  size_t map_size_ = 0;
  uint32_t format_version_ = 0;
  uint32_t names_version_ = 0;
  json::Value meta_;
  std::vector<TensorView> tensors_;
  std::unordered_map<std::string, size_t> by_name_;
};

uint32_t crc32(const uint8_t* data, size_t n, uint32_t crc = 0);

}  // namespace oelm
