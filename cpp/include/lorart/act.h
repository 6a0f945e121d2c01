// Fused activations. SwiGLU, the gated MLP activation of Llama-family models:
//   out = silu(gate) * up                       (silu(g) = g / (1 + exp(-g)))
// Fusing saves memory traffic and, in training, memory: backward needs only gate and up
// (the plain `F.silu(gate) * up` also keeps silu(gate)). Math: lorart/detail/act_math.h.
#pragma once

#include "lorart/common.h"

namespace lorart {

// gate, up, out: one dtype (float32 | bfloat16 | float16; float64 on the CPU), contiguous,
// equal element counts (shapes may differ). out = silu(gate) * up.
void swiglu(const TensorView& gate, const TensorView& up, const TensorView& out, Stream stream = nullptr);

// grad_gate, grad_up from grad_out (all five tensors as above). grad_gate/grad_up may not alias
// gate/up/grad_out.
void swiglu_backward(const TensorView& gate, const TensorView& up, const TensorView& grad_out,
                     const TensorView& grad_gate, const TensorView& grad_up, Stream stream = nullptr);

}  // namespace lorart
