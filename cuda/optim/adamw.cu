// Fused multi-tensor AdamW: one launch updates many tensors, driven by a device
// array of chunk descriptors. Memory-bound: each element reads p, g, m, v and
// writes p, m, v once. The fast path uses 16-byte (fp32) / 8-byte (16-bit param)
// vector accesses when every pointer of the chunk is aligned, else a scalar loop.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "common/check.h"
#include "common/cuda_utils.cuh"
#include "optim/optim_launch.h"

namespace lorart::cuda {
namespace {

constexpr int kThreads = 256;
// Elements per descriptor (a multiple of 4: keeps alignment). Small enough that 10M parameters
// give ~600 blocks (several per SM to hide memory latency), large enough that the descriptor
// array stays < 0.05% of the traffic.
constexpr int64_t kChunk = 1 << 14;

struct Chunk {
  void* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  int64_t numel;
  detail::AdamWScalars s;
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
__global__ void adamw_kernel(const Chunk* __restrict__ chunks, int64_t nchunks) {
  for (int64_t c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const Chunk ch = chunks[c];
    T* p = static_cast<T*>(ch.param);
    const T* g = static_cast<const T*>(ch.grad);
    float* m = ch.exp_avg;
    float* v = ch.exp_avg_sq;
    const int64_t n = ch.numel;
    const uintptr_t pa = reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(g);
    const uintptr_t sa = reinterpret_cast<uintptr_t>(m) | reinterpret_cast<uintptr_t>(v);
    const bool vec = (pa % (4 * sizeof(T)) == 0) && (sa % 16 == 0);
    int64_t done = 0;
    if (vec) {
      const int64_t nv = n / 4;
      for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
        Vec4<T> pv = reinterpret_cast<const Vec4<T>*>(p)[i];
        const Vec4<T> gv = reinterpret_cast<const Vec4<T>*>(g)[i];
        float4 mv = reinterpret_cast<const float4*>(m)[i];
        float4 vv = reinterpret_cast<const float4*>(v)[i];
        float pf[4], mf[4] = {mv.x, mv.y, mv.z, mv.w}, vf[4] = {vv.x, vv.y, vv.z, vv.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          pf[k] = ld<T>(pv.x, k);
          detail::adamw_update(pf[k], ld<T>(gv.x, k), mf[k], vf[k], ch.s);
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
      detail::adamw_update(pf, ld<T>(g, i), mf, vf, ch.s);
      p[i] = cvt<T>(pf);
      m[i] = mf;
      v[i] = vf;
    }
  }
}

}  // namespace

void adamw_step(const std::vector<AdamWTensor>& tensors, DType dtype, Stream stream) {
  const size_t esize = dtype_size(dtype);
  std::vector<Chunk> chunks;
  for (const AdamWTensor& t : tensors) {
    for (int64_t off = 0; off < t.numel; off += kChunk) {
      Chunk c;
      c.param = static_cast<char*>(t.param) + off * esize;
      c.grad = static_cast<const char*>(t.grad) + off * esize;
      c.exp_avg = t.exp_avg + off;
      c.exp_avg_sq = t.exp_avg_sq + off;
      c.numel = std::min(kChunk, t.numel - off);
      c.s = t.s;
      chunks.push_back(c);
    }
  }
  if (chunks.empty()) return;
  cudaStream_t s = as_stream(stream);
  const size_t bytes = chunks.size() * sizeof(Chunk);
  void* d = nullptr;
  LORART_CUDA_CHECK(cudaMallocAsync(&d, bytes, s));
  // Pageable source: the runtime stages it before returning, so `chunks` may die after.
  cudaError_t err = cudaMemcpyAsync(d, chunks.data(), bytes, cudaMemcpyHostToDevice, s);
  if (err != cudaSuccess) {
    cudaFreeAsync(d, s);
    check(static_cast<int>(err), "cudaMemcpyAsync(adamw descriptors)");
  }
  const int64_t n = static_cast<int64_t>(chunks.size());
  const int grid = static_cast<int>(std::min<int64_t>(n, static_cast<int64_t>(sm_count()) * 16));
  const Chunk* dc = static_cast<const Chunk*>(d);
  switch (dtype) {
    case DType::F32: adamw_kernel<float><<<grid, kThreads, 0, s>>>(dc, n); break;
    case DType::BF16: adamw_kernel<__nv_bfloat16><<<grid, kThreads, 0, s>>>(dc, n); break;
    case DType::F16: adamw_kernel<__half><<<grid, kThreads, 0, s>>>(dc, n); break;
    default: cudaFreeAsync(d, s); LORART_CHECK(false, "adamw_step: unsupported param dtype ", dtype_name(dtype));
  }
  err = cudaGetLastError();
  cudaFreeAsync(d, s);  // stream-ordered: freed after the kernel has run
  check(static_cast<int>(err), "adamw_kernel");
}

}  // namespace lorart::cuda
