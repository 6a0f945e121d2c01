// Stress test of the CPU thread pool: every index visited exactly once, with more
// threads than cores, many short regions back to back, nested calls and exceptions.
#include <atomic>
#include <cstdio>
#include <stdexcept>
#include <vector>

#include "common/parallel.h"
#include "lorart/common.h"

#define CHECK(c)                                                  \
  do {                                                            \
    if (!(c)) {                                                   \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #c); \
      return 1;                                                   \
    }                                                             \
  } while (0)

int main() {
  using lorart::detail::parallel_for;
  lorart::set_num_threads(16);
  for (int round = 0; round < 20000; ++round) {
    const int64_t n = 1 + (round * 37) % 300;
    std::vector<std::atomic<int>> hits(n);
    for (auto& h : hits) h = 0;
    parallel_for(n, 1 + round % 7, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
      for (volatile int spin = 0; spin < (b % 3) * 50; ++spin) {
      }
    });
    for (int64_t i = 0; i < n; ++i) CHECK(hits[i].load() == 1);
  }
  // nested regions run serially inside the outer one
  std::atomic<int64_t> total{0};
  parallel_for(64, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      parallel_for(10, 1, [&](int64_t b2, int64_t e2) { total += e2 - b2; });
  });
  CHECK(total.load() == 640);
  // an exception in any chunk reaches the caller, and the pool keeps working
  bool caught = false;
  try {
    parallel_for(100, 1, [&](int64_t b, int64_t) {
      if (b > 50) throw std::runtime_error("boom");
    });
  } catch (const std::runtime_error&) {
    caught = true;
  }
  CHECK(caught);
  std::atomic<int64_t> sum{0};
  parallel_for(1000, 1, [&](int64_t b, int64_t e) { sum += e - b; });
  CHECK(sum.load() == 1000);
  lorart::set_num_threads(1);
  CHECK(lorart::get_num_threads() == 1);
  std::puts("test_parallel: ok");
  return 0;
}
