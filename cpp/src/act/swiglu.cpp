// SwiGLU: argument checks, device dispatch and the CPU kernels (threaded, vectorised loops).
#include <algorithm>

#include "common/check.h"
#include "common/cpu_loop.h"
#include "common/parallel.h"
#include "lorart/act.h"
#include "lorart/detail/act_math.h"
#ifdef LORART_WITH_CUDA
#include "act/act_launch.h"
#include "common/cuda_api.h"
#endif

namespace lorart {
namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per parallel work item

using detail::Compute;
using detail::load;
using detail::store;

template <class T>
LORART_CPU_CLONES void forward_run(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ out, int64_t n) {
  using F = typename Compute<T>::type;
  for (int64_t i = 0; i < n; ++i) out[i] = store<T>(detail::swiglu_forward<F>(load(g[i]), load(u[i])));
}

template <class T>
LORART_CPU_CLONES void backward_run(const T* __restrict__ g, const T* __restrict__ u, const T* __restrict__ dout,
                                    T* __restrict__ dg, T* __restrict__ du, int64_t n) {
  using F = typename Compute<T>::type;
  for (int64_t i = 0; i < n; ++i) {
    F a, b;
    detail::swiglu_backward<F>(load(g[i]), load(u[i]), load(dout[i]), a, b);
    dg[i] = store<T>(a);
    du[i] = store<T>(b);
  }
}

template <class T, class Fn>
void cpu_split(int64_t n, Fn fn) {
  detail::parallel_for((n + kGrain - 1) / kGrain, 1, [&](int64_t lo, int64_t hi) {
    const int64_t b = lo * kGrain, e = std::min(n, hi * kGrain);
    if (b < e) fn(b, e - b);
  });
}

template <class T>
void cpu_forward(const TensorView& g, const TensorView& u, const TensorView& out) {
  const T* gp = g.ptr<const T>();
  const T* up = u.ptr<const T>();
  T* op = out.ptr<T>();
  cpu_split<T>(g.numel(), [&](int64_t b, int64_t n) { forward_run<T>(gp + b, up + b, op + b, n); });
}

template <class T>
void cpu_backward(const TensorView& g, const TensorView& u, const TensorView& dout, const TensorView& dg,
                  const TensorView& du) {
  const T* gp = g.ptr<const T>();
  const T* up = u.ptr<const T>();
  const T* dp = dout.ptr<const T>();
  T* dgp = dg.ptr<T>();
  T* dup = du.ptr<T>();
  cpu_split<T>(g.numel(), [&](int64_t b, int64_t n) { backward_run<T>(gp + b, up + b, dp + b, dgp + b, dup + b, n); });
}

void check_like(const TensorView& t, const char* name, const TensorView& ref) {
  LORART_CHECK_TYPE(t.dtype == ref.dtype, "argument `", name, "`: expected dtype ", dtype_name(ref.dtype),
                    " (as `gate`), got ", dtype_name(t.dtype));
  LORART_CHECK(t.numel() == ref.numel(), "argument `", name, "`: expected ", ref.numel(),
               " elements (as `gate`), got ", t.numel(), " (shape ", t.shape_str(), ")");
  detail::check_contiguous(t, name);
  detail::check_same_device(ref, "gate", t, name);
  if (t.numel() > 0) detail::check_not_null(t, name);
}

void check_all(std::initializer_list<std::pair<const TensorView*, const char*>> ts) {
  const TensorView& g = *ts.begin()->first;
  detail::check_dtype(g, "gate", {DType::F32, DType::BF16, DType::F16, DType::F64});
  detail::check_contiguous(g, "gate");
  if (g.numel() > 0) detail::check_not_null(g, "gate");
  detail::check_device_supported(g, "gate");
  LORART_CHECK_TYPE(!(g.is_cuda() && g.dtype == DType::F64), "argument `gate`: float64 runs on the CPU only");
  bool first = true;
  for (const auto& [t, name] : ts) {
    if (!first) check_like(*t, name, g);
    first = false;
  }
}

}  // namespace

void swiglu(const TensorView& gate, const TensorView& up, const TensorView& out, Stream stream) {
  check_all({{&gate, "gate"}, {&up, "up"}, {&out, "out"}});
  if (gate.numel() == 0) return;
  if (gate.is_cuda()) {
#ifdef LORART_WITH_CUDA
    cuda::set_device(gate.device.index);
    cuda::swiglu(gate.dtype, gate.data, up.data, out.data, gate.numel(), stream);
#endif
  } else {
    detail::dispatch_float(gate.dtype, [&](auto t) { cpu_forward<decltype(t)>(gate, up, out); });
  }
}

void swiglu_backward(const TensorView& gate, const TensorView& up, const TensorView& grad_out,
                     const TensorView& grad_gate, const TensorView& grad_up, Stream stream) {
  check_all({{&gate, "gate"}, {&up, "up"}, {&grad_out, "grad_out"}, {&grad_gate, "grad_gate"},
             {&grad_up, "grad_up"}});
  LORART_CHECK(grad_gate.data != grad_up.data || grad_gate.numel() == 0,
               "argument `grad_up`: expected a buffer distinct from `grad_gate`");
  if (gate.numel() == 0) return;
  if (gate.is_cuda()) {
#ifdef LORART_WITH_CUDA
    cuda::set_device(gate.device.index);
    cuda::swiglu_backward(gate.dtype, gate.data, up.data, grad_out.data, grad_gate.data, grad_up.data, gate.numel(),
                          stream);
#endif
  } else {
    detail::dispatch_float(gate.dtype,
                           [&](auto t) { cpu_backward<decltype(t)>(gate, up, grad_out, grad_gate, grad_up); });
  }
}

}  // namespace lorart
