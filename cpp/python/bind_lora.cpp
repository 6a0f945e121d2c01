// pybind11 bindings of the LoRA kernels (lorart/lora.h). Tensors arrive as themselves, optional tensors as
// None, an NF4 base as one object (bind.h).
#include <optional>

#include "bind.h"
#include "lorart/lora.h"

namespace lorart::py {
namespace {

TensorView opt(const std::optional<TensorView>& t) { return t ? *t : TensorView(); }

void bind(py::module_& m) {
  m.def("lora_dropout", [](const TensorView& x, const TensorView& out, double p, uint64_t seed, uint64_t s) {
    lora_dropout(x, out, p, seed, as_stream(s));
  }, py::arg("x"), py::arg("out"), py::arg("p"), py::arg("seed"), py::arg("stream") = 0);
  m.def("lora_shrink", [](const TensorView& x, const TensorView& A, double p, uint64_t seed, const TensorView& xa,
                          uint64_t s) { lora_shrink(x, A, p, seed, xa, as_stream(s)); },
        py::arg("x"), py::arg("A"), py::arg("p"), py::arg("seed"), py::arg("xa"), py::arg("stream") = 0);
  m.def("lora_fused_max_rows", &lora_fused_max_rows);
  m.def("lora_fused_linear", [](const TensorView& x, const TensorView& W, const std::optional<TensorView>& bias,
                                const TensorView& xa, const TensorView& B, double scale, const TensorView& y,
                                uint64_t s) { lora_fused_linear(x, W, opt(bias), xa, B, scale, y, as_stream(s)); },
        py::arg("x"), py::arg("W"), py::arg("bias"), py::arg("xa"), py::arg("B"), py::arg("scale"), py::arg("y"),
        py::arg("stream") = 0);
  m.def("lora_fused_linear_nf4",
        [](const TensorView& x, const NF4View& w, const std::optional<TensorView>& bias, const TensorView& xa,
           const TensorView& B, double scale, const TensorView& y, uint64_t s) {
          lora_fused_linear_nf4(x, w, opt(bias), xa, B, scale, y, as_stream(s));
        },
        py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("xa"), py::arg("B"), py::arg("scale"), py::arg("y"),
        py::arg("stream") = 0);
  m.def("lora_grouped_add",
        [](const TensorView& y, const TensorView& x, const TensorView& A_stack, const TensorView& B_stack,
           const TensorView& ranks, const TensorView& scales, const TensorView& idx, const TensorView& xa_ws,
           uint64_t s) { lora_grouped_add(y, x, A_stack, B_stack, ranks, scales, idx, xa_ws, as_stream(s)); },
        py::arg("y"), py::arg("x"), py::arg("A_stack"), py::arg("B_stack"), py::arg("ranks"), py::arg("scales"),
        py::arg("adapter_idx"), py::arg("xa_ws"), py::arg("stream") = 0);
  m.def("lora_merge", [](const TensorView& W, const TensorView& A, const TensorView& B, double scale, uint64_t s) {
    lora_merge(W, A, B, scale, as_stream(s));
  }, py::arg("W"), py::arg("A"), py::arg("B"), py::arg("scale"), py::arg("stream") = 0);
  m.def("lora_merge_count_nonfinite", [](const TensorView& W, const TensorView& A, const TensorView& B, double scale,
                                         const TensorView& count, uint64_t s) {
    lora_merge_count_nonfinite(W, A, B, scale, count, as_stream(s));
  }, py::arg("W"), py::arg("A"), py::arg("B"), py::arg("scale"), py::arg("count"), py::arg("stream") = 0);
}

Registrar reg("lora", &bind);

}  // namespace
}  // namespace lorart::py
