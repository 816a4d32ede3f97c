// Exception types of the openelm_rt core. Every error message says what happened,
// with the values involved, and what to do about it; the Python layer maps these
// types onto FileNotFoundError / ValueError / KeyboardInterrupt.
#pragma once
#include <stdexcept>
#include <string>

namespace oelm {

// The file given does not exist or cannot be opened.
struct FileNotFound : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A model file is malformed, truncated, too new or inconsistent.
struct FormatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A caller passed an argument outside its valid range.
struct InvalidArgument : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// The KV cache budget cannot hold what was asked (an InvalidArgument: the caller can fix it by
// asking for less or configuring a larger budget); the message names the budget.
struct KvBudgetExceeded : InvalidArgument {
  using InvalidArgument::InvalidArgument;
};

// A long computation was asked to stop (e.g. Ctrl-C in Python).
struct Interrupted : std::runtime_error {
  Interrupted() : std::runtime_error("interrupted") {}
};

}  // namespace oelm
