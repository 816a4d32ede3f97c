// The flash layout's metadata and bundle geometry (flash_layout.h, FORMAT.md "Flash layout").
#include "model/flash_layout.h"

#include <string>

#include "common/error.h"

namespace oelm {

namespace {

[[noreturn]] void bad(const std::string& what) {
  throw FormatError("metadata \"flash_layout\": " + what + "; re-export the file with openelm-rt-export --flash-layout");
}

}  // namespace

FlashLayout parse_flash_layout(const json::Value& v) {
  if (!v.is_object()) bad("must be an object");
  FlashLayout fl;
  const json::Value* ver = v.find("version");
  if (!ver || !ver->is_integer()) bad("\"version\" is missing or not an integer");
  fl.version = ver->as_int();
  if (fl.version == 1)
    throw FormatError("metadata \"flash_layout\": version 1 (the neuron permutation as JSON numbers in the "
                      "metadata, written only by development exports) is no longer read; re-export the file with "
                      "openelm-rt-export --flash-layout, which stores it in the tensors blk.{i}.ffn_perm");
  if (fl.version < 1)
    bad("\"version\" is " + std::to_string(fl.version) + "; versions start at 1");
  if (fl.version > kFlashLayoutVersion)
    throw FormatError("metadata \"flash_layout\": version " + std::to_string(fl.version) +
                      " is newer than this openelm_rt reads (up to " + std::to_string(kFlashLayoutVersion) +
                      "; " + upgrade_advice(json::Value()) + ")");
  const json::Value* bn = v.find("bundle_neurons");
  if (!bn || !bn->is_integer()) bad("\"bundle_neurons\" is missing or not an integer");
  fl.bundle_neurons = bn->as_int();
  if (fl.bundle_neurons < 32 || fl.bundle_neurons > 65536 || fl.bundle_neurons % 32 != 0)
    bad("\"bundle_neurons\" is " + std::to_string(fl.bundle_neurons) + "; it must be a multiple of 32 in [32, 65536]");
  return fl;
}

void check_flash_perm(const uint8_t* data, int64_t F, const std::string& tensor) {
  std::vector<char> seen(size_t(F), 0);
  for (int64_t j = 0; j < F; ++j) {
    const uint8_t* b = data + 4 * j;
    const int32_t e = int32_t(uint32_t(b[0]) | uint32_t(b[1]) << 8 | uint32_t(b[2]) << 16 | uint32_t(b[3]) << 24);
    if (e < 0 || e >= F)
      throw FormatError("tensor '" + tensor + "': element " + std::to_string(j) + " is " + std::to_string(e) +
                        ", not a neuron index in [0, " + std::to_string(F) +
                        "); re-export the file with openelm-rt-export --flash-layout");
    if (seen[size_t(e)]++)
      throw FormatError("tensor '" + tensor + "' lists neuron " + std::to_string(e) +
                        " twice; it must be a permutation of [0, " + std::to_string(F) +
                        "); re-export the file with openelm-rt-export --flash-layout");
  }
}

bool flash_bundles(DType weights, int64_t d_model, int64_t ffn_dim, int64_t bundle_neurons,
                   std::vector<FlashBundleGeometry>* out) {
  if (d_model < 1 || ffn_dim < 1 || bundle_neurons < 1) return false;
  auto pad = [](uint64_t x, uint64_t* r) {
    if (x > UINT64_MAX - kFlashBundleAlign) return false;
    *r = (x + kFlashBundleAlign - 1) / kFlashBundleAlign * kFlashBundleAlign;
    return true;
  };
  std::vector<FlashBundleGeometry> v;
  uint64_t offset = 0;
  for (int64_t first = 0; first < ffn_dim; first += bundle_neurons) {
    FlashBundleGeometry g;
    g.first = first;
    g.neurons = std::min(bundle_neurons, ffn_dim - first);
    g.offset = offset;
    uint64_t gu_pad, dn_pad;
    if (!tensor_bytes(weights, {2 * g.neurons, d_model}, &g.gate_up_bytes) ||
        !tensor_bytes(weights, {d_model, g.neurons}, &g.down_bytes) || !pad(g.gate_up_bytes, &gu_pad) ||
        !pad(g.down_bytes, &dn_pad) || gu_pad > UINT64_MAX - dn_pad)
      return false;
    g.down_offset = gu_pad;
    g.bytes = gu_pad + dn_pad;
    if (offset > UINT64_MAX - g.bytes) return false;
    offset += g.bytes;
    v.push_back(g);
  }
  *out = std::move(v);
  return true;
}

}  // namespace oelm
