// Internal: the CPU drivers of the LoRA kernels (lora_cpu.cpp), called by the dispatch in lora.cpp
// after all argument checks.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/check.h"
#include "common/half.h"
#include "lorart/detail/lora_math.h"
#include "lorart/lora.h"

namespace lorart::detail {

template <class T>
using lora_acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <class T>
inline lora_acc_t<T> lora_ld(T v) {
  if constexpr (std::is_same_v<T, double>) return v; else return to_f32(v);
}

// Calls f(T{}) with the storage type of a float dtype (float, double, bf16, f16).
template <class F>
void lora_dispatch_float(DType d, F&& f) {
  switch (d) {
    case DType::F32: f(float{}); return;
    case DType::F64: f(double{}); return;
    case DType::BF16: f(bf16{}); return;
    case DType::F16: f(f16{}); return;
    default: fail(ErrorKind::Type, cat("lora: unsupported dtype ", dtype_name(d)));
  }
}

void cpu_lora_dropout(const TensorView& x, const TensorView& out, double p, uint64_t seed);
// One row of dropout: out[k] = x[k] * keep_scale where lora_dropout_keep(key, base + k), else 0 (AVX2 when the
// CPU has it, bit-identical to the scalar loop; out may alias x). float, double, bf16 and f16.
template <class T>
void cpu_lora_dropout_row(const T* x, T* out, int64_t K, uint64_t base, const LoraDropoutKey& key,
                          lora_acc_t<T> keep_scale);
void cpu_lora_shrink(const TensorView& x, const TensorView& A, double p, uint64_t seed, const TensorView& xa);
void cpu_lora_fused_linear(const TensorView& x, const TensorView& W, const TensorView& bias, const TensorView& xa,
                           const TensorView& B, double scale, const TensorView& y);
void cpu_lora_fused_linear_nf4(const TensorView& x, const NF4View& W, const TensorView& bias,
                               const TensorView& xa, const TensorView& B, double scale, const TensorView& y);
void cpu_lora_grouped_add(const TensorView& y, const TensorView& x, const TensorView& A_stack,
                          const TensorView& B_stack, const TensorView& ranks, const TensorView& scales,
                          const TensorView& idx, const TensorView& xa_ws);
void cpu_lora_merge(const TensorView& W, const TensorView& A, const TensorView& B, double scale);
int64_t cpu_lora_merge_count_nonfinite(const TensorView& W, const TensorView& A, const TensorView& B, double scale);

}  // namespace lorart::detail
