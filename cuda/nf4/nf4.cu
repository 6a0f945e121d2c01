// NF4 CUDA kernels: blockwise quantize, double quant, dequantize (fused nested decode).
#include "common/cuda_utils.cuh"
#include "common/dispatch.cuh"
#include "lorart/detail/nf4_math.h"
#include "nf4/nf4_launch.h"
#include "nf4/nf4_types.cuh"

namespace lorart::cuda {
namespace {

using namespace nf4;
namespace dm = ::lorart::detail;

constexpr int kThreads = 256;

// ---- kernels -------------------------------------------------------------------------

// One warp per NF4 block: absmax (and a NaN/inf probe) by warp reduction, then encode pairs.
template <class T>
__global__ void quantize_kernel(const T* __restrict__ w, int64_t n, int64_t bs, int64_t nb,
                                uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  const int lane = threadIdx.x & 31;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (b >= nb) return;
  const int64_t s = b * bs;
  const int64_t len = min(bs, n - s);
  float amax = 0.f, probe = 0.f;
  for (int64_t i = lane; i < len; i += 32) {
    const float v = to_f(w[s + i]);
    amax = fmaxf(amax, fabsf(v));
    probe += v * 0.f;  // NaN iff some v is NaN or +-inf
  }
  amax = warp_max(amax);
  probe = warp_sum(probe);
  const bool bad = !(probe == 0.f);
  if (lane == 0) absmax[b] = bad ? __int_as_float(0x7fc00000) : amax;
  if (bad) return;
  const float inv = dm::nf4_inv_scale(amax);
  for (int64_t j = lane; 2 * j < len; j += 32) {
    const int64_t i = s + 2 * j;
    const float v0 = to_f(w[i]);
    // an odd count pads the last low nibble with code 7 (0.0), whatever the scale (0 * inf would be NaN, code 0)
    const uint8_t q1 = 2 * j + 1 < len ? dm::nf4_encode(__fmul_rn(to_f(w[i + 1]), inv)) : uint8_t{7};
    packed[i / 2] = dm::nf4_pack(dm::nf4_encode(__fmul_rn(v0, inv)), q1);
  }
}

// One CTA of 256 threads per nested block of 256 absmax values.
__global__ void double_quant_kernel(const float* __restrict__ absmax, int64_t nb, const float* __restrict__ offset,
                                    const float* __restrict__ code_g, uint8_t* __restrict__ q,
                                    float* __restrict__ nested_absmax) {
  __shared__ float code[256];
  __shared__ float red[kThreads / 32];
  const int t = threadIdx.x;
  code[t] = code_g[t];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * 256 + t;
  const float v = i < nb ? __fsub_rn(absmax[i], *offset) : 0.f;
  float m = warp_max(fabsf(v));
  if ((t & 31) == 0) red[t / 32] = m;
  __syncthreads();
  m = red[0];
#pragma unroll
  for (int k = 1; k < kThreads / 32; ++k) m = fmaxf(m, red[k]);
  if (t == 0) nested_absmax[blockIdx.x] = m;
  const float inv = dm::nf4_inv_scale(m);
  if (i < nb) q[i] = dm::dynamic_encode(code, __fmul_rn(v, inv));
}

// Fast path: each thread decodes 8 elements (4 packed bytes, one 32-bit load) per item and
// writes them with 16-byte stores (a warp stores 512 contiguous bytes per instruction); kUnroll
// items per iteration keep several loads in flight. Needs packed 4-byte and out 16-byte
// aligned; 8 elements never straddle a block (blocksize >= 32, a power of two).
constexpr int kUnroll = 4;

template <class T>
__global__ void dequant_vec_kernel(NF4Ptrs w, T* __restrict__ out, int64_t n8, int shift) {
  __shared__ Tables s;
  load_tables(s, w);
  const uint32_t* p32 = reinterpret_cast<const uint32_t*>(w.packed);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; base < n8;
       base += kUnroll * stride) {
    uint32_t word[kUnroll];
    float scale[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t it = base + u * stride;
      word[u] = it < n8 ? __ldcs(p32 + it) : 0u;
      scale[u] = it < n8 ? block_scale(s, w, it >> shift) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t it = base + u * stride;
      if (it >= n8) break;
      float v[8];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t byte = (word[u] >> (8 * j)) & 0xffu;
        v[2 * j] = s.nf4[byte >> 4] * scale[u];
        v[2 * j + 1] = s.nf4[byte & 15u] * scale[u];
      }
      store8(out + it * 8, v);
    }
  }
}

// Any alignment / the tail: one thread per element in [start, n).
template <class T>
__global__ void dequant_scalar_kernel(NF4Ptrs w, T* __restrict__ out, int64_t start, int64_t n) {
  __shared__ Tables s;
  load_tables(s, w);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = start + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const uint8_t byte = w.packed[i >> 1];
    const int q = (i & 1) ? (byte & 15) : (byte >> 4);
    out[i] = from_f<T>(s.nf4[q] * block_scale(s, w, i / w.blocksize));
  }
}

int grid_for(int64_t items, int per_sm = 8) {
  const int64_t want = ceil_div(items, kThreads);
  const int64_t cap = static_cast<int64_t>(sm_count()) * per_sm;
  return static_cast<int>(want < 1 ? 1 : (want < cap ? want : cap));
}

int log2i(int64_t v) {
  int r = 0;
  while ((int64_t{1} << r) < v) ++r;
  return r;
}

}  // namespace

// ---- launchers -------------------------------------------------------------------------

void nf4_quantize(const void* w, DType dtype, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax,
                  Stream stream) {
  const int64_t nb = ceil_div(n, blocksize);
  const int warps = kThreads / 32;
  const int64_t grid = ceil_div(nb, warps);
  dispatch_float(dtype, "nf4_quantize", [&](auto tag) {
    using T = typename decltype(tag)::type;
    quantize_kernel<T><<<static_cast<unsigned>(grid), kThreads, 0, as_stream(stream)>>>(static_cast<const T*>(w), n,
                                                                                        blocksize, nb, packed, absmax);
  });
  check_launch("nf4_quantize_kernel");
}

void nf4_double_quant(const float* absmax, int64_t nb, const float* offset, const float* code, uint8_t* q,
                      float* nested_absmax, Stream stream) {
  const int64_t grid = ceil_div(nb, 256);
  double_quant_kernel<<<static_cast<unsigned>(grid), kThreads, 0, as_stream(stream)>>>(absmax, nb, offset, code, q,
                                                                                        nested_absmax);
  check_launch("nf4_double_quant_kernel");
}

void nf4_dequantize(const NF4Ptrs& w, void* out, DType dtype, Stream stream) {
  const int64_t n = w.rows * w.cols;
  const bool vec = (reinterpret_cast<uintptr_t>(w.packed) & 3) == 0 && (reinterpret_cast<uintptr_t>(out) & 15) == 0;
  const int64_t n8 = vec ? n / 8 : 0;
  cudaStream_t st = as_stream(stream);
  dispatch_float(dtype, "nf4_dequantize", [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* o = static_cast<T*>(out);
    if (n8 > 0) {
      dequant_vec_kernel<T><<<grid_for(ceil_div(n8, kUnroll)), kThreads, 0, st>>>(w, o, n8, log2i(w.blocksize) - 3);
      check_launch("nf4_dequant_vec_kernel");
    }
    if (n8 * 8 < n) {
      dequant_scalar_kernel<T><<<grid_for(n - n8 * 8), kThreads, 0, st>>>(w, o, n8 * 8, n);
      check_launch("nf4_dequant_scalar_kernel");
    }
  });
}

}  // namespace lorart::cuda
