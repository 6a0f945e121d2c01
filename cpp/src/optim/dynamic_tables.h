// The dynamic maps of the 8-bit optimizer states on the host, with a lookup table that
// replaces the CPU's binary search (the CUDA kernel searches the decision points in
// shared memory instead; both give dynamic_quantize's byte).
#pragma once

#include <cstdint>
#include <cstring>

#include "lorart/detail/optim8_math.h"

namespace lorart::detail {

// lut[k] = number of decision points below the smallest float whose top 16 bits are k (sign,
// exponent, 7 mantissa bits). Each such bucket is narrower than the gap between neighbouring
// decision points of either map, so at most one point lies inside it and
//   dynamic_quantize(mid, x) == lut[bits(x) >> 16] + (mid[that] < x)   for every non-NaN x
// (checked bucket by bucket in cpp/tests/test_optim8.cpp). Two loads instead of eight.
struct DynamicTables {
  float code[2][kCodeSize];  // [0]: signed (exp_avg), [1]: unsigned (exp_avg_sq)
  float mid[2][kCodeSize];
  uint8_t lut[2][1 << 16];
};

// Built on first use (thread-safe), then shared.
const DynamicTables& dynamic_tables();

// The table index of x: its top 16 bits; NaN -> a NaN bucket (whose entry is 0).
LORART_OPTIM_HD uint32_t dynamic_lut_key(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return x == x ? bits >> 16 : 0x7fc0u;
}

LORART_OPTIM_HD uint32_t dynamic_lut_finish(const uint8_t* lut, const float* mid, uint32_t key, float x) {
  const uint32_t c = lut[key];
  return c + (mid[c] < x ? 1u : 0u);
}

// dynamic_quantize(mid, x), by the table.
LORART_OPTIM_HD uint32_t dynamic_quantize_lut(const uint8_t* lut, const float* mid, float x) {
  return dynamic_lut_finish(lut, mid, dynamic_lut_key(x), x);
}

}  // namespace lorart::detail
