// pybind11 bindings of the optimizer kernels (lorart/optim.h).
#include <vector>

#include "bind.h"
#include "lorart/optim.h"

namespace lorart::py {
namespace {

AdamWOptions options(double lr, double beta1, double beta2, double eps, double weight_decay, bool maximize) {
  AdamWOptions o;
  o.lr = lr;
  o.beta1 = beta1;
  o.beta2 = beta2;
  o.eps = eps;
  o.weight_decay = weight_decay;
  o.maximize = maximize;
  return o;
}

void bind(py::module_& m) {
  m.def(
      "adamw_step",
      [](const std::vector<TensorView>& params, const std::vector<TensorView>& grads,
         const std::vector<TensorView>& exp_avgs, const std::vector<TensorView>& exp_avg_sqs,
         const std::vector<int64_t>& steps, double lr, double beta1, double beta2, double eps, double weight_decay,
         bool maximize, uint64_t stream) {
        py::gil_scoped_release nogil;
        adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, options(lr, beta1, beta2, eps, weight_decay, maximize),
                   as_stream(stream));
      },
      py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("steps"),
      py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
      py::arg("maximize"), py::arg("stream"),
      "One fused AdamW step over lists of tensor views, in place (torch.optim.AdamW arithmetic).");
  m.def(
      "adamw8_step",
      [](const std::vector<TensorView>& params, const std::vector<TensorView>& grads,
         const std::vector<TensorView>& q_exp_avgs, const std::vector<TensorView>& q_exp_avg_sqs,
         const std::vector<TensorView>& absmax_exp_avgs, const std::vector<TensorView>& absmax_exp_avg_sqs,
         const std::vector<int64_t>& steps, double lr, double beta1, double beta2, double eps, double weight_decay,
         bool maximize, uint64_t stream) {
        py::gil_scoped_release nogil;
        adamw8_step(params, grads, q_exp_avgs, q_exp_avg_sqs, absmax_exp_avgs, absmax_exp_avg_sqs, steps,
                    options(lr, beta1, beta2, eps, weight_decay, maximize), as_stream(stream));
      },
      py::arg("params"), py::arg("grads"), py::arg("q_exp_avgs"), py::arg("q_exp_avg_sqs"),
      py::arg("absmax_exp_avgs"), py::arg("absmax_exp_avg_sqs"), py::arg("steps"), py::arg("lr"), py::arg("beta1"),
      py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("maximize"), py::arg("stream"),
      "One fused AdamW step with 8-bit blockwise states (uint8 codes + float32 absmax per 256), in place.");
  m.def("dynamic_map", &dynamic_map, py::arg("is_signed"),
        "bitsandbytes' sorted 256-entry dynamic map (create_dynamic_map(signed)).");
  m.def(
      "quantize_blockwise8",
      [](const TensorView& x, bool is_signed, const TensorView& q, const TensorView& absmax) {
        py::gil_scoped_release nogil;
        quantize_blockwise8(x, is_signed, q, absmax);
      },
      py::arg("x"), py::arg("is_signed"), py::arg("q"), py::arg("absmax"),
      "Blockwise (256) dynamic 8-bit quantisation of a CPU float32 tensor, the 8-bit optimizer's rule.");
  m.def(
      "dequantize_blockwise8",
      [](const TensorView& q, const TensorView& absmax, bool is_signed, const TensorView& out) {
        py::gil_scoped_release nogil;
        dequantize_blockwise8(q, absmax, is_signed, out);
      },
      py::arg("q"), py::arg("absmax"), py::arg("is_signed"), py::arg("out"), "code[q] * absmax (CPU tensors).");
}

static Registrar reg("optim", &bind);

}  // namespace
}  // namespace lorart::py
