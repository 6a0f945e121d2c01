// Fused NF4 dequant-GEMV for small M: out[m, r] = sum_k x[m, k] * W[r, k] (+ bias[r]) (+ a LoRA term).
// The packed weight is read exactly once: one warp per output row, each lane loading
// 16-byte chunks (32 elements, one NF4 block scale) and decoding them in registers;
// x rows (M <= 16) are read through the read-only cache, 8 elements per 16-byte load.
// Each weight is decoded in float32 and rounded to T (what nf4_dequantize stores for the large-M
// GEMM), so an NF4 layer's output does not depend on the path M takes but for summation order.
#include "common/cuda_utils.cuh"
#include "common/dispatch.cuh"
#include "lorart/detail/nf4_math.h"
#include "nf4/nf4_launch.h"
#include "nf4/nf4_types.cuh"

namespace lorart::cuda {
namespace {

using namespace nf4;
namespace dm = ::lorart::detail;

constexpr int kWarps = 4;  // output rows per CTA

// A decoded weight as T holds it (identity for float).
template <class T>
__device__ __forceinline__ float rounded(float v) { return to_f(from_f<T>(v)); }

template <class T, int MB>
__device__ __forceinline__ void finish_row(float (&acc)[MB], int m, int64_t row, const NF4Ptrs& w,
                                           const T* __restrict__ bias, const NF4Addend& add, T* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  if (add.xa != nullptr) {  // the LoRA term, in float32 before the one rounding
    const T* B = static_cast<const T*>(add.B) + row * add.R;
    for (int64_t j = lane; j < add.R; j += 32) {
      const float bj = add.scale * to_f(B[j]);
#pragma unroll
      for (int i = 0; i < MB; ++i)
        if (i < m) acc[i] = fmaf(add.xa[i * add.R + j], bj, acc[i]);
    }
  }
  const float b = bias ? to_f(bias[row]) : 0.f;
#pragma unroll
  for (int i = 0; i < MB; ++i) {
    const float v = warp_sum(acc[i]);
    if (lane == 0 && i < m) out[static_cast<int64_t>(i) * w.rows + row] = from_f<T>(v + b);
  }
}

// Fast path: cols % 32 == 0, packed and x 16-byte aligned.
template <class T, int MB>
__global__ void __launch_bounds__(kWarps * 32) gemv_vec_kernel(const T* __restrict__ x, int m, NF4Ptrs w,
                                                               const T* __restrict__ bias, NF4Addend add,
                                                               T* __restrict__ out, int shift) {
  __shared__ Tables s;
  load_tables(s, w);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= w.rows) return;
  const int lane = threadIdx.x & 31;
  const int64_t cols = w.cols, nchunks = cols / 32;
  const uint4* prow = reinterpret_cast<const uint4*>(w.packed + row * (cols / 2));
  const int64_t chunk0 = row * nchunks;  // global 32-element chunk index of this row's first chunk
  float acc[MB];
#pragma unroll
  for (int i = 0; i < MB; ++i) acc[i] = 0.f;
#pragma unroll 2
  for (int64_t c = lane; c < nchunks; c += 32) {
    const uint4 q = __ldcs(prow + c);
    const float scale = block_scale(s, w, (chunk0 + c) >> shift);
    const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      float wv[8];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t byte = (words[g] >> (8 * j)) & 0xffu;
        wv[2 * j] = rounded<T>(s.nf4[byte >> 4] * scale);
        wv[2 * j + 1] = rounded<T>(s.nf4[byte & 15u] * scale);
      }
      const int64_t k0 = c * 32 + g * 8;
#pragma unroll
      for (int i = 0; i < MB; ++i) {
        if (i < m) {
          float xv[8];
          load8(x + i * cols + k0, xv);
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i] = fmaf(wv[j], xv[j], acc[i]);
        }
      }
    }
  }
  finish_row<T, MB>(acc, m, row, w, bias, add, out);
}

// Any shape / alignment: lanes stride over the row's elements one by one.
template <class T, int MB>
__global__ void __launch_bounds__(kWarps * 32) gemv_scalar_kernel(const T* __restrict__ x, int m, NF4Ptrs w,
                                                                  const T* __restrict__ bias, NF4Addend add,
                                                                  T* __restrict__ out) {
  __shared__ Tables s;
  load_tables(s, w);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= w.rows) return;
  const int lane = threadIdx.x & 31;
  const int64_t cols = w.cols;
  float acc[MB];
#pragma unroll
  for (int i = 0; i < MB; ++i) acc[i] = 0.f;
  for (int64_t k = lane; k < cols; k += 32) {
    const int64_t e = row * cols + k;
    const uint8_t byte = w.packed[e >> 1];
    const float wv = rounded<T>(s.nf4[(e & 1) ? (byte & 15) : (byte >> 4)] * block_scale(s, w, e / w.blocksize));
#pragma unroll
    for (int i = 0; i < MB; ++i)
      if (i < m) acc[i] = fmaf(wv, to_f(x[i * cols + k]), acc[i]);
  }
  finish_row<T, MB>(acc, m, row, w, bias, add, out);
}

template <class T, int MB>
void launch(const T* x, int m, const NF4Ptrs& w, const T* bias, const NF4Addend& add, T* out, cudaStream_t st) {
  const unsigned grid = static_cast<unsigned>(ceil_div(w.rows, kWarps));
  const bool vec = w.cols % 32 == 0 && (reinterpret_cast<uintptr_t>(w.packed) & 15) == 0 &&
                   (reinterpret_cast<uintptr_t>(x) & 15) == 0;
  if (vec) {
    int shift = 0;
    while ((int64_t{32} << shift) < w.blocksize) ++shift;  // chunk index -> block index
    gemv_vec_kernel<T, MB><<<grid, kWarps * 32, 0, st>>>(x, m, w, bias, add, out, shift);
    check_launch("nf4_gemv_vec_kernel");
  } else {
    gemv_scalar_kernel<T, MB><<<grid, kWarps * 32, 0, st>>>(x, m, w, bias, add, out);
    check_launch("nf4_gemv_scalar_kernel");
  }
}

}  // namespace

void nf4_gemv(const void* x, DType dtype, int64_t m, const NF4Ptrs& w, const void* bias, void* out, Stream stream,
              const NF4Addend& add) {
  cudaStream_t st = as_stream(stream);
  const int mi = static_cast<int>(m);
  dispatch_float(dtype, "nf4_gemv", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* xt = static_cast<const T*>(x);
    const T* bt = static_cast<const T*>(bias);
    T* ot = static_cast<T*>(out);
    if (mi <= 1) launch<T, 1>(xt, mi, w, bt, add, ot, st);
    else if (mi <= 2) launch<T, 2>(xt, mi, w, bt, add, ot, st);
    else if (mi <= 4) launch<T, 4>(xt, mi, w, bt, add, ot, st);
    else if (mi <= 8) launch<T, 8>(xt, mi, w, bt, add, ot, st);
    else launch<T, 16>(xt, mi, w, bt, add, ot, st);
  });
}

}  // namespace lorart::cuda
