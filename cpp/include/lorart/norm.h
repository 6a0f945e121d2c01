// Fused RMSNorm (Llama-family models), forward and backward, arithmetic of transformers'
// LlamaRMSNorm (see lorart/detail/norm_math.h). Backward needs only x and the per-row rstd: the
// plain PyTorch path also keeps the widened and the normalised rows.
#pragma once

#include "lorart/common.h"

namespace lorart {

// Largest hidden size the CUDA kernels take (a row lives in one block's registers).
int64_t rms_norm_max_hidden();

// x [rows, h] (float32 | bfloat16 | float16; float64 on the CPU), weight [h] and out [rows, h] of x's
// dtype, rstd [rows] float32 (float64 for float64 x). All contiguous. out = weight * (x * rstd).
void rms_norm(const TensorView& x, const TensorView& weight, double eps, const TensorView& out,
              const TensorView& rstd, Stream stream = nullptr);

// grad_x [rows, h] of x's dtype; grad_weight [h] float32 (float64 for float64 x), overwritten with the
// sum over rows (pass an empty view to skip it).
void rms_norm_backward(const TensorView& x, const TensorView& weight, const TensorView& rstd,
                       const TensorView& grad_out, const TensorView& grad_x, const TensorView& grad_weight,
                       Stream stream = nullptr);

}  // namespace lorart
