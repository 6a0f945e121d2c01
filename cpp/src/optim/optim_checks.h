// Argument checks shared by the AdamW drivers (32-bit and 8-bit states).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "lorart/detail/optim_math.h"
#include "lorart/optim.h"

namespace lorart::detail {

void check_adamw_options(const AdamWOptions& o);

// "name[i]"
std::string nth(const char* name, size_t i);

// params[i], grads[i] and steps[i]: dtypes, contiguity, element counts, devices. Returns the
// per-tensor scalars of this step.
AdamWScalars check_param_grad_step(const std::vector<TensorView>& params, const std::vector<TensorView>& grads,
                                   const std::vector<int64_t>& steps, size_t i, const AdamWOptions& o);

// A state tensor of params[i] (named `name`): one of `dtypes`, contiguous, `numel` elements
// (`what` says why, e.g. "as params[0]"), on params[0]'s device.
void check_state(const TensorView& t, const std::string& name, std::initializer_list<DType> dtypes, int64_t numel,
                 const std::string& what, const TensorView& param0);

}  // namespace lorart::detail
