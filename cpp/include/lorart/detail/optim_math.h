// AdamW update math shared by the CPU and CUDA drivers (one element at a time).
//
// The order of operations follows torch.optim.AdamW (_single_tensor_adam /
// _multi_tensor_adam, decoupled weight decay), so results agree with torch to
// float rounding:
//   p  = p * (1 - lr*wd)                      (param.mul_(1 - lr*wd))
//   m  = lerp(m, g, 1 - beta1)                (exp_avg.lerp_(grad, 1 - beta1))
//   v  = v * beta2;  v = v + (1-beta2)*g*g    (exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1-beta2))
//   d  = sqrt(v) / sqrt(1 - beta2^t) + eps    (denom)
//   p  = p + (-lr / (1 - beta1^t)) * m / d    (param.addcdiv_(exp_avg, denom, value=-step_size))
// The per-tensor scalars are computed on the host in double (as Python does) and
// rounded to float once, exactly as torch turns Python scalars into float operands.
#pragma once

#include <cmath>
#include <cstdint>

#include "lorart/detail/hd.h"

// Host builds force inlining so that the math also inlines into target-specific clones
// of the CPU loop (GCC's target_clones), where plain `inline` is not enough to vectorise.
#if !defined(__CUDACC__) && (defined(__GNUC__) || defined(__clang__))
#define LORART_OPTIM_HD inline __attribute__((always_inline))
#else
#define LORART_OPTIM_HD LORART_HD
#endif

namespace lorart::detail {

struct AdamWScalars {
  float wd_factor;        // 1 - lr * weight_decay
  float w1;               // 1 - beta1: the lerp weight
  float beta2;
  float one_minus_beta2;  // 1 - beta2
  float bc2_sqrt;         // sqrt(1 - beta2^step)
  float eps;
  float neg_step_size;    // -lr / (1 - beta1^step)
  float grad_sign;        // -1 when maximizing, else 1
};

// Host side: the scalars for one tensor at `step` (the count after this step's increment, >= 1).
inline AdamWScalars adamw_scalars(double lr, double beta1, double beta2, double eps, double weight_decay,
                                  int64_t step, bool maximize) {
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  AdamWScalars s;
  s.wd_factor = static_cast<float>(1.0 - lr * weight_decay);
  s.w1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  s.eps = static_cast<float>(eps);
  s.neg_step_size = static_cast<float>(-(lr / bc1));
  s.grad_sign = maximize ? -1.0f : 1.0f;
  return s;
}

// torch.lerp's formula (ATen Lerp.h): the branch keeps the result exact at the ends.
LORART_OPTIM_HD float adamw_lerp(float a, float b, float w) {
  return (w < 0.5f && w > -0.5f) ? a + w * (b - a) : b - (b - a) * (1.0f - w);
}

// One element: p, m, v updated in place (fp32 arithmetic). NaN/Inf in g propagate
// into p, m and v, as in torch.
LORART_OPTIM_HD void adamw_update(float& p, float g, float& m, float& v, const AdamWScalars& s) {
  g = g * s.grad_sign;
  p = p * s.wd_factor;
  m = adamw_lerp(m, g, s.w1);
  v = v * s.beta2;
  v = v + s.one_minus_beta2 * g * g;
  const float denom = sqrtf(v) / s.bc2_sqrt + s.eps;
  p = p + s.neg_step_size * m / denom;
}

}  // namespace lorart::detail
