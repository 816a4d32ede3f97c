// The tests' random numbers: splitmix64, the same on every platform and standard library.
#pragma once
#include <cstdint>

struct Rng {  // splitmix64: the same numbers on every platform and standard library
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  float uniform(float lo, float hi) { return lo + (hi - lo) * float(next() >> 40) * 0x1p-24f; }
  int64_t below(int64_t n) { return int64_t(next() % uint64_t(n)); }
};
