// RMSNorm math shared by the CPU and CUDA drivers, in the order of transformers' LlamaRMSNorm:
//   rstd = 1 / sqrt(mean(x^2) + eps)            (x widened to float; per row)
//   n    = x * rstd                              (float), rounded to the storage dtype T: n_T
//   y    = w * n_T                               (rounded to T)
// Backward, from dy (g = dy * w rounded to T, as the plain path's mul backward produces it):
//   dx   = rstd * (g - n * mean(g * n))          (float, n unrounded; then rounded to T)
//   dw   = sum over rows of dy * n_T             (accumulated in float, rounded once)
#pragma once

#include <cmath>
#include <cstdint>

#include "lorart/detail/hd.h"

namespace lorart::detail {

template <class F>
LORART_HD F rms_rstd(F sum_sq, int64_t n, F eps) {
  return F(1) / sqrt(sum_sq / F(n) + eps);
}

// dx of one element given the row's rstd and c = mean(g * n) over the row.
template <class F>
LORART_HD F rms_dx(F g, F n, F rstd, F c) {
  return rstd * (g - n * c);
}

// Threads per CUDA block for a row of h elements: every thread keeps at most kRmsPerThread
// elements of the row in registers (h <= 1024 * kRmsPerThread).
constexpr int kRmsPerThread = 16;
inline int rms_threads(int64_t h) {
  int t = 128;
  while (t < 1024 && int64_t(t) * kRmsPerThread < h) t *= 2;
  return t;
}

}  // namespace lorart::detail
