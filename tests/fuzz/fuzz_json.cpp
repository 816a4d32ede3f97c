// libFuzzer target: arbitrary bytes through the metadata JSON parser (csrc/common/json.h):
// it returns a value or throws FormatError; anything else (a crash, another exception, a
// sanitizer report, stack exhaustion from nesting) is a finding. A parsed value is walked
// completely, so every stored string and number is read.
#include <cstdint>
#include <string_view>

#include "common/error.h"
#include "common/json.h"

namespace {
size_t walk(const oelm::json::Value& v, int depth) {
  size_t n = 1 + v.as_string().size() + size_t(v.as_int() & 1) + size_t(v.as_double() > 0);
  for (const auto& item : v.items()) n += walk(item, depth + 1);
  for (const auto& [key, value] : v.members()) n += key.size() + walk(value, depth + 1);
  return n;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const oelm::json::Value v = oelm::json::parse(std::string_view(reinterpret_cast<const char*>(data), size));
    volatile size_t sink = walk(v, 0);
    (void)sink;
    if (v.is_object()) (void)v.find("tensors");
  } catch (const oelm::FormatError&) {
  }
  return 0;
}
