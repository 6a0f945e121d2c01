// A tiny check harness for the C++ tests (no framework): CHECK, CHECK_THROWS, TEST.
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "lorart/common.h"

namespace lorart_test {

inline int& failures() { static int n = 0; return n; }
inline std::vector<std::pair<const char*, std::function<void()>>>& registry() {
  static std::vector<std::pair<const char*, std::function<void()>>> r;
  return r;
}
struct Reg {
  Reg(const char* name, std::function<void()> fn) { registry().emplace_back(name, std::move(fn)); }
};

inline int run_all() {
  for (auto& t : registry()) {
    int before = failures();
    try {
      t.second();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "  %s: unexpected exception: %s\n", t.first, e.what());
      ++failures();
    }
    std::printf("%s %s\n", failures() == before ? "ok  " : "FAIL", t.first);
  }
  std::printf("%d failure(s)\n", failures());
  return failures() ? 1 : 0;
}

}  // namespace lorart_test

#define TEST(name)                                                  \
  static void name();                                               \
  static lorart_test::Reg reg_##name(#name, name);                  \
  static void name()

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::fprintf(stderr, "  %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      ++lorart_test::failures();                                                      \
    }                                                                                 \
  } while (0)

#define CHECK_NEAR(a, b, tol)                                                                        \
  do {                                                                                               \
    double a_ = (a), b_ = (b);                                                                       \
    if (!(std::fabs(a_ - b_) <= (tol))) {                                                            \
      std::fprintf(stderr, "  %s:%d: %s = %.9g, expected %.9g\n", __FILE__, __LINE__, #a, a_, b_); \
      ++lorart_test::failures();                                                                     \
    }                                                                                                \
  } while (0)

// Checks that `expr` throws lorart::Error whose message contains `needle`.
#define CHECK_THROWS(expr, needle)                                                                     \
  do {                                                                                                 \
    bool thrown_ = false;                                                                              \
    try {                                                                                              \
      (void)(expr);                                                                                    \
    } catch (const lorart::Error& e_) {                                                                \
      thrown_ = true;                                                                                  \
      if (std::string(e_.what()).find(needle) == std::string::npos) {                                  \
        std::fprintf(stderr, "  %s:%d: %s threw \"%s\", expected it to mention \"%s\"\n", __FILE__,   \
                     __LINE__, #expr, e_.what(), needle);                                              \
        ++lorart_test::failures();                                                                     \
      }                                                                                                \
    }                                                                                                  \
    if (!thrown_) {                                                                                    \
      std::fprintf(stderr, "  %s:%d: %s did not throw lorart::Error\n", __FILE__, __LINE__, #expr);   \
      ++lorart_test::failures();                                                                       \
    }                                                                                                  \
  } while (0)

#define TEST_MAIN() \
  int main() { return lorart_test::run_all(); }
