// NF4 math shared by the CPU and CUDA kernels (and by any kernel that decodes NF4,
// e.g. LoRA's fused paths). Everything is float32, matching bitsandbytes bit for bit:
//  * code table: bnb's NF4 values (index -> value);
//  * encode: scaled = x * (1 / absmax), then the number of midpoints strictly below
//    `scaled` (midpoint m_j = (code[j] + code[j+1]) / 2 in float32), i.e. nearest value
//    with ties going to the LOWER code (torch.bucketize(right=False) / bnb's `>` tree);
//  * nibbles: byte k = (q[2k] << 4) | q[2k+1];
//  * block scale with double quant: absmax[b] = nested_code[q8[b]] * nested_absmax[b/256] + offset.
#pragma once

#include <cstdint>

#include "lorart/detail/hd.h"

namespace lorart::detail {

// ---- the code table ----------------------------------------------------------------
constexpr float kNF4_0 = -1.0f;
constexpr float kNF4_1 = -0.6961928009986877f;
constexpr float kNF4_2 = -0.5250730514526367f;
constexpr float kNF4_3 = -0.39491748809814453f;
constexpr float kNF4_4 = -0.28444138169288635f;
constexpr float kNF4_5 = -0.18477343022823334f;
constexpr float kNF4_6 = -0.09105003625154495f;
constexpr float kNF4_7 = 0.0f;
constexpr float kNF4_8 = 0.07958029955625534f;
constexpr float kNF4_9 = 0.16093020141124725f;
constexpr float kNF4_10 = 0.24611230194568634f;
constexpr float kNF4_11 = 0.33791524171829224f;
constexpr float kNF4_12 = 0.44070982933044434f;
constexpr float kNF4_13 = 0.5626170039176941f;
constexpr float kNF4_14 = 0.7229568362236023f;
constexpr float kNF4_15 = 1.0f;

// Midpoints in float32, exactly as bnb computes them ((a + b) / 2 on float32 tensors).
constexpr float kNF4Mid0 = (kNF4_0 + kNF4_1) * 0.5f;
constexpr float kNF4Mid1 = (kNF4_1 + kNF4_2) * 0.5f;
constexpr float kNF4Mid2 = (kNF4_2 + kNF4_3) * 0.5f;
constexpr float kNF4Mid3 = (kNF4_3 + kNF4_4) * 0.5f;
constexpr float kNF4Mid4 = (kNF4_4 + kNF4_5) * 0.5f;
constexpr float kNF4Mid5 = (kNF4_5 + kNF4_6) * 0.5f;
constexpr float kNF4Mid6 = (kNF4_6 + kNF4_7) * 0.5f;
constexpr float kNF4Mid7 = (kNF4_7 + kNF4_8) * 0.5f;
constexpr float kNF4Mid8 = (kNF4_8 + kNF4_9) * 0.5f;
constexpr float kNF4Mid9 = (kNF4_9 + kNF4_10) * 0.5f;
constexpr float kNF4Mid10 = (kNF4_10 + kNF4_11) * 0.5f;
constexpr float kNF4Mid11 = (kNF4_11 + kNF4_12) * 0.5f;
constexpr float kNF4Mid12 = (kNF4_12 + kNF4_13) * 0.5f;
constexpr float kNF4Mid13 = (kNF4_13 + kNF4_14) * 0.5f;
constexpr float kNF4Mid14 = (kNF4_14 + kNF4_15) * 0.5f;

// The value of code index q (0..15). Kernels that decode many nibbles copy the 16
// values into shared memory or registers once (see nf4_fill_table) and index that.
LORART_HD float nf4_code(int q) {
  switch (q & 15) {
    case 0: return kNF4_0;   case 1: return kNF4_1;   case 2: return kNF4_2;   case 3: return kNF4_3;
    case 4: return kNF4_4;   case 5: return kNF4_5;   case 6: return kNF4_6;   case 7: return kNF4_7;
    case 8: return kNF4_8;   case 9: return kNF4_9;   case 10: return kNF4_10; case 11: return kNF4_11;
    case 12: return kNF4_12; case 13: return kNF4_13; case 14: return kNF4_14; default: return kNF4_15;
  }
}

LORART_HD void nf4_fill_table(float* table16) {
  for (int i = 0; i < 16; ++i) table16[i] = nf4_code(i);
}

// Index of the code nearest to `x` (an already scaled value), ties to the lower index: the
// number of midpoints strictly below x. Branch-free (15 compares; no mispredictions on the
// CPU, no divergence on the GPU). NaN maps to 0 (callers reject non-finite weights first).
LORART_HD uint8_t nf4_encode(float x) {
  return static_cast<uint8_t>((x > kNF4Mid0) + (x > kNF4Mid1) + (x > kNF4Mid2) + (x > kNF4Mid3) + (x > kNF4Mid4) +
                              (x > kNF4Mid5) + (x > kNF4Mid6) + (x > kNF4Mid7) + (x > kNF4Mid8) + (x > kNF4Mid9) +
                              (x > kNF4Mid10) + (x > kNF4Mid11) + (x > kNF4Mid12) + (x > kNF4Mid13) +
                              (x > kNF4Mid14));
}

// bnb scales by the reciprocal; an all-zero block (absmax 0) encodes as 0.0 (code 7).
LORART_HD float nf4_inv_scale(float absmax) { return absmax > 0.f ? 1.0f / absmax : 0.f; }

LORART_HD uint8_t nf4_pack(uint8_t q_even, uint8_t q_odd) {
  return static_cast<uint8_t>((q_even << 4) | (q_odd & 15));
}
LORART_HD int nf4_hi(uint8_t byte) { return byte >> 4; }   // element 2k
LORART_HD int nf4_lo(uint8_t byte) { return byte & 15; }   // element 2k+1

// Float32 multiply / add rounded separately (never contracted into an FMA), so the
// double-quant scale is bit-identical on the CPU, on the GPU and in bnb (which does the
// product in one kernel and `absmax += offset` in another).
// On the host GCC contracts a * b + c into an FMA by default (-ffp-contract=fast) wherever the caller is compiled
// for FMA (an AVX2+FMA kernel that inlines the scale decode), so the product is pinned in a register first.
LORART_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#elif (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
  float p = a * b;
  __asm__("" : "+x"(p));
  return p;
#elif (defined(__GNUC__) || defined(__clang__)) && defined(__aarch64__)
  float p = a * b;
  __asm__("" : "+w"(p));
  return p;
#else
  volatile float p = a * b;
  return p;
#endif
}
LORART_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// Decode of a double-quantized block scale: nested_code[q] * nested_absmax + offset.
LORART_HD float nf4_nested_scale(float code_value, float nested_absmax, float offset) {
  return add_rn(mul_rn(code_value, nested_absmax), offset);
}

// Block scale of block b: plain float32 absmax, or decoded from its nested uint8 code.
LORART_HD float nf4_block_scale(const float* absmax_f32, const uint8_t* absmax_q, const float* nested_absmax,
                                const float* nested_code, float offset, int64_t b) {
  if (absmax_q == nullptr) return absmax_f32[b];
  return nf4_nested_scale(nested_code[absmax_q[b]], nested_absmax[b / 256], offset);
}

// Decode one element: code value times block scale, in float32.
LORART_HD float nf4_decode(int q, float scale) { return nf4_code(q) * scale; }

// Nearest index in a sorted 256-entry table (ties to the lower index): binary search for
// the number of midpoints (code[j] + code[j+1]) / 2 strictly below x.
LORART_HD uint8_t dynamic_encode(const float* code256, float x) {
  int lo = 0, hi = 255;  // answer in [lo, hi]
  while (lo < hi) {
    int mid = (lo + hi) >> 1;  // midpoint between code[mid] and code[mid+1]
    float m = (code256[mid] + code256[mid + 1]) * 0.5f;
    if (x > m) lo = mid + 1; else hi = mid;
  }
  return static_cast<uint8_t>(lo);
}

}  // namespace lorart::detail
