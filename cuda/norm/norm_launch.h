// Launchers of the CUDA RMSNorm kernels (plain C++ header, raw device pointers).
#pragma once

#include <cstdint>

#include "lorart/common.h"

namespace lorart::cuda {

// dtype F32, BF16 or F16; rows x h contiguous; rstd float32 [rows]; h <= rms_norm_max_hidden().
void rms_norm(DType dtype, const void* x, const void* w, float eps, void* out, float* rstd, int64_t rows,
              int64_t h, Stream stream);
// grad_w float32 [h] or null; it is zeroed and accumulated on `stream`.
void rms_norm_backward(DType dtype, const void* x, const void* w, const float* rstd, const void* dy, void* dx,
                       float* grad_w, int64_t rows, int64_t h, Stream stream);

}  // namespace lorart::cuda
