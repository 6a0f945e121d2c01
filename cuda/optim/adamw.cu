// Fused multi-tensor AdamW: one launch updates many tensors (up to 384 chunks of
// 16K-1M elements), driven by an array of chunk descriptors passed as one
// __grid_constant__ kernel parameter. Memory-bound: each element reads p, g, m, v and
// writes p, m, v once. The fast path uses 16-byte (fp32) / 8-byte (16-bit param)
// vector accesses when every pointer of the chunk is aligned, else a scalar loop.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "common/check.h"
#include "common/cuda_utils.cuh"
#include "common/dispatch.cuh"
#include "optim/optim_launch.h"

namespace lorart::cuda {
namespace {

constexpr int kThreads = 256;
// Descriptors travel as one __grid_constant__ kernel parameter (no allocation, no copy, no
// synchronisation): 384 x 72 B = 27 KB, under the 32 KB parameter limit of CUDA >= 12.1 on sm_70+.
constexpr int kMaxChunksPerLaunch = 384;

struct Chunk {
  void* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  int64_t numel;
  detail::AdamWScalars s;
};

struct ChunkBatch {
  Chunk c[kMaxChunksPerLaunch];
};

template <class T> __device__ __forceinline__ float ld(const T* p, int64_t i);
template <> __device__ __forceinline__ float ld<float>(const float* p, int64_t i) { return p[i]; }
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
template <> __device__ __forceinline__ float ld<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }
template <class T> __device__ __forceinline__ T cvt(float x);
template <> __device__ __forceinline__ float cvt<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 cvt<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half cvt<__half>(float x) { return __float2half_rn(x); }

// 4 params of type T as one aligned vector access (16 bytes for float, 8 for 16-bit).
template <class T> struct alignas(4 * sizeof(T)) Vec4 { T x[4]; };

template <class T>
__global__ void __launch_bounds__(kThreads) adamw_kernel(const __grid_constant__ ChunkBatch batch, int nchunks) {
  for (int c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const Chunk& ch = batch.c[c];
    T* p = static_cast<T*>(ch.param);
    const T* g = static_cast<const T*>(ch.grad);
    float* m = ch.exp_avg;
    float* v = ch.exp_avg_sq;
    const int64_t n = ch.numel;
    const detail::AdamWScalars sc = ch.s;
    const uintptr_t pa = reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(g);
    const uintptr_t sa = reinterpret_cast<uintptr_t>(m) | reinterpret_cast<uintptr_t>(v);
    const bool vec = (pa % (4 * sizeof(T)) == 0) && (sa % 16 == 0);
    int64_t done = 0;
    if (vec) {
      const int64_t nv = n / 4;
      for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
        Vec4<T> pv = reinterpret_cast<const Vec4<T>*>(p)[i];
        const Vec4<T> gv = reinterpret_cast<const Vec4<T>*>(g)[i];
        const float4 mv = reinterpret_cast<const float4*>(m)[i];
        const float4 vv = reinterpret_cast<const float4*>(v)[i];
        float pf[4], mf[4] = {mv.x, mv.y, mv.z, mv.w}, vf[4] = {vv.x, vv.y, vv.z, vv.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          pf[k] = ld<T>(pv.x, k);
          detail::adamw_update(pf[k], ld<T>(gv.x, k), mf[k], vf[k], sc);
          pv.x[k] = cvt<T>(pf[k]);
        }
        reinterpret_cast<Vec4<T>*>(p)[i] = pv;
        reinterpret_cast<float4*>(m)[i] = make_float4(mf[0], mf[1], mf[2], mf[3]);
        reinterpret_cast<float4*>(v)[i] = make_float4(vf[0], vf[1], vf[2], vf[3]);
      }
      done = nv * 4;
    }
    for (int64_t i = done + threadIdx.x; i < n; i += blockDim.x) {
      float pf = ld<T>(p, i), mf = m[i], vf = v[i];
      detail::adamw_update(pf, ld<T>(g, i), mf, vf, sc);
      p[i] = cvt<T>(pf);
      m[i] = mf;
      v[i] = vf;
    }
  }
}

template <class T>
void launch(const ChunkBatch& batch, int n, cudaStream_t s) {
  const int grid = std::min(n, sm_count() * 8);
  adamw_kernel<T><<<grid, kThreads, 0, s>>>(batch, n);
  check_launch("adamw_kernel");
}

}  // namespace

void adamw_step(const std::vector<AdamWTensor>& tensors, DType dtype, Stream stream) {
  LORART_CHECK(dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::F16,
               "adamw_step: unsupported param dtype ", dtype_name(dtype));
  const size_t esize = dtype_size(dtype);
  int64_t total = 0;
  for (const AdamWTensor& t : tensors) total += t.numel;
  const int64_t chunk = optim_chunk_elems(total, sm_count());
  cudaStream_t s = as_stream(stream);
  ChunkBatch batch;
  int n = 0;
  for (const AdamWTensor& t : tensors) {
    for (int64_t off = 0; off < t.numel; off += chunk) {
      Chunk& c = batch.c[n++];
      c.param = static_cast<char*>(t.param) + off * esize;
      c.grad = static_cast<const char*>(t.grad) + off * esize;
      c.exp_avg = t.exp_avg + off;
      c.exp_avg_sq = t.exp_avg_sq + off;
      c.numel = std::min(chunk, t.numel - off);
      c.s = t.s;
      if (n == kMaxChunksPerLaunch) {
        dispatch_float(dtype, "adamw_step", [&](auto t) { launch<typename decltype(t)::type>(batch, n, s); });
        n = 0;
      }
    }
  }
  if (n > 0) dispatch_float(dtype, "adamw_step", [&](auto t) { launch<typename decltype(t)::type>(batch, n, s); });
}

}  // namespace lorart::cuda
