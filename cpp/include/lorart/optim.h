// Optimizer kernels: a fused multi-tensor AdamW step (decoupled weight decay,
// torch.optim.AdamW's arithmetic; see detail/optim_math.h), with float32 states or with
// 8-bit blockwise states (bitsandbytes' 8-bit Adam layout; see detail/optim8_math.h).
//
// All tensors of one call live on one device. CPU: a threaded, vectorised loop over
// all tensors. CUDA: one kernel launch per few hundred chunks, the chunk descriptors
// passed as one __grid_constant__ kernel parameter (no allocation, no synchronisation).
// The Python paged optimizer (lorart.optim.PagedAdamW) pages states in and out of
// pinned host memory around these calls.
#pragma once

#include <cstdint>
#include <vector>

#include "lorart/common.h"

namespace lorart {

struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
  bool maximize = false;
};

// One AdamW step over a list of tensors, in place.
//   params[i]      float32 | bfloat16 | float16, contiguous (updated)
//   grads[i]       same dtype and number of elements as params[i], contiguous
//   exp_avgs[i], exp_avg_sqs[i]  float32, same number of elements, contiguous (updated)
//   steps[i]       the step count of tensor i after this step's increment (>= 1)
// Shapes may differ (only element counts must agree, so flat slices work). Throws
// lorart::Error naming the argument and index on any mismatch. On CUDA the work is
// queued on `stream` and the call returns without waiting.
void adamw_step(const std::vector<TensorView>& params, const std::vector<TensorView>& grads,
                const std::vector<TensorView>& exp_avgs, const std::vector<TensorView>& exp_avg_sqs,
                const std::vector<int64_t>& steps, const AdamWOptions& options, Stream stream = nullptr);

// One AdamW step with 8-bit blockwise states, in place. Each state is one byte per element
// (q) and one float32 per block of 256 elements (absmax): element j of block b stands for
// code[q[j]] * absmax[b], with bitsandbytes' signed dynamic map for exp_avg and its unsigned
// one for exp_avg_sq (dynamic_map below). Per block: dequantise, adamw_update (the parameter
// takes the fp32 states), absmax = max |state|, requantise to the nearest code.
//   params[i]              float32 | bfloat16 | float16, contiguous (updated)
//   grads[i]               same dtype and number of elements as params[i], contiguous
//   q_exp_avgs[i], q_exp_avg_sqs[i]              uint8, same number of elements, contiguous (updated)
//   absmax_exp_avgs[i], absmax_exp_avg_sqs[i]    float32, ceil(numel / 256) elements, contiguous (updated)
//   steps[i]               the step count of tensor i after this step's increment (>= 1)
// Fresh states are all-zero bytes with zero absmax. Throws lorart::Error naming the argument
// and index on any mismatch. On CUDA the work is queued on `stream`.
void adamw8_step(const std::vector<TensorView>& params, const std::vector<TensorView>& grads,
                 const std::vector<TensorView>& q_exp_avgs, const std::vector<TensorView>& q_exp_avg_sqs,
                 const std::vector<TensorView>& absmax_exp_avgs, const std::vector<TensorView>& absmax_exp_avg_sqs,
                 const std::vector<int64_t>& steps, const AdamWOptions& options, Stream stream = nullptr);

// bitsandbytes' 256-entry dynamic map, sorted (bitsandbytes.functional.create_dynamic_map(signed)).
std::vector<float> dynamic_map(bool is_signed);

// The 8-bit kernels' quantisation alone (CPU tensors; used to convert float32 states):
// x float32 contiguous -> q uint8 (x's element count), absmax float32 (ceil(numel / 256)).
void quantize_blockwise8(const TensorView& x, bool is_signed, const TensorView& q, const TensorView& absmax);
// q uint8, absmax float32 -> out float32 (q's element count): code[q] * absmax.
void dequantize_blockwise8(const TensorView& q, const TensorView& absmax, bool is_signed, const TensorView& out);

}  // namespace lorart
