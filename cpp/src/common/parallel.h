// A small persistent thread pool for the CPU kernels (no OpenMP: torch ships its
// own OpenMP runtime and a second one in the process oversubscribes the cores).
#pragma once

#include <cstdint>
#include <functional>

namespace lorart::detail {

// Calls fn(begin, end) over disjoint chunks covering [0, n), in parallel when n is
// larger than `grain`. Nested calls (from inside fn) run serially. Exceptions thrown
// by fn are rethrown in the caller (the first one).
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace lorart::detail
