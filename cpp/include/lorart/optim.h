// Optimizer kernels: a fused multi-tensor AdamW step (decoupled weight decay,
// torch.optim.AdamW's arithmetic; see detail/optim_math.h).
//
// All tensors of one call live on one device. CPU: a threaded, vectorised loop over
// all tensors. CUDA: one kernel launch for the whole list, driven by a device array
// of chunk descriptors uploaded with one stream-ordered copy (no synchronisation).
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

}  // namespace lorart
