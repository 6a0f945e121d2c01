// pybind11 bindings of the fused RMSNorm (lorart/norm.h). An absent grad_weight arrives as None.
#include <optional>

#include "bind.h"
#include "lorart/norm.h"

namespace lorart::py {
namespace {

void bind(py::module_& m) {
  m.def("rms_norm_max_hidden", &rms_norm_max_hidden);
  m.def("rms_norm", [](const TensorView& x, const TensorView& w, double eps, const TensorView& out,
                       const TensorView& rstd, uint64_t s) { rms_norm(x, w, eps, out, rstd, as_stream(s)); },
        py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("out"), py::arg("rstd"), py::arg("stream") = 0);
  m.def("rms_norm_backward",
        [](const TensorView& x, const TensorView& w, const TensorView& rstd, const TensorView& grad_out,
           const TensorView& grad_x, const std::optional<TensorView>& grad_w, uint64_t s) {
          rms_norm_backward(x, w, rstd, grad_out, grad_x, grad_w ? *grad_w : TensorView(), as_stream(s));
        },
        py::arg("x"), py::arg("weight"), py::arg("rstd"), py::arg("grad_out"), py::arg("grad_x"),
        py::arg("grad_weight"), py::arg("stream") = 0);
}

Registrar reg("norm", &bind);

}  // namespace
}  // namespace lorart::py
