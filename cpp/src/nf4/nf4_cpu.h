// CPU kernels for NF4 (arguments already checked by the public API in nf4.cpp).
#pragma once

#include <cstdint>

#include "lorart/nf4.h"

namespace lorart::cpu {

void nf4_quantize(const TensorView& weight, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax);
void nf4_double_quant(const float* absmax, int64_t nb, float offset, const float* code, uint8_t* q,
                      float* nested_absmax);
void nf4_dequantize(const NF4View& w, const TensorView& out);
void nf4_gemv(const TensorView& x, const NF4View& w, const TensorView& bias, const TensorView& out);

}  // namespace lorart::cpu
