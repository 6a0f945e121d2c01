// 8-bit blockwise optimizer-state math shared by the CPU and CUDA drivers.
//
// States are stored as one byte per element plus one float32 `absmax` per block of 256
// elements (bitsandbytes' blockwise 8-bit Adam layout). A byte q of block b stands for
//   code[q] * absmax[b]
// where `code` is one of bitsandbytes' 256-entry "dynamic" maps (create_dynamic_map):
// signed for exp_avg, unsigned for exp_avg_sq. One step of a block:
//   1. dequantise m, v (code[q] * absmax), 2. adamw_update (detail/optim_math.h) with the
//   parameter updated from these fp32 states, 3. new absmax = max |state| over the block,
//   4. requantise: q = nearest code to state / absmax (ties to the lower code).
#pragma once

#include <cmath>
#include <cstdint>

#include "lorart/detail/optim_math.h"

namespace lorart::detail {

constexpr int kQuantBlock = 256;  // elements per absmax block
constexpr int kCodeSize = 256;    // entries of a dynamic map

// torch.linspace(0.1, 1.0, n, dtype=float32)[t] as ATen's CPU kernel computes it (the two
// halves run from either end; the multiply-add is fused, as in torch's AVX2/AVX-512 builds).
LORART_OPTIM_HD float dynamic_linspace(int t, int n) {
  const float start = 0.1f, end = 1.0f;
  const float step = (end - start) / static_cast<float>(n - 1);
  return t < n / 2 ? fmaf(step, static_cast<float>(t), start) : fmaf(-step, static_cast<float>(n - 1 - t), end);
}

// 10^(i-6) as Python computes it and torch rounds it to float.
LORART_OPTIM_HD float dynamic_decade(int i) {
  switch (i) {
    case 0: return static_cast<float>(1e-6);
    case 1: return static_cast<float>(1e-5);
    case 2: return static_cast<float>(1e-4);
    case 3: return static_cast<float>(1e-3);
    case 4: return static_cast<float>(1e-2);
    case 5: return static_cast<float>(1e-1);
    default: return 1.0f;
  }
}

// The j-th smallest positive entry below 1.0 of the dynamic map. bitsandbytes builds, for
// decades i = 0..6, the midpoints of linspace(0.1, 1, k + 1) scaled by 10^(i-6), with
// k = 2^i entries per decade (signed map) or 2^(i+1) (unsigned map). The decades do not
// overlap, so the sorted order is decade by decade.
LORART_OPTIM_HD float dynamic_positive(bool is_signed, int j) {
  int i = 0, start = 0, size = is_signed ? 1 : 2;
  while (j >= start + size) {
    start += size;
    size *= 2;
    ++i;
  }
  const int k = j - start;
  const float mean = (dynamic_linspace(k, size + 1) + dynamic_linspace(k + 1, size + 1)) / 2.0f;
  return dynamic_decade(i) * mean;
}

// Entry `idx` (0..255) of bitsandbytes' sorted dynamic map, create_dynamic_map(signed):
//   signed:   127 negatives, 0 at index 127, 127 positives, 1.0 at index 255
//   unsigned: 0 at index 0, 254 positives, 1.0 at index 255
LORART_OPTIM_HD float dynamic_code(bool is_signed, int idx) {
  if (idx == kCodeSize - 1) return 1.0f;
  if (is_signed) {
    if (idx == 127) return 0.0f;
    return idx > 127 ? dynamic_positive(true, idx - 128) : -dynamic_positive(true, 126 - idx);
  }
  return idx == 0 ? 0.0f : dynamic_positive(false, idx - 1);
}

// The decision points of a code: mid[i] = (code[i] + code[i+1]) / 2 for i < 255, and
// mid[255] = +inf (a sentinel for the search).
LORART_OPTIM_HD float dynamic_mid(const float* code, int i) {
  return i < kCodeSize - 1 ? 0.5f * (code[i] + code[i + 1]) : INFINITY;
}

// The byte of a normalised value x (x = state / absmax): the number of decision points
// below x, i.e. the nearest code, a tie going to the lower code. NaN -> 0. `mid` holds the
// 256 decision points (dynamic_mid). Eight steps of a branch-free binary search.
LORART_OPTIM_HD uint32_t dynamic_quantize(const float* mid, float x) {
  uint32_t idx = 0;
  for (uint32_t s = kCodeSize / 2; s > 0; s >>= 1) idx += (mid[idx + s - 1] < x) ? s : 0u;
  return idx;
}

// Running max of |x| for a block's new absmax; a NaN anywhere makes the result NaN (the
// block's states then dequantise to NaN: no silent loss of a NaN, as with 32-bit states).
LORART_OPTIM_HD float absmax_combine(float acc, float x) {
  const float a = fabsf(x);
  return (a > acc || a != a) ? a : acc;
}

}  // namespace lorart::detail
