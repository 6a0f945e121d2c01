// CPU kernels for NF4 (arguments already checked by the public API in nf4.cpp).
#pragma once

#include <cstdint>

#include "lorart/nf4.h"

namespace lorart::cpu {

// The x86 vector paths of the CPU kernels (AVX2 + FMA + F16C, picked at run time): set_simd(false) makes every
// CPU kernel that has one (NF4, LoRA dropout) take its portable loop instead (the same bits); returns the old
// setting. simd_active(): whether they run now (supported by this CPU and build, and enabled).
bool set_simd(bool enabled);
bool simd_active();

void nf4_quantize(const TensorView& weight, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax);
void nf4_double_quant(const float* absmax, int64_t nb, float offset, const float* code, uint8_t* q,
                      float* nested_absmax);
void nf4_dequantize(const NF4View& w, const TensorView& out);
// out[m, r] = round(sum_k x[m, k] * W[r, k] + bias[r] + lora(m, r)), W decoded in float32 and rounded to x's
// dtype (bitsandbytes' dequantize rule, as nf4_dequantize + a GEMM), float32 sums, one rounding of the result.
// `lora` (optional): the LoRA up-projection scale * xa[m, :] . B[r, :] that lora_fused_linear_nf4 adds.
struct GemvLora {
  const float* xa = nullptr;  // float32 [M, R]
  const void* B = nullptr;    // [rows, R], x's dtype
  int64_t R = 0;
  float scale = 0.f;
};
void nf4_gemv(const TensorView& x, const NF4View& w, const TensorView& bias, const TensorView& out,
              const GemvLora* lora = nullptr);

}  // namespace lorart::cpu
