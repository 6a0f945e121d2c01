// LoRA math shared by the CPU and CUDA kernels (LORART_HD): the dropout mask hash. (The NF4 decode of the
// fused QLoRA kernel is detail/nf4_math.h's.)
#pragma once

#include <cstdint>

#include "lorart/detail/hd.h"

namespace lorart::detail {

// The dropout mask is a counter-based hash of (seed, element index) with 32-bit arithmetic (fast on GPUs):
// two keys derived from the 64-bit seed, then two rounds of the "lowbias32" integer mixer (C. Wellons)
// over the index. Stateless: any element's bit can be recomputed anywhere, CPU or CUDA, identically.
LORART_HD uint32_t lora_mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

struct LoraDropoutKey {
  uint32_t k1 = 0, k2 = 0, threshold = 0;  // an element is dropped when its hash is below `threshold`
};

// p in [0, 1): threshold = p * 2^32.
LORART_HD LoraDropoutKey lora_dropout_key(uint64_t seed, double p) {
  LoraDropoutKey k;
  k.k1 = lora_mix32(static_cast<uint32_t>(seed) ^ lora_mix32(static_cast<uint32_t>(seed >> 32) + 0x9E3779B9u));
  k.k2 = lora_mix32(k.k1 + 0x632BE5ABu);
  const double t = p * 4294967296.0;
  k.threshold = t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
  return k;
}

LORART_HD uint32_t lora_dropout_hash(const LoraDropoutKey& k, uint64_t index) {
  const uint32_t lo = static_cast<uint32_t>(index), hi = static_cast<uint32_t>(index >> 32);
  return lora_mix32(lora_mix32(lo ^ k.k1) ^ (hi * 0x9E3779B1u) ^ k.k2);
}

LORART_HD bool lora_dropout_keep(const LoraDropoutKey& k, uint64_t index) {
  return lora_dropout_hash(k, index) >= k.threshold;
}

}  // namespace lorart::detail
