// NF4 tables in shared memory for the NF4 CUDA kernels (the float conversions and 8-wide loads/stores they
// use are in common/vec.cuh, the dtype dispatch in common/dispatch.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/check.h"
#include "common/vec.cuh"
#include "lorart/detail/nf4_math.h"
#include "nf4/nf4_launch.h"

namespace lorart::cuda::nf4 {

// The 16 NF4 values and (with double quantization) the 256-entry nested code, staged in shared
// memory once per block; block_scale decodes the absmax of NF4 block b (double quant included).
struct Tables {
  float nf4[16];
  float nested[256];
};

__device__ __forceinline__ void load_tables(Tables& s, const NF4Ptrs& w) {
  if (threadIdx.x < 16) s.nf4[threadIdx.x] = ::lorart::detail::nf4_code(threadIdx.x);
  if (w.absmax_q)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s.nested[i] = w.nested_code[i];
  __syncthreads();
}

__device__ __forceinline__ float block_scale(const Tables& s, const NF4Ptrs& w, int64_t b) {
  if (w.absmax_q == nullptr) return __ldg(w.absmax_f32 + b);
  return ::lorart::detail::nf4_nested_scale(s.nested[__ldg(w.absmax_q + b)], __ldg(w.nested_absmax + (b >> 8)),
                                            w.offset);
}

}  // namespace lorart::cuda::nf4
