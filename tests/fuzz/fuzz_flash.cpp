// libFuzzer target: the flash-layout section of the .oelm format (docs/FORMAT.md "Flash
// layout", csrc/model/flash_layout.h). The input is taken two ways:
//   * as JSON text, either a whole metadata object (as a file stores it, e.g. a flash export's):
//     its "flash_layout" value goes to parse_flash_layout, and the model's "ffn_dim" list,
//     checked first as the loader checks it (a list of at most 4096 integers in [1, 2^20]; else
//     the loader stops before the flash layout and so does this target), and "d_model" give
//     the bundle geometry; or any other value, taken as the "flash_layout" value itself, with
//     one layer whose width and d_model derive from the input's length.
//     parse_flash_layout must return a layout or throw FormatError naming "flash_layout";
//     anything else (a crash, another exception, a sanitizer report) is a finding, and so is a
//     returned layout that is not what the JSON says or not valid (version, bundle size).
//     Every layout returned is then cut into bundles (flash_bundles) for every weights dtype,
//     whose geometry must tile the tensor as FORMAT.md says;
//   * as the bytes of a blk.{i}.ffn_perm tensor (int32 little-endian, F = size / 4):
//     check_flash_perm must accept it exactly when it is a permutation of [0, F), and
//     otherwise throw FormatError naming the tensor.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <string_view>
#include <vector>

#include "common/error.h"
#include "common/json.h"
#include "format/oelm_file.h"
#include "model/flash_layout.h"

namespace {

[[noreturn]] void finding(const std::string& what) {
  std::fprintf(stderr, "fuzz_flash: %s\n", what.c_str());
  std::abort();
}

constexpr int64_t kMaxFfn = int64_t(1) << 20;   // the loader's bounds (model.cpp)
constexpr int64_t kMaxLayers = 4096;
constexpr int64_t kMaxDModel = int64_t(1) << 17;

// The loader's checks of the model's "ffn_dim" (get_list): false where it would stop.
bool loader_ffn_dim(const oelm::json::Value& meta, std::vector<int64_t>* out) {
  const oelm::json::Value* model = meta.find("model");
  if (!model || !model->is_object()) return false;
  const oelm::json::Value* dims = model->find("ffn_dim");
  if (!dims || !dims->is_array() || dims->items().empty() || int64_t(dims->items().size()) > kMaxLayers)
    return false;
  for (const oelm::json::Value& d : dims->items()) {
    if (!d.is_integer() || d.as_int() < 1 || d.as_int() > kMaxFfn) return false;
    out->push_back(d.as_int());
  }
  return true;
}

// The bundles of one layer must tile [0, F) in order, each part padded to 4096 bytes, each
// part's size the dtype's size of its matrix.
void check_bundles(oelm::DType dt, int64_t D, int64_t F, int64_t B) {
  std::vector<oelm::FlashBundleGeometry> geo;
  // In the loader's bounds nothing overflows 64 bits (at most 2 * 2^16 * 2^17 * 4 bytes a part).
  if (!oelm::flash_bundles(dt, D, F, B, &geo))
    finding("flash_bundles refused dtype " + std::string(oelm::dtype_name(dt)) + " D " + std::to_string(D) +
            " F " + std::to_string(F) + " B " + std::to_string(B));
  if (int64_t(geo.size()) != (F + B - 1) / B) finding("flash_bundles: wrong bundle count");
  uint64_t offset = 0;
  int64_t first = 0;
  for (const oelm::FlashBundleGeometry& g : geo) {
    const int64_t n = std::min(B, F - first);
    uint64_t gu = 0, dn = 0;
    if (!oelm::tensor_bytes(dt, {2 * n, D}, &gu) || !oelm::tensor_bytes(dt, {D, n}, &dn))
      finding("tensor_bytes refused a bundle's matrix");
    const uint64_t A = oelm::kFlashBundleAlign;
    if (g.first != first || g.neurons != n || g.offset != offset || g.gate_up_bytes != gu || g.down_bytes != dn ||
        g.offset % A != 0 || g.down_offset != (gu + A - 1) / A * A ||
        g.bytes != g.down_offset + (dn + A - 1) / A * A)
      finding("flash_bundles: bundle at " + std::to_string(first) + " of dtype " + oelm::dtype_name(dt) +
              " does not tile the tensor as FORMAT.md says");
    offset += g.bytes;
    first += n;
  }
  if (first != F) finding("flash_bundles: the bundles do not cover the layer");
}

void check_layout(const oelm::FlashLayout& fl, const oelm::json::Value& v, const std::vector<int64_t>& ffn_dim,
                  int64_t d_model) {
  if (fl.version != v.find("version")->as_int() || fl.bundle_neurons != v.find("bundle_neurons")->as_int())
    finding("the returned version / bundle_neurons differ from the JSON's");
  if (fl.version != oelm::kFlashLayoutVersion) finding("accepted version " + std::to_string(fl.version));
  if (fl.bundle_neurons < 32 || fl.bundle_neurons > 65536 || fl.bundle_neurons % 32)
    finding("accepted bundle_neurons " + std::to_string(fl.bundle_neurons));
  static const oelm::DType kWeights[] = {oelm::DType::f32, oelm::DType::f16, oelm::DType::bf16, oelm::DType::q8,
                                         oelm::DType::q6,  oelm::DType::q5,  oelm::DType::q4};
  for (size_t li = 0; li < ffn_dim.size(); ++li)
    for (oelm::DType dt : kWeights) check_bundles(dt, d_model, ffn_dim[li], fl.bundle_neurons);
}

// The input's bytes as a permutation tensor: accepted exactly when they are one.
void check_perm(const uint8_t* data, size_t size) {
  const int64_t F = int64_t(size / 4);
  if (F == 0) return;
  std::vector<char> seen(size_t(F), 0);
  bool valid = true;
  for (int64_t j = 0; j < F && valid; ++j) {
    int32_t e;
    std::memcpy(&e, data + 4 * j, 4);  // little-endian hosts (the loader's assumption)
    valid = e >= 0 && e < F && !seen[size_t(e)]++;
  }
  bool accepted = true;
  try {
    oelm::check_flash_perm(data, F, "blk.0.ffn_perm");
  } catch (const oelm::FormatError& e) {
    if (std::string_view(e.what()).find("blk.0.ffn_perm") == std::string_view::npos)
      finding(std::string("a FormatError that does not name the tensor: ") + e.what());
    accepted = false;
  } catch (const std::exception& e) {
    finding(std::string("check_flash_perm threw something other than FormatError: ") + e.what());
  }
  if (accepted != valid) finding(valid ? "a permutation was refused" : "a non-permutation was accepted");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  check_perm(data, size);
  oelm::json::Value doc;
  try {
    doc = oelm::json::parse(std::string_view(reinterpret_cast<const char*>(data), size));
  } catch (const oelm::FormatError&) {
    return 0;  // fuzz_json's ground
  }
  const oelm::json::Value* fl = &doc;
  std::vector<int64_t> ffn_dim;
  int64_t d_model = 1 + int64_t(size % 300);
  if (doc.is_object() && doc.find("flash_layout")) {
    fl = doc.find("flash_layout");
    if (!loader_ffn_dim(doc, &ffn_dim)) return 0;
    const oelm::json::Value* model = doc.find("model");
    const oelm::json::Value* d = model->find("d_model");
    if (d && d->is_integer() && d->as_int() >= 1 && d->as_int() <= kMaxDModel) d_model = d->as_int();
  } else {
    ffn_dim.push_back(1 + int64_t(size % 997));
  }

  oelm::FlashLayout layout;
  try {
    layout = oelm::parse_flash_layout(*fl);
  } catch (const oelm::FormatError& e) {
    if (std::string_view(e.what()).find("flash_layout") == std::string_view::npos)
      finding(std::string("a FormatError that does not name \"flash_layout\": ") + e.what());
    return 0;
  } catch (const std::exception& e) {
    finding(std::string("parse_flash_layout threw something other than FormatError: ") + e.what());
  }
  check_layout(layout, *fl, ffn_dim, d_model);
  return 0;
}
