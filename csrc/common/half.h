// Conversions from the 16-bit storage types (IEEE binary16, bfloat16) to float.
// Plain bit manipulation, no intrinsics: this is the reference the fast paths match.
#pragma once
#include <cstdint>
#include <cstring>

namespace oelm {

inline float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// bfloat16 is the upper half of a binary32, so widening is exact.
inline float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }

// binary16 -> binary32, exact for every number (normals, subnormals, zeros, infinities);
// NaN stays NaN with its payload, signalling NaNs come back quiet (weights are never
// NaN: the exporter refuses them). Branch-free so that loops over it vectorise: normal numbers are rebiased by moving
// the exponent/mantissa bits into place and scaling by 2^-112; subnormals are built
// as (0.5 + m * 2^-24 scaled) - 0.5 with a float subtraction, which is exact.
inline float f16_to_f32(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;  // exponent and mantissa, sign shifted out
  uint32_t normal_bits, sub_bits;
  const float normal = bits_to_f32((two_w >> 4) + (uint32_t(0xE0) << 23)) * 0x1.0p-112f;
  const float sub = bits_to_f32((two_w >> 17) | (uint32_t(126) << 23)) - 0.5f;
  std::memcpy(&normal_bits, &normal, 4);
  std::memcpy(&sub_bits, &sub, 4);
  const uint32_t is_sub = 0u - uint32_t(two_w < (uint32_t(1) << 27));  // all ones or zero: a mask,
  return bits_to_f32(sign | (sub_bits & is_sub) | (normal_bits & ~is_sub));  // not a branch
}

}  // namespace oelm
