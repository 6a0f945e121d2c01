// pybind11 bindings for NF4 (lorart/nf4.h). Weights arrive as the contract's op_args():
// (packed, absmax, nested_absmax | None, nested_code | None, offset, blocksize, rows, cols).
#include <optional>

#include "bind.h"
#include "lorart/nf4.h"

namespace lorart::py {
namespace {

NF4View make_view(const TensorView& packed, const TensorView& absmax, const std::optional<TensorView>& nested_absmax,
                  const std::optional<TensorView>& nested_code, double offset, int64_t blocksize, int64_t rows,
                  int64_t cols) {
  NF4View w;
  w.packed = packed;
  w.absmax = absmax;
  if (nested_absmax) w.nested_absmax = *nested_absmax;
  if (nested_code) w.nested_code = *nested_code;
  w.offset = static_cast<float>(offset);
  w.blocksize = blocksize;
  w.rows = rows;
  w.cols = cols;
  return w;
}

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
      [](const TensorView& packed, const TensorView& absmax, std::optional<TensorView> nested_absmax,
         std::optional<TensorView> nested_code, double offset, int64_t blocksize, int64_t rows, int64_t cols,
         const TensorView& out, uint64_t stream) {
        NF4View w = make_view(packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols);
        py::gil_scoped_release nogil;
        lorart::nf4_dequantize(w, out, as_stream(stream));
      },
      py::arg("packed"), py::arg("absmax"), py::arg("nested_absmax"), py::arg("nested_code"), py::arg("offset"),
      py::arg("blocksize"), py::arg("rows"), py::arg("cols"), py::arg("out"), py::arg("stream") = 0);
  m.def(
      "nf4_gemv",
      [](const TensorView& x, const TensorView& packed, const TensorView& absmax,
         std::optional<TensorView> nested_absmax, std::optional<TensorView> nested_code, double offset,
         int64_t blocksize, int64_t rows, int64_t cols, std::optional<TensorView> bias, const TensorView& out,
         uint64_t stream) {
        NF4View w = make_view(packed, absmax, nested_absmax, nested_code, offset, blocksize, rows, cols);
        TensorView b = bias ? *bias : TensorView();
        py::gil_scoped_release nogil;
        lorart::nf4_gemv(x, w, b, out, as_stream(stream));
      },
      py::arg("x"), py::arg("packed"), py::arg("absmax"), py::arg("nested_absmax"), py::arg("nested_code"),
      py::arg("offset"), py::arg("blocksize"), py::arg("rows"), py::arg("cols"), py::arg("bias"), py::arg("out"),
      py::arg("stream") = 0);
  m.def("nf4_gemv_max_rows", &lorart::nf4_gemv_max_rows);
}

static Registrar reg("nf4", &bind);

}  // namespace
}  // namespace lorart::py
