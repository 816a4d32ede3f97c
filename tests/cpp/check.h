// A minimal test harness for the C API tests: TEST(name) registers a function,
// CHECK* throw on the first failure (with file, line and values), main() runs the
// tests named on the command line (all when none). It exists so that the tests
// build on any machine with a C++17 compiler: no GoogleTest package, no download.
#pragma once
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace check {

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Case {
  const char* name;
  void (*fn)();
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

struct Registrar {
  Registrar(const char* name, void (*fn)()) { registry().push_back({name, fn}); }
};

template <typename A, typename B>
[[noreturn]] void fail_eq(const char* file, int line, const char* expr, const A& a, const B& b) {
  std::ostringstream os;
  os << file << ":" << line << ": CHECK_EQ(" << expr << ") failed: " << a << " != " << b;
  throw Failure(os.str());
}

// Runs the named tests (all when `names` is empty); returns the process exit code.
inline int run(const std::vector<std::string>& names) {
  std::set<std::string> wanted(names.begin(), names.end()), found;
  int failed = 0, ran = 0;
  for (const Case& c : registry()) {
    if (!wanted.empty() && !wanted.count(c.name)) continue;
    found.insert(c.name);
    ++ran;
    const auto t0 = std::chrono::steady_clock::now();
    std::string error;
    try {
      c.fn();
    } catch (const std::exception& e) {
      error = e.what();
    }
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (error.empty()) {
      std::printf("[  OK  ] %s (%.0f ms)\n", c.name, ms);
    } else {
      std::printf("[ FAIL ] %s (%.0f ms)\n         %s\n", c.name, ms, error.c_str());
      ++failed;
    }
    std::fflush(stdout);
  }
  for (const std::string& n : wanted)
    if (!found.count(n)) {
      std::printf("[ FAIL ] no test named '%s'\n", n.c_str());
      ++failed;
    }
  std::printf("%d test(s), %d failed\n", ran, failed);
  return failed ? 1 : 0;
}

// `--expect A B ...`: fails unless the registered tests are exactly A B ... (so a
// test added here but not to the ctest list in CMakeLists.txt cannot go unrun).
inline int expect(const std::vector<std::string>& names) {
  std::set<std::string> listed(names.begin(), names.end()), registered;
  for (const Case& c : registry()) registered.insert(c.name);
  int bad = 0;
  for (const auto& n : registered)
    if (!listed.count(n)) std::printf("test '%s' is not registered with ctest (tests/cpp/CMakeLists.txt)\n", n.c_str()), ++bad;
  for (const auto& n : listed)
    if (!registered.count(n)) std::printf("ctest lists '%s' but no such test exists\n", n.c_str()), ++bad;
  return bad ? 1 : 0;
}

inline int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (!args.empty() && args[0] == "--expect") return expect({args.begin() + 1, args.end()});
  return run(args);
}

}  // namespace check

#define CHECK_CAT2(a, b) a##b
#define CHECK_CAT(a, b) CHECK_CAT2(a, b)
#define TEST(name)                                                   \
  static void name();                                                \
  static check::Registrar CHECK_CAT(registrar_, name)(#name, &name); \
  static void name()

#define CHECK(cond)                                                                                  \
  do {                                                                                               \
    if (!(cond)) throw check::Failure(std::string(__FILE__) + ":" + std::to_string(__LINE__) +      \
                                      ": CHECK(" #cond ") failed");                                  \
  } while (0)

#define CHECK_EQ(a, b)                                                         \
  do {                                                                         \
    const auto& check_a_ = (a);                                                \
    const auto& check_b_ = (b);                                                \
    if (!(check_a_ == check_b_)) check::fail_eq(__FILE__, __LINE__, #a ", " #b, check_a_, check_b_); \
  } while (0)
