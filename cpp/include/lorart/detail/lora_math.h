// LoRA math shared by the CPU and CUDA kernels (LORART_HD): the dropout mask hash. (The NF4 decode of the
// fused QLoRA kernel is detail/nf4_math.h's.)
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

}  // namespace lorart::detail
