// Launchers of the CUDA optimizer kernels (plain C++ header, raw pointers).
#pragma once

#include <cstdint>
#include <vector>

#include "lorart/common.h"
#include "lorart/detail/optim_math.h"

namespace lorart::cuda {

// Elements per chunk (one thread block each) of a multi-tensor step over `total` elements on `sms`
// SMs: ~8 chunks per SM over the call, in [16K, 1M], a multiple of 4096, so every chunk of an
// aligned tensor stays 16-byte aligned and starts on a 256-element 8-bit state block.
inline int64_t optim_chunk_elems(int64_t total, int sms) {
  const int64_t per_sm = total / (static_cast<int64_t>(sms) * 8);
  const int64_t rounded = (per_sm + 4095) / 4096 * 4096, lo = int64_t(1) << 14, hi = int64_t(1) << 20;
  return rounded < lo ? lo : (rounded > hi ? hi : rounded);
}

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
