// Launchers of the CUDA optimizer kernels (plain C++ header, raw pointers).
#pragma once

#include <cstdint>
#include <vector>

#include "lorart/common.h"
#include "lorart/detail/optim_math.h"

namespace lorart::cuda {

// One tensor (or flat slice) of an AdamW step. All pointers are device pointers.
struct AdamWTensor {
  void* param;            // DType given to the launcher
  const void* grad;       // same dtype as param
  float* exp_avg;
  float* exp_avg_sq;
  int64_t numel;
  detail::AdamWScalars s;
};

// Fused launches over all tensors (all with params of `dtype`: F32, BF16 or F16).
// The tensors are cut into chunks; up to 384 chunk descriptors travel per launch as
// one __grid_constant__ kernel parameter (no allocation, no copy), so nothing
// synchronises the host.
void adamw_step(const std::vector<AdamWTensor>& tensors, DType dtype, Stream stream);

// One tensor (or flat slice starting at a 256-element block boundary) of an 8-bit AdamW step.
struct AdamW8Tensor {
  void* param;                // DType given to the launcher
  const void* grad;           // same dtype as param
  uint8_t* q_exp_avg;         // numel bytes
  uint8_t* q_exp_avg_sq;
  float* absmax_exp_avg;      // ceil(numel / 256) floats
  float* absmax_exp_avg_sq;
  int64_t numel;
  detail::AdamWScalars s;
};

// Fused launches over all tensors (params of `dtype`), like adamw_step: chunks of whole
// 256-element blocks, descriptors as one __grid_constant__ parameter, nothing synchronises.
void adamw8_step(const std::vector<AdamW8Tensor>& tensors, DType dtype, Stream stream);

}  // namespace lorart::cuda
