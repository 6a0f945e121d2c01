// RMSNorm kernels. A row lives in one block's registers (thread t holds columns t, t + blockDim, ...,
// at most kRmsPerThread of them), so x is read once per pass. Forward: one row per block iteration,
// block reduction of sum(x^2). Backward: a grid of about two blocks per SM walks the rows; each thread
// accumulates the weight gradient of its columns in registers and adds it to grad_w (fp32, zeroed on
// the stream first) with one atomicAdd per column per block. Math: lorart/detail/norm_math.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "common/check.h"
#include "common/cuda_utils.cuh"
#include "common/dispatch.cuh"
#include "common/vec.cuh"
#include "lorart/detail/norm_math.h"
#include "norm/norm_launch.h"

namespace lorart::cuda {
namespace {

constexpr int kPer = detail::kRmsPerThread;

// Sum over the block; `sh` holds 33 floats. Every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* sh) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  __syncthreads();  // the previous call's readers of sh[32] are done
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  if (wid == 0) {
    float t = lane < int(blockDim.x >> 5) ? sh[lane] : 0.0f;
    t = warp_sum(t);
    if (lane == 0) sh[32] = t;
  }
  __syncthreads();
  return sh[32];
}

template <class T> __device__ __forceinline__ float round_to(float v) { return to_f(from_f<T>(v)); }

template <class T>
__global__ void __launch_bounds__(1024) rms_forward_kernel(const T* __restrict__ x, const T* __restrict__ w, float eps,
                                                           T* __restrict__ out, float* __restrict__ rstd, int64_t rows,
                                                           int64_t h) {
  __shared__ float sh[33];
  float wr[kPer];
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int64_t j = threadIdx.x + int64_t(k) * blockDim.x;
    wr[k] = j < h ? to_f(w[j]) : 0.0f;
  }
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * h;
    float v[kPer], ss = 0.0f;
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int64_t j = threadIdx.x + int64_t(k) * blockDim.x;
      v[k] = j < h ? to_f(xr[j]) : 0.0f;
      ss += v[k] * v[k];
    }
    const float r = detail::rms_rstd<float>(block_sum(ss, sh), h, eps);
    if (threadIdx.x == 0) rstd[row] = r;
    T* orow = out + row * h;
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int64_t j = threadIdx.x + int64_t(k) * blockDim.x;
      if (j < h) orow[j] = from_f<T>(wr[k] * round_to<T>(v[k] * r));
    }
  }
}

template <class T>
__global__ void __launch_bounds__(1024) rms_backward_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                                            const float* __restrict__ rstd, const T* __restrict__ dy,
                                                            T* __restrict__ dx, float* __restrict__ grad_w,
                                                            int64_t rows, int64_t h) {
  __shared__ float sh[33];
  float wr[kPer], acc[kPer];
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int64_t j = threadIdx.x + int64_t(k) * blockDim.x;
    wr[k] = j < h ? to_f(w[j]) : 0.0f;
    acc[k] = 0.0f;
  }
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * h;
    const T* gr = dy + row * h;
    const float r = rstd[row];
    float n[kPer], g[kPer], d[kPer], part = 0.0f;
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int64_t j = threadIdx.x + int64_t(k) * blockDim.x;
      const bool in = j < h;
      n[k] = in ? to_f(xr[j]) * r : 0.0f;
      d[k] = in ? to_f(gr[j]) : 0.0f;
      g[k] = round_to<T>(d[k] * wr[k]);
      part += g[k] * n[k];
    }
    const float c = block_sum(part, sh) / float(h);
    T* dxr = dx + row * h;
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int64_t j = threadIdx.x + int64_t(k) * blockDim.x;
      if (j < h) dxr[j] = from_f<T>(detail::rms_dx<float>(g[k], n[k], r, c));
      acc[k] += d[k] * round_to<T>(n[k]);
    }
  }
  if (grad_w == nullptr) return;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int64_t j = threadIdx.x + int64_t(k) * blockDim.x;
    if (j < h) atomicAdd(grad_w + j, acc[k]);
  }
}

template <class T>
void forward(const void* x, const void* w, float eps, void* out, float* rstd, int64_t rows, int64_t h, cudaStream_t s) {
  const int grid = static_cast<int>(std::min<int64_t>(rows, int64_t(sm_count()) * 16));
  rms_forward_kernel<T><<<grid, detail::rms_threads(h), 0, s>>>(static_cast<const T*>(x), static_cast<const T*>(w), eps,
                                                                 static_cast<T*>(out), rstd, rows, h);
  check_launch("rms_forward_kernel");
}

template <class T>
void backward(const void* x, const void* w, const float* rstd, const void* dy, void* dx, float* gw, int64_t rows,
              int64_t h, cudaStream_t s) {
  if (gw != nullptr) LORART_CUDA_CHECK(cudaMemsetAsync(gw, 0, sizeof(float) * h, s));
  if (rows == 0) return;
  const int grid = static_cast<int>(std::min<int64_t>(rows, int64_t(sm_count()) * 2));
  rms_backward_kernel<T><<<grid, detail::rms_threads(h), 0, s>>>(
      static_cast<const T*>(x), static_cast<const T*>(w), rstd, static_cast<const T*>(dy), static_cast<T*>(dx), gw,
      rows, h);
  check_launch("rms_backward_kernel");
}

}  // namespace

void rms_norm(DType dtype, const void* x, const void* w, float eps, void* out, float* rstd, int64_t rows, int64_t h,
              Stream stream) {
  if (rows == 0) return;
  cudaStream_t s = as_stream(stream);
  dispatch_float(dtype, "rms_norm", [&](auto t) {
    forward<typename decltype(t)::type>(x, w, eps, out, rstd, rows, h, s);
  });
}

void rms_norm_backward(DType dtype, const void* x, const void* w, const float* rstd, const void* dy, void* dx,
                       float* grad_w, int64_t rows, int64_t h, Stream stream) {
  cudaStream_t s = as_stream(stream);
  dispatch_float(dtype, "rms_norm_backward", [&](auto t) {
    backward<typename decltype(t)::type>(x, w, rstd, dy, dx, grad_w, rows, h, s);
  });
}

}  // namespace lorart::cuda
