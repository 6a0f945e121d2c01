// SwiGLU kernels: elementwise, memory-bound (forward reads gate and up and writes out; backward reads
// gate, up and grad_out and writes grad_gate and grad_up). 8 elements per thread with 16-byte vector
// accesses when every pointer is 16-byte aligned and n is a multiple of 8 (the common case), else a
// scalar grid-stride loop. The math is lorart/detail/act_math.h, the formula the CPU tests exercise.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "act/act_launch.h"
#include "common/check.h"
#include "common/cuda_utils.cuh"
#include "common/dispatch.cuh"
#include "common/vec.cuh"
#include "lorart/detail/act_math.h"

namespace lorart::cuda {
namespace {

constexpr int kThreads = 256;

template <class T>
__global__ void __launch_bounds__(kThreads) swiglu_vec_kernel(const T* __restrict__ g, const T* __restrict__ u,
                                                              T* __restrict__ out, int64_t n8) {
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n8; i += int64_t(gridDim.x) * kThreads) {
    float gv[8], uv[8], ov[8];
    load8(g + 8 * i, gv);
    load8(u + 8 * i, uv);
#pragma unroll
    for (int k = 0; k < 8; ++k) ov[k] = detail::swiglu_forward<float>(gv[k], uv[k]);
    store8(out + 8 * i, ov);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) swiglu_kernel(const T* __restrict__ g, const T* __restrict__ u,
                                                          T* __restrict__ out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads)
    out[i] = from_f<T>(detail::swiglu_forward<float>(to_f(g[i]), to_f(u[i])));
}

template <class T>
__global__ void __launch_bounds__(kThreads) swiglu_bwd_vec_kernel(const T* __restrict__ g, const T* __restrict__ u,
                                                                  const T* __restrict__ dout, T* __restrict__ dg,
                                                                  T* __restrict__ du, int64_t n8) {
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n8; i += int64_t(gridDim.x) * kThreads) {
    float gv[8], uv[8], dv[8], a[8], b[8];
    load8(g + 8 * i, gv);
    load8(u + 8 * i, uv);
    load8(dout + 8 * i, dv);
#pragma unroll
    for (int k = 0; k < 8; ++k) detail::swiglu_backward<float>(gv[k], uv[k], dv[k], a[k], b[k]);
    store8(dg + 8 * i, a);
    store8(du + 8 * i, b);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) swiglu_bwd_kernel(const T* __restrict__ g, const T* __restrict__ u,
                                                              const T* __restrict__ dout, T* __restrict__ dg,
                                                              T* __restrict__ du, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    float a, b;
    detail::swiglu_backward<float>(to_f(g[i]), to_f(u[i]), to_f(dout[i]), a, b);
    dg[i] = from_f<T>(a);
    du[i] = from_f<T>(b);
  }
}

int grid_for(int64_t work) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, kThreads), sm_count() * 16)));
}

bool vec_ok(int64_t n, std::initializer_list<const void*> ps) {
  if (n % 8) return false;
  for (const void* p : ps)
    if (!aligned16(p)) return false;
  return true;
}

template <class T>
void forward(const void* g, const void* u, void* out, int64_t n, cudaStream_t s) {
  const T* gp = static_cast<const T*>(g);
  const T* up = static_cast<const T*>(u);
  T* op = static_cast<T*>(out);
  if (vec_ok(n, {g, u, out}))
    swiglu_vec_kernel<T><<<grid_for(n / 8), kThreads, 0, s>>>(gp, up, op, n / 8);
  else
    swiglu_kernel<T><<<grid_for(n), kThreads, 0, s>>>(gp, up, op, n);
  check_launch("swiglu_kernel");
}

template <class T>
void backward(const void* g, const void* u, const void* dout, void* dg, void* du, int64_t n, cudaStream_t s) {
  const T* gp = static_cast<const T*>(g);
  const T* up = static_cast<const T*>(u);
  const T* dp = static_cast<const T*>(dout);
  T* dgp = static_cast<T*>(dg);
  T* dup = static_cast<T*>(du);
  if (vec_ok(n, {g, u, dout, dg, du}))
    swiglu_bwd_vec_kernel<T><<<grid_for(n / 8), kThreads, 0, s>>>(gp, up, dp, dgp, dup, n / 8);
  else
    swiglu_bwd_kernel<T><<<grid_for(n), kThreads, 0, s>>>(gp, up, dp, dgp, dup, n);
  check_launch("swiglu_bwd_kernel");
}

}  // namespace

void swiglu(DType dtype, const void* gate, const void* up, void* out, int64_t n, Stream stream) {
  cudaStream_t s = as_stream(stream);
  dispatch_float(dtype, "swiglu", [&](auto t) { forward<typename decltype(t)::type>(gate, up, out, n, s); });
}

void swiglu_backward(DType dtype, const void* gate, const void* up, const void* grad_out, void* grad_gate,
                     void* grad_up, int64_t n, Stream stream) {
  cudaStream_t s = as_stream(stream);
  dispatch_float(dtype, "swiglu_backward", [&](auto t) {
    backward<typename decltype(t)::type>(gate, up, grad_out, grad_gate, grad_up, n, s);
  });
}

}  // namespace lorart::cuda
