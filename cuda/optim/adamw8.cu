// Fused multi-tensor AdamW with 8-bit blockwise states (detail/optim8_math.h). One thread
// block of 256 threads walks the 256-element state blocks of its chunks, one element per
// thread: dequantise (code tables in shared memory, computed by the block itself from the
// shared closed form), AdamW update, block-wide NaN-propagating max for the new absmax,
// requantise by a binary search over the decision points in shared memory. Up to 320
// chunk descriptors travel as one __grid_constant__ kernel parameter, as in adamw.cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "common/check.h"
#include "common/cuda_utils.cuh"
#include "common/dispatch.cuh"
#include "common/vec.cuh"
#include "lorart/detail/optim8_math.h"
#include "optim/optim_launch.h"

namespace lorart::cuda {
namespace {

constexpr int kThreads = detail::kQuantBlock;  // one thread per element of a state block
constexpr int kWarps = kThreads / 32;
// 320 x 88 B = 28 KB, under the 32 KB kernel parameter limit of CUDA >= 12.1 on sm_70+.
constexpr int kMaxChunksPerLaunch = 320;

struct Chunk8 {
  void* param;
  const void* grad;
  uint8_t* q1;  // exp_avg bytes
  uint8_t* q2;  // exp_avg_sq bytes
  float* a1;    // absmax per 256 elements
  float* a2;
  int64_t numel;
  detail::AdamWScalars s;
};

struct Chunk8Batch {
  Chunk8 c[kMaxChunksPerLaunch];
};

__device__ __forceinline__ float warp_absmax(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = detail::absmax_combine(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

template <class T>
__global__ void __launch_bounds__(kThreads) adamw8_kernel(const __grid_constant__ Chunk8Batch batch, int nchunks) {
  __shared__ float code[2][detail::kCodeSize];
  __shared__ float mid[2][detail::kCodeSize];
  __shared__ float red[2][2][kWarps];  // [parity][state][warp], double-buffered across blocks
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  code[0][t] = detail::dynamic_code(true, t);
  code[1][t] = detail::dynamic_code(false, t);
  __syncthreads();
  mid[0][t] = detail::dynamic_mid(code[0], t);
  mid[1][t] = detail::dynamic_mid(code[1], t);
  __syncthreads();
  int parity = 0;
  for (int c = blockIdx.x; c < nchunks; c += gridDim.x) {
    const Chunk8& ch = batch.c[c];
    T* p = static_cast<T*>(ch.param);
    const T* g = static_cast<const T*>(ch.grad);
    const int64_t nblk = (ch.numel + kThreads - 1) / kThreads;
    for (int64_t b = 0; b < nblk; ++b, parity ^= 1) {
      const int64_t i = b * kThreads + t;
      const bool valid = i < ch.numel;
      float m = 0.0f, v = 0.0f;
      if (valid) {
        float pf = to_f(p[i]);
        m = code[0][ch.q1[i]] * ch.a1[b];
        v = code[1][ch.q2[i]] * ch.a2[b];
        detail::adamw_update(pf, to_f(g[i]), m, v, ch.s);
        p[i] = from_f<T>(pf);
      }
      const float w1 = warp_absmax(m), w2 = warp_absmax(v);
      if (lane == 0) {
        red[parity][0][warp] = w1;
        red[parity][1][warp] = w2;
      }
      __syncthreads();  // also orders every thread's read of a1[b], a2[b] before thread 0 rewrites them
      float n1 = 0.0f, n2 = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        n1 = detail::absmax_combine(n1, red[parity][0][w]);
        n2 = detail::absmax_combine(n2, red[parity][1][w]);
      }
      if (valid) {
        ch.q1[i] = static_cast<uint8_t>(detail::dynamic_quantize(mid[0], m / n1));
        ch.q2[i] = static_cast<uint8_t>(detail::dynamic_quantize(mid[1], v / n2));
      }
      if (t == 0) {
        ch.a1[b] = n1;
        ch.a2[b] = n2;
      }
    }
  }
}

template <class T>
void launch(const Chunk8Batch& batch, int n, cudaStream_t s) {
  const int grid = std::min(n, sm_count() * 8);
  adamw8_kernel<T><<<grid, kThreads, 0, s>>>(batch, n);
  check_launch("adamw8_kernel");
}

void launch_dtype(const Chunk8Batch& batch, int n, DType dtype, cudaStream_t s) {
  dispatch_float(dtype, "adamw8_step", [&](auto t) { launch<typename decltype(t)::type>(batch, n, s); });
}

}  // namespace

void adamw8_step(const std::vector<AdamW8Tensor>& tensors, DType dtype, Stream stream) {
  LORART_CHECK(dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::F16,
               "adamw8_step: unsupported param dtype ", dtype_name(dtype));
  const size_t esize = dtype_size(dtype);
  int64_t total = 0;
  for (const AdamW8Tensor& t : tensors) total += t.numel;
  const int64_t chunk = optim_chunk_elems(total, sm_count());
  cudaStream_t s = as_stream(stream);
  Chunk8Batch batch;
  int n = 0;
  for (const AdamW8Tensor& t : tensors) {
    for (int64_t off = 0; off < t.numel; off += chunk) {
      Chunk8& c = batch.c[n++];
      c.param = static_cast<char*>(t.param) + off * esize;
      c.grad = static_cast<const char*>(t.grad) + off * esize;
      c.q1 = t.q_exp_avg + off;
      c.q2 = t.q_exp_avg_sq + off;
      c.a1 = t.absmax_exp_avg + off / detail::kQuantBlock;
      c.a2 = t.absmax_exp_avg_sq + off / detail::kQuantBlock;
      c.numel = std::min(chunk, t.numel - off);
      c.s = t.s;
      if (n == kMaxChunksPerLaunch) {
        launch_dtype(batch, n, dtype, s);
        n = 0;
      }
    }
  }
  if (n > 0) launch_dtype(batch, n, dtype, s);
}

}  // namespace lorart::cuda
