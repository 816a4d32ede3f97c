// A small, strict JSON reader for the .oelm metadata block (RFC 8259 syntax, UTF-8).
// It is written for untrusted input: bounded nesting depth, no recursion on
// attacker-controlled sizes beyond that bound, and errors that give the byte offset.
// It is not a general JSON library: no writer, no streaming, objects keep key order.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace oelm::json {

class Value {
 public:
  enum class Kind { null, boolean, number, string, array, object };

  Kind kind() const { return kind_; }
  bool is_null() const { return kind_ == Kind::null; }
  bool is_number() const { return kind_ == Kind::number; }
  bool is_string() const { return kind_ == Kind::string; }
  bool is_array() const { return kind_ == Kind::array; }
  bool is_object() const { return kind_ == Kind::object; }
  bool is_bool() const { return kind_ == Kind::boolean; }
  // True for a number written without fraction or exponent that fits in int64.
  bool is_integer() const { return kind_ == Kind::number && is_int_; }

  bool as_bool() const { return bool_; }
  double as_double() const { return num_; }
  int64_t as_int() const { return int_; }
  const std::string& as_string() const { return str_; }
  const std::vector<Value>& items() const { return arr_; }
  const std::vector<std::pair<std::string, Value>>& members() const { return obj_; }

  // Object member lookup; nullptr when absent or when this is not an object.
  const Value* find(std::string_view key) const;

  static const char* kind_name(Kind k);

 private:
  friend class Parser;
  Kind kind_ = Kind::null;
  bool bool_ = false;
  bool is_int_ = false;
  double num_ = 0;
  int64_t int_ = 0;
  std::string str_;
  std::vector<Value> arr_;
  std::vector<std::pair<std::string, Value>> obj_;
};

// Parses `text`; throws oelm::FormatError("metadata JSON: <what> at byte N") on error.
Value parse(std::string_view text);

}  // namespace oelm::json
