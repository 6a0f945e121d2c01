// SwiGLU math shared by the CPU and CUDA drivers (one element at a time).
//
//   out   = silu(g) * u,            silu(g) = g / (1 + exp(-g))            (torch's F.silu formula)
//   du    = dout * silu(g)
//   dg    = dout * u * s * (1 + g * (1 - s)),   s = 1 / (1 + exp(-g))      (torch's silu_backward)
//
// Computed in float (double for float64 inputs) and rounded once per output, where the plain
// `F.silu(g) * u` rounds silu(g) to the storage dtype first. exp is a Cody-Waite reduced degree-6
// polynomial (Cephes expf's coefficients, <= 2 ulp over the float range) written without calls or
// branches so that the CPU loop vectorises and the GPU runs the very same formula.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "lorart/detail/hd.h"

namespace lorart::detail {

LORART_HD float act_bits_to_float(int32_t b) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, 4);
  return f;
#endif
}

// exp(x) for float: exact to ~2 ulp for x in [-87.3, 88.7]; 0 below (flushes what would be subnormal),
// +inf above, NaN for NaN.
LORART_HD float act_exp(float x) {
  const bool big = x > 88.72283f;
  const bool nan = x != x;
  // clamps as selects (fminf/fmaxf keep GCC from vectorising; NaN is handled by the last select)
  float xc = x < -87.33654f ? -87.33654f : x;
  xc = xc > 88.72283f ? 88.72283f : xc;
  const float n = rintf(xc * 1.44269504088896341f);
  float r = fmaf(n, -0.693359375f, xc);
  r = fmaf(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  const float y = fmaf(p, r * r, r) + 1.0f;
  const float v = y * act_bits_to_float((static_cast<int32_t>(n) + 127) << 23);
  return nan ? x : (big ? INFINITY : v);
}
LORART_HD double act_exp(double x) { return exp(x); }

template <class F>
LORART_HD F swiglu_forward(F g, F u) {
  return g / (F(1) + act_exp(-g)) * u;
}

template <class F>
LORART_HD void swiglu_backward(F g, F u, F dout, F& dg, F& du) {
  const F s = F(1) / (F(1) + act_exp(-g));
  du = dout * (g * s);
  dg = dout * u * s * (F(1) + g * (F(1) - s));
}

}  // namespace lorart::detail
