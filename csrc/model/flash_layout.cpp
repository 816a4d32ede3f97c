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

FlashLayout parse_flash_layout(const json::Value& v, const std::vector<int64_t>& ffn_dim) {
  if (!v.is_object()) bad("must be an object");
  FlashLayout fl;
  const json::Value* ver = v.find("version");
  if (!ver || !ver->is_integer()) bad("\"version\" is missing or not an integer");
  fl.version = ver->as_int();
  if (fl.version < 1)
    bad("\"version\" is " + std::to_string(fl.version) + "; versions start at 1");
  if (fl.version > kFlashLayoutVersion)
    throw FormatError("metadata \"flash_layout\": version " + std::to_string(fl.version) +
                      " is newer than this openelm_rt reads (up to " + std::to_string(kFlashLayoutVersion) +
                      "); upgrade openelm_rt, or re-export the file with the installed version");
  const json::Value* bn = v.find("bundle_neurons");
  if (!bn || !bn->is_integer()) bad("\"bundle_neurons\" is missing or not an integer");
  fl.bundle_neurons = bn->as_int();
  if (fl.bundle_neurons < 32 || fl.bundle_neurons > 65536 || fl.bundle_neurons % 32 != 0)
    bad("\"bundle_neurons\" is " + std::to_string(fl.bundle_neurons) + "; it must be a multiple of 32 in [32, 65536]");
  const json::Value* perm = v.find("perm");
  if (!perm || !perm->is_array() || perm->items().size() != ffn_dim.size())
    bad("\"perm\" must be a list of " + std::to_string(ffn_dim.size()) + " permutations (one per layer)");
  fl.perm.resize(ffn_dim.size());
  for (size_t li = 0; li < ffn_dim.size(); ++li) {
    const json::Value& p = perm->items()[li];
    const int64_t F = ffn_dim[li];
    const std::string where = "\"perm\"[" + std::to_string(li) + "]";
    if (!p.is_array() || int64_t(p.items().size()) != F)
      bad(where + " must list the layer's " + std::to_string(F) + " neurons (ffn_dim)");
    std::vector<char> seen(size_t(F), 0);
    std::vector<int32_t>& out = fl.perm[li];
    out.reserve(size_t(F));
    for (size_t j = 0; j < p.items().size(); ++j) {
      const json::Value& e = p.items()[j];
      if (!e.is_integer() || e.as_int() < 0 || e.as_int() >= F)
        bad(where + "[" + std::to_string(j) + "] is not a neuron index in [0, " + std::to_string(F) + ")");
      if (seen[size_t(e.as_int())]++)
        bad(where + " lists neuron " + std::to_string(e.as_int()) + " twice; it must be a permutation");
      out.push_back(int32_t(e.as_int()));
    }
  }
  return fl;
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
