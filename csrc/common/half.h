// Conversions between float and the 16-bit storage types (IEEE binary16, bfloat16).
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

// binary32 -> bfloat16, round to nearest, ties to even (as AVX-512 BF16's vcvtne2ps2bf16 and
// the exporter do); NaN stays a quiet NaN. Infinities and values that round past the largest
// finite bfloat16 become infinities.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

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

// binary32 -> binary16, rounded to nearest, ties to even (IEEE 754's default, and what
// F16C's vcvtps2ph and numpy's astype(float16) give): overflow goes to infinity, NaN stays a
// (quiet) NaN. Used to store KV-cache rows in f16; one conversion per stored element.
inline uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return uint16_t(sign | (ax > 0x7F800000u ? 0x7E00u | ((ax >> 13) & 0x3FFu) : 0x7C00u));
  const int e = int(ax >> 23) - 127;  // unbiased exponent
  const uint32_t mant = ax & 0x7FFFFFu;
  if (e > 15) return uint16_t(sign | 0x7C00u);
  if (e >= -14) {  // a normal half: keep 10 of the 23 mantissa bits; a carry may reach inf
    uint32_t h = (uint32_t(e + 15) << 10) | (mant >> 13);
    const uint32_t rem = mant & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
    return uint16_t(sign | h);
  }
  const int shift = -(e + 1);  // subnormal: value / 2^-24 = (mant | 2^23) / 2^shift
  if (shift > 24) return sign;
  const uint32_t m24 = mant | 0x800000u;
  uint32_t h = m24 >> shift;
  const uint32_t rem = m24 & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
  if (rem > halfway || (rem == halfway && (h & 1u))) ++h;
  return uint16_t(sign | h);
}

}  // namespace oelm
