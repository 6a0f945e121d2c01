// Launchers of the LoRA CUDA kernels (cuda/lora/lora.cu) on raw pointers. Plain C++ header.
// Arguments were checked by the public API (cpp/src/lora/lora.cpp); dtype codes are lorart::DType.
#pragma once

#include <cstdint>

#include "lorart/common.h"

namespace lorart::cuda {

constexpr int64_t kLoraFusedMaxRows = 16;

void lora_dropout(DType dt, const void* x, int64_t ldx, void* out, int64_t ldo, int64_t M, int64_t K, double p,
                  uint64_t seed, Stream s);
void lora_shrink(DType dt, const void* x, int64_t ldx, const void* A, int64_t M, int64_t K, int64_t R, double p,
                 uint64_t seed, float* xa, Stream s);
void lora_fused_linear(DType dt, const void* x, int64_t ldx, const void* W, const void* bias, const float* xa,
                       const void* B, int64_t R, float scale, void* y, int64_t ldy, int64_t M, int64_t N, int64_t K,
                       Stream s);
void lora_grouped_add(DType dt, void* y, int64_t ldy, const void* x, int64_t ldx, const void* A_stack,
                      const void* B_stack, const int32_t* ranks, const float* scales, const void* idx, bool idx64,
                      int64_t idx_stride, float* xa, int64_t M, int64_t N, int64_t K, int64_t RM, int64_t L,
                      Stream s);
void lora_merge(DType dt, void* W, const void* A, const void* B, int64_t N, int64_t K, int64_t R, float scale,
                int32_t* count_nonfinite, Stream s);

}  // namespace lorart::cuda
