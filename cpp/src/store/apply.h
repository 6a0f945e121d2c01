// Internal: the adapter store's apply on top of lorart::lora_grouped_add.
#pragma once

#include <string>
#include <vector>

#include "lorart/adapter_store.h"

namespace lorart::detail {

// x [M, K] and y [M, N]: CPU, 2-d, contiguous, one float dtype.
void check_apply_args(const TensorView& x, const TensorView& y, const char* what);
// y[m] += s * (x[m] @ A.T) @ B.T for the rows m with idx[m] == 0 (idx[m] == -1: untouched).
void apply_rows(const Adapter& a, const std::string& module, const LoraPair& p, const TensorView& x,
                const TensorView& y, const std::vector<int64_t>& idx, const char* what);

}  // namespace lorart::detail
