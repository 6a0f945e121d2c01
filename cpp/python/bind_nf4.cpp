// pybind11 bindings for NF4 (lorart/nf4.h). A weight arrives as one object (an NF4Weight / NF4Args;
// bind.h's caster reads its fields into an NF4View).
#include <optional>

#include "bind.h"
#include "lorart/nf4.h"

namespace lorart::py {
namespace {

void bind(py::module_& m) {
  m.def(
      "nf4_quantize",
      [](const TensorView& weight, int64_t blocksize, const TensorView& packed, const TensorView& absmax,
         uint64_t stream) {
        py::gil_scoped_release nogil;
        lorart::nf4_quantize(weight, blocksize, packed, absmax, as_stream(stream));
      },
      py::arg("weight"), py::arg("blocksize"), py::arg("packed"), py::arg("absmax"), py::arg("stream") = 0);
  m.def(
      "nf4_double_quant",
      [](const TensorView& absmax, const TensorView& offset, const TensorView& code, const TensorView& q,
         const TensorView& nested_absmax, uint64_t stream) {
        py::gil_scoped_release nogil;
        lorart::nf4_double_quant(absmax, offset, code, q, nested_absmax, as_stream(stream));
      },
      py::arg("absmax"), py::arg("offset"), py::arg("code"), py::arg("q"), py::arg("nested_absmax"),
      py::arg("stream") = 0);
  m.def(
      "nf4_dequantize",
      [](const NF4View& w, const TensorView& out, uint64_t stream) {
        py::gil_scoped_release nogil;
        lorart::nf4_dequantize(w, out, as_stream(stream));
      },
      py::arg("w"), py::arg("out"), py::arg("stream") = 0);
  m.def(
      "nf4_gemv",
      [](const TensorView& x, const NF4View& w, std::optional<TensorView> bias, const TensorView& out,
         uint64_t stream) {
        TensorView b = bias ? *bias : TensorView();
        py::gil_scoped_release nogil;
        lorart::nf4_gemv(x, w, b, out, as_stream(stream));
      },
      py::arg("x"), py::arg("w"), py::arg("bias"), py::arg("out"), py::arg("stream") = 0);
  m.def("nf4_gemv_max_rows", &lorart::nf4_gemv_max_rows);
  m.def("set_cpu_simd", &lorart::set_cpu_simd, py::arg("enabled"));
  m.def("cpu_simd_active", &lorart::cpu_simd_active);
}

static Registrar reg("nf4", &bind);

}  // namespace
}  // namespace lorart::py
