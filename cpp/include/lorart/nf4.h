// NF4 (4-bit NormalFloat) weights in bitsandbytes' exact layout.
//
// A weight of `rows x cols` elements (a linear layer's [out_features, in_features]) is
// flattened row-major and cut into blocks of `blocksize` consecutive elements (blocks may
// span rows; the last one may be shorter). Each element becomes the 4-bit index of the
// nearest NF4 code value after scaling by 1/absmax of its block; two indices per byte,
// the even element in the HIGH nibble; an odd count pads the last low nibble with 7 (0.0).
// With double quantization the fp32 absmax is stored as uint8 codes of bnb's signed
// dynamic map over 256-blocks of (absmax - offset), offset = mean(absmax):
//   absmax[b] = nested_code[q[b]] * nested_absmax[b / 256] + offset.
// See docs/nf4.md and cpp/include/lorart/detail/nf4_math.h (the shared math).
#pragma once

#include <cstdint>

#include "lorart/common.h"

namespace lorart {

struct NF4View {            // a frozen [rows=out_features, cols=in_features] weight in bnb's layout
  TensorView packed;        // uint8, (rows*cols+1)/2 bytes (any shape with that numel, e.g. [(n+1)//2, 1])
  TensorView absmax;        // float32 [nblocks] (no double quant) or uint8 codes [nblocks] (double quant)
  TensorView nested_absmax; // float32 [ceil(nblocks/256)] with double quant, else data == nullptr
  TensorView nested_code;   // float32 [256] (bnb's signed dynamic map) with double quant, else nullptr
  float offset = 0.f;       // mean of the fp32 absmax (double quant), else 0
  int64_t blocksize = 64;   // 32..4096, power of two
  int64_t rows = 0, cols = 0;

  bool double_quant() const { return absmax.dtype == DType::U8; }
  int64_t numel() const { return rows * cols; }
  int64_t nblocks() const { return (numel() + blocksize - 1) / blocksize; }
};

// Nested (double-quant) block size, fixed by bitsandbytes.
constexpr int64_t kNF4NestedBlocksize = 256;

// Throws lorart::Error (naming the field) unless `w` is a consistent NF4 weight:
// rows > 0, cols > 0, rows * cols <= 2^62, dtypes, sizes, contiguity, one device, blocksize a power of two in
// [32, 4096].
void nf4_check(const NF4View& w);

// Quantizes `weight` (float32|bfloat16|float16, contiguous, any shape, numel > 0) into
// `packed` (uint8, (n+1)/2 elements) and `absmax` (float32, ceil(n/blocksize)).
// Throws a ValueError naming `weight` and its first block holding NaN or +-inf (CPU; on CUDA the caller checks absmax,
// which such a block leaves NaN).
void nf4_quantize(const TensorView& weight, int64_t blocksize, const TensorView& packed,
                  const TensorView& absmax, Stream stream = nullptr);

// Double quantization of a float32 absmax (non-empty): q[b] = nearest index in `code` (256 sorted
// values, ties to the lower index) of (absmax[b] - offset) / nested_absmax[b / 256],
// nested_absmax = max |absmax - offset| per 256-block. `offset` is a float32 [1] tensor
// on the same device (mean of absmax, computed by the caller).
void nf4_double_quant(const TensorView& absmax, const TensorView& offset, const TensorView& code,
                      const TensorView& q, const TensorView& nested_absmax, Stream stream = nullptr);

// out (float32|bfloat16|float16, rows*cols elements, contiguous) = decode(w), computed in
// float32 then rounded once. Double-quant absmax is decoded inside the kernel.
void nf4_dequantize(const NF4View& w, const TensorView& out, Stream stream = nullptr);

// Fused small-M linear: out[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]), x [M, cols],
// out [M, rows], both of one dtype (float32|bfloat16|float16), contiguous; M = 0 is a no-op. Each weight is decoded
// in float32 and rounded to x's dtype (as nf4_dequantize stores it), products summed in float32,
// the result rounded once: the same rule as nf4_dequantize + a GEMM, whatever M.
// CUDA and CPU. M <= nf4_gemv_max_rows() on CUDA.
void nf4_gemv(const TensorView& x, const NF4View& w, const TensorView& bias, const TensorView& out,
              Stream stream = nullptr);
int64_t nf4_gemv_max_rows();

}  // namespace lorart
