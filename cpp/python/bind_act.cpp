// pybind11 bindings of the fused activations (lorart/act.h).
#include "bind.h"
#include "lorart/act.h"

namespace lorart::py {
namespace {

void bind(py::module_& m) {
  m.def("swiglu", [](const TensorView& gate, const TensorView& up, const TensorView& out, uint64_t s) {
    swiglu(gate, up, out, as_stream(s));
  }, py::arg("gate"), py::arg("up"), py::arg("out"), py::arg("stream") = 0);
  m.def("swiglu_backward", [](const TensorView& gate, const TensorView& up, const TensorView& grad_out,
                              const TensorView& grad_gate, const TensorView& grad_up, uint64_t s) {
    swiglu_backward(gate, up, grad_out, grad_gate, grad_up, as_stream(s));
  }, py::arg("gate"), py::arg("up"), py::arg("grad_out"), py::arg("grad_gate"), py::arg("grad_up"),
        py::arg("stream") = 0);
}

Registrar reg("act", &bind);

}  // namespace
}  // namespace lorart::py
