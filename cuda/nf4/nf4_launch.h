// CUDA launchers for NF4 (plain C++ header; arguments are checked by cpp/src/nf4/nf4.cpp).
#pragma once

#include <cstdint>

#include "lorart/common.h"
#include "lorart/nf4.h"

namespace lorart::cuda {

// Raw pointers of an NF4 weight (absmax_q/nested_* are null without double quant).
struct NF4Ptrs {
  const uint8_t* packed = nullptr;
  const float* absmax_f32 = nullptr;
  const uint8_t* absmax_q = nullptr;
  const float* nested_absmax = nullptr;
  const float* nested_code = nullptr;
  float offset = 0.f;
  int64_t blocksize = 64, rows = 0, cols = 0;

  static NF4Ptrs from(const NF4View& w) {
    NF4Ptrs p;
    p.packed = w.packed.ptr<const uint8_t>();
    if (w.double_quant()) {
      p.absmax_q = w.absmax.ptr<const uint8_t>();
      p.nested_absmax = w.nested_absmax.ptr<const float>();
      p.nested_code = w.nested_code.ptr<const float>();
      p.offset = w.offset;
    } else {
      p.absmax_f32 = w.absmax.ptr<const float>();
    }
    p.blocksize = w.blocksize;
    p.rows = w.rows;
    p.cols = w.cols;
    return p;
  }
};

// Non-finite blocks get absmax = NaN (the caller checks absmax; see lorart/nf4.h).
void nf4_quantize(const void* w, DType dtype, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax,
                  Stream stream);
void nf4_double_quant(const float* absmax, int64_t nb, const float* offset, const float* code, uint8_t* q,
                      float* nested_absmax, Stream stream);
void nf4_dequantize(const NF4Ptrs& w, void* out, DType dtype, Stream stream);
// out[m, r] = round(sum_k x[m, k] * W[r, k] + bias[r] + addend(m, r)) with W decoded in float32 and rounded to
// x's dtype (bitsandbytes' dequantize rule): the one NF4 GEMV (nf4_gemv, and lora_fused_linear_nf4's base).
// x and out contiguous, m <= 16. `add`: the LoRA up-projection scale * xa[m, :] . B[r, :] (xa float32 [m, R],
// B [rows, R] of x's dtype), none when xa is null.
struct NF4Addend {
  const float* xa = nullptr;
  const void* B = nullptr;
  int64_t R = 0;
  float scale = 0.f;
};
void nf4_gemv(const void* x, DType dtype, int64_t m, const NF4Ptrs& w, const void* bias, void* out, Stream stream,
              const NF4Addend& add = {});

}  // namespace lorart::cuda
