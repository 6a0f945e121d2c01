// LoRA CUDA kernels, then their launchers (declared in lora_launch.h).
//
// - dropout / shrink: the dropout mask is the counter-based hash of detail/lora_math.h, identical to the CPU.
// - fused_linear: the decode-time (M <= 16) linear: one warp per output feature reads its row of the dense W
//   once (16-byte vector loads when aligned, scalar loads otherwise), multiplies it with every row of x, adds
//   scale * xa[m] . B[n] (xa from the shrink kernel) and the bias, and rounds once. (An NF4 W goes through
//   cuda/nf4's GEMV, which takes the same LoRA term: one NF4 decode for every layer.)
// - grouped shrink/expand: Punica-style BGMV, each row with its own adapter (index -1 = none).
// - merge: W += scale * B @ A, one thread per element, optionally only counting non-finite results.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/check.h"
#include "common/cuda_utils.cuh"
#include "common/dispatch.cuh"
#include "common/vec.cuh"
#include "lora/lora_launch.h"
#include "lorart/detail/lora_math.h"

namespace lorart::cuda {
namespace {

using detail::lora_dropout_keep;

// Sum over the block (blockDim.x a multiple of 32, <= 1024); the result is valid in thread 0.
__device__ float block_sum(float v) {
  __shared__ float part[32];
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.f;
  if (warp == 0) v = warp_sum(v);
  return v;
}

// ---- kernels -----------------------------------------------------------------------------------------------

template <class T>
__global__ void dropout_kernel(const T* x, int64_t ldx, T* out, int64_t ldo, int64_t M, int64_t K,
                               detail::LoraDropoutKey key, float keep_scale) {
  const int64_t n = M * K;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / K, k = i - m * K;
    const bool keep = lora_dropout_keep(key, static_cast<uint64_t>(i));
    out[m * ldo + k] = from_f<T>(keep ? to_f(x[m * ldx + k]) * keep_scale : 0.f);
  }
}

// xa[m, j] = keep_scale * sum_k keep(m, k) x[m, k] A[j, k]; grid (M, R).
template <class T>
__global__ void shrink_kernel(const T* x, int64_t ldx, const T* A, int64_t K, int64_t R, bool drop,
                              detail::LoraDropoutKey key, float keep_scale, float* xa) {
  const int64_t m = blockIdx.x, j = blockIdx.y;
  const T* xr = x + m * ldx;
  const T* ar = A + j * K;
  float acc = 0.f;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
    if (!drop || lora_dropout_keep(key, static_cast<uint64_t>(m * K + k))) acc += to_f(xr[k]) * to_f(ar[k]);
  acc = block_sum(acc);
  if (threadIdx.x == 0) xa[m * R + j] = acc * keep_scale;
}

// Dense weight row access for the fused kernel.
template <class T>
struct DenseRow {
  const T* W;
  int64_t K;
  __device__ __forceinline__ void load8(int64_t n, int64_t k, float* o) const { cuda::load8(W + n * K + k, o); }
  __device__ __forceinline__ float at(int64_t n, int64_t k) const { return to_f(W[n * K + k]); }
};

constexpr int kFusedWarps = 8;

// One warp per output feature n; MAXM >= M rows of x held as MAXM accumulators per lane.
template <class T, int MAXM, bool VEC, class Row>
__device__ void fused_body(const T* x, int64_t ldx, const Row& row, const T* bias, const float* xa, const T* B,
                           int64_t R, float scale, T* y, int64_t ldy, int M, int64_t N, int64_t K) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * kFusedWarps;
  for (int64_t n = blockIdx.x * int64_t(kFusedWarps) + (threadIdx.x >> 5); n < N; n += warps) {
    float acc[MAXM];
#pragma unroll
    for (int m = 0; m < MAXM; ++m) acc[m] = 0.f;
    if (VEC) {
#pragma unroll 2
      for (int64_t k = int64_t(lane) * 8; k < K; k += 32 * 8) {
        float w[8], xv[8];
        row.load8(n, k, w);
#pragma unroll
        for (int m = 0; m < MAXM; ++m) {
          if (m < M) {
            load8(x + m * ldx + k, xv);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[m] = fmaf(xv[e], w[e], acc[m]);
          }
        }
      }
    } else {
      for (int64_t k = lane; k < K; k += 32) {
        const float w = row.at(n, k);
#pragma unroll
        for (int m = 0; m < MAXM; ++m)
          if (m < M) acc[m] = fmaf(to_f(x[m * ldx + k]), w, acc[m]);
      }
    }
    for (int64_t j = lane; j < R; j += 32) {
      const float b = scale * to_f(B[n * R + j]);
#pragma unroll
      for (int m = 0; m < MAXM; ++m)
        if (m < M) acc[m] = fmaf(xa[m * R + j], b, acc[m]);
    }
    const float bn = bias ? to_f(bias[n]) : 0.f;
#pragma unroll
    for (int m = 0; m < MAXM; ++m) {
      if (m < M) {
        const float v = warp_sum(acc[m]);
        if (lane == 0) y[m * ldy + n] = from_f<T>(v + bn);
      }
    }
  }
}

template <class T, int MAXM, bool VEC>
__global__ void __launch_bounds__(kFusedWarps * 32)
    fused_dense_kernel(const T* x, int64_t ldx, const T* W, const T* bias, const float* xa, const T* B, int64_t R,
                       float scale, T* y, int64_t ldy, int M, int64_t N, int64_t K) {
  fused_body<T, MAXM, VEC>(x, ldx, DenseRow<T>{W, K}, bias, xa, B, R, scale, y, ldy, M, N, K);
}

// Grouped shrink: xa[m, j] = A_stack[idx[m], j] . x[m] for j < ranks[idx[m]], else 0; grid (M, RM).
template <class T>
__global__ void grouped_shrink_kernel(const T* x, int64_t ldx, const T* A_stack, const int32_t* ranks,
                                      const void* idx, bool idx64, int64_t istride, int64_t L, float* xa, int64_t K,
                                      int64_t RM) {
  const int64_t m = blockIdx.x, j = blockIdx.y;
  const int64_t a = idx64 ? static_cast<const int64_t*>(idx)[m * istride]
                          : static_cast<const int32_t*>(idx)[m * istride];
  if (a < 0 || a >= L || j >= ranks[a]) {
    if (threadIdx.x == 0) xa[m * RM + j] = 0.f;
    return;
  }
  const T* xr = x + m * ldx;
  const T* ar = A_stack + (a * RM + j) * K;
  float acc = 0.f;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) acc += to_f(xr[k]) * to_f(ar[k]);
  acc = block_sum(acc);
  if (threadIdx.x == 0) xa[m * RM + j] = acc;
}

// Grouped expand: y[m, n] += scales[a] * sum_j xa[m, j] B_stack[a, n, j]; grid (ceil(N / 256), min(M, 65535)).
template <class T>
__global__ void grouped_expand_kernel(T* y, int64_t ldy, const T* B_stack, const int32_t* ranks,
                                      const float* scales, const void* idx, bool idx64, int64_t istride, int64_t L,
                                      const float* xa, int64_t M, int64_t N, int64_t RM) {
  extern __shared__ float xs[];
  const int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    const int64_t a = idx64 ? static_cast<const int64_t*>(idx)[m * istride]
                            : static_cast<const int32_t*>(idx)[m * istride];
    if (a < 0 || a >= L) continue;  // uniform over the block
    const int64_t r = ranks[a] < RM ? ranks[a] : RM;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < r; j += blockDim.x) xs[j] = xa[m * RM + j];
    __syncthreads();
    if (n < N) {
      const T* br = B_stack + (a * N + n) * RM;
      float acc = 0.f;
      for (int64_t j = 0; j < r; ++j) acc = fmaf(xs[j], to_f(br[j]), acc);
      y[m * ldy + n] = from_f<T>(to_f(y[m * ldy + n]) + scales[a] * acc);
    }
  }
}

// W[n, k] (+)= scale * sum_j B[n, j] A[j, k]; grid (N, ceil(K / 256)). With count != nullptr only counts the
// non-finite results.
template <class T>
__global__ void merge_kernel(T* W, const T* A, const T* B, int64_t K, int64_t R, float scale, int32_t* count) {
  const int64_t n = blockIdx.x, k = blockIdx.y * int64_t(blockDim.x) + threadIdx.x;
  if (k >= K) return;
  float d = 0.f;
  for (int64_t j = 0; j < R; ++j) d = fmaf(to_f(B[n * R + j]), to_f(A[j * K + k]), d);
  const T v = from_f<T>(to_f(W[n * K + k]) + scale * d);
  if (count) {
    if (!isfinite(to_f(v))) atomicAdd(count, 1);
  } else {
    W[n * K + k] = v;
  }
}

// ---- launchers ---------------------------------------------------------------------------------------------

int grid_for(int64_t n, int threads) {
  const int64_t cap = int64_t(sm_count()) * 32;
  const int64_t g = ceil_div(n, threads);
  return static_cast<int>(g < cap ? (g > 0 ? g : 1) : cap);
}

template <class F>
void dispatch_m(int64_t M, F&& f) {
  if (M <= 1) f(std::integral_constant<int, 1>{});
  else if (M <= 2) f(std::integral_constant<int, 2>{});
  else if (M <= 4) f(std::integral_constant<int, 4>{});
  else if (M <= 8) f(std::integral_constant<int, 8>{});
  else f(std::integral_constant<int, 16>{});
}

}  // namespace

void lora_dropout(DType dt, const void* x, int64_t ldx, void* out, int64_t ldo, int64_t M, int64_t K, double p,
                  uint64_t seed, Stream s) {
  dispatch_float(dt, "lora", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dropout_kernel<T><<<grid_for(M * K, 256), 256, 0, as_stream(s)>>>(
        static_cast<const T*>(x), ldx, static_cast<T*>(out), ldo, M, K, detail::lora_dropout_key(seed, p),
        static_cast<float>(1.0 / (1.0 - p)));
    check_launch("lora dropout_kernel");
  });
}

void lora_shrink(DType dt, const void* x, int64_t ldx, const void* A, int64_t M, int64_t K, int64_t R, double p,
                 uint64_t seed, float* xa, Stream s) {
  LORART_CHECK(R <= 65535, "argument `A`: rank at most 65535 on CUDA, got ", R);
  dispatch_float(dt, "lora", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>(R));
    shrink_kernel<T><<<grid, 256, 0, as_stream(s)>>>(static_cast<const T*>(x), ldx, static_cast<const T*>(A), K, R,
                                                     p > 0, detail::lora_dropout_key(seed, p),
                                                     static_cast<float>(p > 0 ? 1.0 / (1.0 - p) : 1.0), xa);
    check_launch("lora shrink_kernel");
  });
}

void lora_fused_linear(DType dt, const void* x, int64_t ldx, const void* W, const void* bias, const float* xa,
                       const void* B, int64_t R, float scale, void* y, int64_t ldy, int64_t M, int64_t N, int64_t K,
                       Stream s) {
  const bool vec = K % 8 == 0 && ldx % 8 == 0 && aligned16(x) && aligned16(W);
  const int grid = static_cast<int>(std::min<int64_t>(ceil_div(N, kFusedWarps), int64_t(sm_count()) * 64));
  dispatch_float(dt, "lora", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_m(M, [&](auto mm) {
      constexpr int MM = decltype(mm)::value;
      auto args = [&](auto kern) {
        kern<<<grid, kFusedWarps * 32, 0, as_stream(s)>>>(
            static_cast<const T*>(x), ldx, static_cast<const T*>(W), static_cast<const T*>(bias), xa,
            static_cast<const T*>(B), R, scale, static_cast<T*>(y), ldy, static_cast<int>(M), N, K);
      };
      if (vec) args(fused_dense_kernel<T, MM, true>); else args(fused_dense_kernel<T, MM, false>);
      check_launch("lora fused_dense_kernel");
    });
  });
}

void lora_grouped_add(DType dt, void* y, int64_t ldy, const void* x, int64_t ldx, const void* A_stack,
                      const void* B_stack, const int32_t* ranks, const float* scales, const void* idx, bool idx64,
                      int64_t idx_stride, float* xa, int64_t M, int64_t N, int64_t K, int64_t RM, int64_t L,
                      Stream s) {
  LORART_CHECK(RM <= 12288, "argument `A_stack`: max rank at most 12288 on CUDA, got ", RM);
  if (RM == 0) return;
  dispatch_float(dt, "lora", [&](auto tag) {
    using T = typename decltype(tag)::type;
    grouped_shrink_kernel<T><<<dim3(static_cast<unsigned>(M), static_cast<unsigned>(RM)), 256, 0, as_stream(s)>>>(
        static_cast<const T*>(x), ldx, static_cast<const T*>(A_stack), ranks, idx, idx64, idx_stride, L, xa, K, RM);
    check_launch("lora grouped_shrink_kernel");
    const dim3 grid(static_cast<unsigned>(ceil_div(N, 256)), static_cast<unsigned>(std::min<int64_t>(M, 65535)));
    grouped_expand_kernel<T><<<grid, 256, RM * sizeof(float), as_stream(s)>>>(
        static_cast<T*>(y), ldy, static_cast<const T*>(B_stack), ranks, scales, idx, idx64, idx_stride, L, xa, M, N,
        RM);
    check_launch("lora grouped_expand_kernel");
  });
}

void lora_merge(DType dt, void* W, const void* A, const void* B, int64_t N, int64_t K, int64_t R, float scale,
                int32_t* count, Stream s) {
  if (count) LORART_CUDA_CHECK(cudaMemsetAsync(count, 0, sizeof(int32_t), as_stream(s)));
  if (N == 0 || K == 0) return;
  LORART_CHECK(ceil_div(K, 256) <= 65535, "argument `W`: at most 16776960 columns on CUDA, got ", K);
  dispatch_float(dt, "lora", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(ceil_div(K, 256)));
    merge_kernel<T><<<grid, 256, 0, as_stream(s)>>>(static_cast<T*>(W), static_cast<const T*>(A),
                                                    static_cast<const T*>(B), K, R, scale, count);
    check_launch("lora merge_kernel");
  });
}

}  // namespace lorart::cuda
