// Launchers of the CUDA activation kernels (plain C++ header, raw device pointers).
#pragma once

#include <cstdint>

#include "lorart/common.h"

namespace lorart::cuda {

// dtype: F32, BF16 or F16; n elements; all pointers contiguous device memory.
void swiglu(DType dtype, const void* gate, const void* up, void* out, int64_t n, Stream stream);
void swiglu_backward(DType dtype, const void* gate, const void* up, const void* grad_out, void* grad_gate,
                     void* grad_up, int64_t n, Stream stream);

}  // namespace lorart::cuda
