// pybind11 bindings of the optimizer kernels (lorart/optim.h).
#include <vector>

#include "bind.h"
#include "lorart/optim.h"

namespace lorart::py {
namespace {

void bind(py::module_& m) {
  m.def(
      "adamw_step",
      [](const std::vector<TensorView>& params, const std::vector<TensorView>& grads,
         const std::vector<TensorView>& exp_avgs, const std::vector<TensorView>& exp_avg_sqs,
         const std::vector<int64_t>& steps, double lr, double beta1, double beta2, double eps, double weight_decay,
         bool maximize, uint64_t stream) {
        AdamWOptions o;
        o.lr = lr;
        o.beta1 = beta1;
        o.beta2 = beta2;
        o.eps = eps;
        o.weight_decay = weight_decay;
        o.maximize = maximize;
        py::gil_scoped_release nogil;
        adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, o, as_stream(stream));
      },
      py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("steps"),
      py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
      py::arg("maximize"), py::arg("stream"),
      "One fused AdamW step over lists of tensor views, in place (torch.optim.AdamW arithmetic).");
}

static Registrar reg("optim", &bind);

}  // namespace
}  // namespace lorart::py
