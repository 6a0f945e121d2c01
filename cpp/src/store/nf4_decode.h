// Internal: NF4 decode for NF4Linear (bitsandbytes layout, see /docs). Temporary
// until the shared NF4 kernels (lorart/nf4.h) are merged.
#pragma once

#include "lorart/base_layer.h"

namespace lorart::detail {

extern const float kNF4Table[16];
// out[rows*cols] = code[q[i]] * absmax[i / blocksize] (absmax decoded with double quantization).
void nf4_decode_cpu(const NF4Linear& l, float* out);

}  // namespace lorart::detail
