// LoRA math shared by the CPU and CUDA kernels (LORART_HD): the dropout mask hash and the
// NF4 decode used by the fused small-M kernel.
#pragma once

#include <cstdint>

#include "lorart/detail/hd.h"

namespace lorart::detail {

// Counter-based hash of (seed, index): the splitmix64 finaliser applied to seed ^ (index * golden ratio),
// then a second round. Stateless, so any element's mask bit can be recomputed anywhere.
LORART_HD uint64_t lora_hash64(uint64_t seed, uint64_t index) {
  uint64_t z = seed ^ (index * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  z = (z ^ (z >> 32)) * 0xD6E8FEB86659FD93ull;
  return z ^ (z >> 32);
}

// Keep threshold for drop probability p: an element is dropped when the top 32 bits of its hash are below it.
LORART_HD uint32_t lora_dropout_threshold(double p) {
  double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

LORART_HD bool lora_dropout_keep(uint64_t seed, uint64_t index, uint32_t threshold) {
  return static_cast<uint32_t>(lora_hash64(seed, index) >> 32) >= threshold;
}

// The bitsandbytes NF4 code table (index -> value).
#define LORART_NF4_TABLE                                                                                   \
  {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,        \
   -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,         \
   0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,                  \
   0.7229568362236023f, 1.0f}

// Absmax of NF4 block b: float32 absmax, or (double quant) nested_code[q[b]] * nested_absmax[b / 256] + offset.
LORART_HD float lora_nf4_absmax(const void* absmax, bool double_quant, const float* nested_absmax,
                                const float* nested_code, float offset, int64_t b) {
  if (!double_quant) return static_cast<const float*>(absmax)[b];
  const uint8_t q = static_cast<const uint8_t*>(absmax)[b];
  return nested_code[q] * nested_absmax[b >> 8] + offset;
}

}  // namespace lorart::detail
