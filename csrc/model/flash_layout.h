// The flash layout of a model's feed-forward weights (docs/FORMAT.md, "Flash layout"): per
// layer, the neurons permuted hottest-first (by activation frequency on calibration text) and
// stored in bundles of `bundle_neurons` neurons, each bundle its neurons' gate and up rows then
// their down columns, so that the coldest neurons of a layer are one contiguous tail of the
// file, read in one sequential request under a memory budget (streaming.h).
//
// parse_flash_layout is a pure function of the metadata's "flash_layout" value, and
// check_flash_perm of one layer's permutation tensor's elements, so each can be fuzzed on its
// own; Model::load calls both and checks the bundle tensors against flash_bundles().
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "common/json.h"
#include "format/oelm_file.h"

namespace oelm {

// The layout version this reader knows; metadata "flash_layout": {"version": 2, ...}.
// Version 1 (development exports only) kept the permutation in the metadata as JSON numbers,
// whose parsed form cost more memory than a budget allowed for; it is refused with a message
// to re-export (FORMAT.md).
constexpr int64_t kFlashLayoutVersion = 2;

struct FlashLayout {
  int64_t version = 0;
  int64_t bundle_neurons = 0;
};

// Validates `v` (the metadata's "flash_layout" value) and returns it; throws FormatError naming
// the problem (a version other than 2, a bundle size out of range). Bundle sizes: multiples of
// 32 in [32, 65536] (whole quantization blocks of the down columns).
FlashLayout parse_flash_layout(const json::Value& v);

// Checks one layer's permutation, the F little-endian int32 values at `data` (the tensor
// blk.{i}.ffn_perm: position p holds the checkpoint's index of the neuron stored there), to be
// a permutation of [0, F); throws FormatError naming `tensor` and the first bad element. The
// FFN's output does not depend on neuron order: the permutation is provenance, read only here.
void check_flash_perm(const uint8_t* data, int64_t F, const std::string& tensor);

// Where bundle b of a layer sits inside its tensor blk.{i}.ffn_bundles (FORMAT.md): its
// gate_up part, the matrix [2n, D] (n gate rows, then the n matching up rows), at `offset`;
// its down part, the matrix [D, n], at offset + down_offset; both in the weights' dtype and
// layout, each padded to a multiple of 4096 bytes.
struct FlashBundleGeometry {
  int64_t first = 0, neurons = 0;  // positions [first, first + neurons)
  uint64_t offset = 0;             // from the start of the tensor
  uint64_t gate_up_bytes = 0, down_offset = 0, down_bytes = 0;
  uint64_t bytes = 0;              // the whole bundle, padding included
};
constexpr uint64_t kFlashBundleAlign = 4096;

// A layer's bundles in order; false if a size overflows or the dtype cannot hold the shapes.
bool flash_bundles(DType weights, int64_t d_model, int64_t ffn_dim, int64_t bundle_neurons,
                   std::vector<FlashBundleGeometry>* out);

}  // namespace oelm
