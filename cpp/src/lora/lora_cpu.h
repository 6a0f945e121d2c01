// Internal: the CPU drivers of the LoRA kernels (lora_cpu.cpp), called by the dispatch in lora.cpp
// after all argument checks.
#pragma once

#include <cstdint>

#include "common/cpu_loop.h"
#include "lorart/detail/lora_math.h"
#include "lorart/lora.h"

namespace lorart::detail {

void cpu_lora_dropout(const TensorView& x, const TensorView& out, double p, uint64_t seed);
// One row of dropout: out[k] = x[k] * keep_scale where lora_dropout_keep(key, base + k), else 0 (AVX2 when the
// CPU has it, bit-identical to the scalar loop; out may alias x). float, double, bf16 and f16.
template <class T>
void cpu_lora_dropout_row(const T* x, T* out, int64_t K, uint64_t base, const LoraDropoutKey& key,
                          typename Compute<T>::type keep_scale);
void cpu_lora_shrink(const TensorView& x, const TensorView& A, double p, uint64_t seed, const TensorView& xa);
void cpu_lora_fused_linear(const TensorView& x, const TensorView& W, const TensorView& bias, const TensorView& xa,
                           const TensorView& B, double scale, const TensorView& y);
void cpu_lora_grouped_add(const TensorView& y, const TensorView& x, const TensorView& A_stack,
                          const TensorView& B_stack, const TensorView& ranks, const TensorView& scales,
                          const TensorView& idx, const TensorView& xa_ws);
void cpu_lora_merge(const TensorView& W, const TensorView& A, const TensorView& B, double scale);
int64_t cpu_lora_merge_count_nonfinite(const TensorView& W, const TensorView& A, const TensorView& B, double scale);

}  // namespace lorart::detail
