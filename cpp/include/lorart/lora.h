// lorart LoRA kernels: the pieces of a fused LoRA linear that torch's matmuls do not
// cover, on CPU and CUDA.
//
//   y = x @ W.T + bias + s * dropout(x) @ A.T @ B.T        (s = alpha / r, or alpha / sqrt(r))
//
// Shapes: x [M, K] (row stride may exceed K), W [N, K], bias [N], A [r, K], B [N, r], y [M, N].
// Float tensors share one dtype: float32, bfloat16, float16 (and float64 on the CPU). Sums are
// accumulated in float32 (float64 for float64) and rounded once.
//
// Dropout: element (m, k) of x is kept when lora_dropout_keep(lora_dropout_key(seed, p), m * K + k)
// (detail/lora_math.h, a counter-based hash), and kept elements are scaled by 1 / (1 - p). The CPU and the CUDA masks are
// bit-identical and are recomputed from `seed`, never stored.
#pragma once

#include <cstdint>

#include "lorart/common.h"
#include "lorart/nf4.h"

namespace lorart {

// out = dropout(x) (x and out [M, K], same dtype; out may alias x). p in [0, 1).
void lora_dropout(const TensorView& x, const TensorView& out, double p, uint64_t seed, Stream stream = nullptr);

// xa [M, r] (float32) = dropout(x) @ A.T: the LoRA "shrink" product without forming dropout(x).
void lora_shrink(const TensorView& x, const TensorView& A, double p, uint64_t seed, const TensorView& xa,
                 Stream stream = nullptr);

// The decode path (small M, at most lora_fused_max_rows() rows): y = x @ W.T + bias + scale * xa @ B.T in one
// pass over W, where xa comes from lora_shrink. `bias` may have data == nullptr.
int64_t lora_fused_max_rows();
void lora_fused_linear(const TensorView& x, const TensorView& W, const TensorView& bias, const TensorView& xa,
                       const TensorView& B, double scale, const TensorView& y, Stream stream = nullptr);

// Same with an NF4 base (bitsandbytes layout, lorart/nf4.h): nf4_gemv's kernel (W decoded on the fly and
// rounded to x's dtype as bnb's dequantize does, never materialised) with the LoRA term added before its one
// rounding. x and y contiguous.
void lora_fused_linear_nf4(const TensorView& x, const NF4View& W, const TensorView& bias, const TensorView& xa,
                           const TensorView& B, double scale, const TensorView& y, Stream stream = nullptr);

// Mixed-adapter batches (Punica BGMV): row m of x uses adapter idx[m] (int32 or int64 [M]; -1 = none):
//   y[m] += scales[i] * B_stack[i, :, :ranks[i]] @ (A_stack[i, :ranks[i]] @ x[m])        (i = idx[m])
// A_stack [L, rmax, K], B_stack [L, N, rmax] (x's dtype), ranks int32 [L] (<= rmax), scales float32 [L],
// xa_ws float32 [M, rmax] (workspace). y [M, N] is updated in place.
void lora_grouped_add(const TensorView& y, const TensorView& x, const TensorView& A_stack, const TensorView& B_stack,
                      const TensorView& ranks, const TensorView& scales, const TensorView& idx,
                      const TensorView& xa_ws, Stream stream = nullptr);

// Merge: W [N, K] += scale * B @ A, computed per element in float32 (float64 for float64) and rounded once.
// Unmerge is the same call with -scale (exact restoration is the caller's business: see docs/lora.md).
void lora_merge(const TensorView& W, const TensorView& A, const TensorView& B, double scale, Stream stream = nullptr);
// Counts the elements of W + scale * B @ A that would be NaN or +-inf into count (int32 [1], zeroed first);
// W is not written.
void lora_merge_count_nonfinite(const TensorView& W, const TensorView& A, const TensorView& B, double scale,
                                const TensorView& count, Stream stream = nullptr);

}  // namespace lorart
