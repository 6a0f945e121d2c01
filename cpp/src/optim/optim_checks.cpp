// Argument checks shared by the AdamW drivers (32-bit and 8-bit states).
#include "optim/optim_checks.h"

#include "common/check.h"

namespace lorart::detail {

void check_adamw_options(const AdamWOptions& o) {
  LORART_CHECK(o.lr >= 0.0, "argument `lr`: expected >= 0, got ", o.lr);
  LORART_CHECK(o.beta1 >= 0.0 && o.beta1 < 1.0, "argument `beta1`: expected in [0, 1), got ", o.beta1);
  LORART_CHECK(o.beta2 >= 0.0 && o.beta2 < 1.0, "argument `beta2`: expected in [0, 1), got ", o.beta2);
  LORART_CHECK(o.eps >= 0.0, "argument `eps`: expected >= 0, got ", o.eps);
  LORART_CHECK(o.weight_decay >= 0.0, "argument `weight_decay`: expected >= 0, got ", o.weight_decay);
}

std::string nth(const char* name, size_t i) { return cat(name, "[", i, "]"); }

void check_state(const TensorView& t, const std::string& name, std::initializer_list<DType> dtypes, int64_t numel,
                 const std::string& what, const TensorView& param0) {
  check_dtype(t, name.c_str(), dtypes);
  check_contiguous(t, name.c_str());
  LORART_CHECK(t.numel() == numel, "argument `", name, "`: expected ", numel, " elements (", what, "), got ",
               t.numel(), " (shape ", t.shape_str(), ")");
  check_same_device(param0, "params[0]", t, name.c_str());
  if (numel > 0) check_not_null(t, name.c_str());
}

AdamWScalars check_param_grad_step(const std::vector<TensorView>& params, const std::vector<TensorView>& grads,
                                   const std::vector<int64_t>& steps, size_t i, const AdamWOptions& o) {
  const std::string pn = nth("params", i), gn = nth("grads", i);
  const TensorView& p = params[i];
  check_dtype(p, pn.c_str(), {DType::F32, DType::BF16, DType::F16});
  LORART_CHECK_TYPE(grads[i].dtype == p.dtype, "argument `", gn, "`: expected dtype ", dtype_name(p.dtype),
                    " (the dtype of ", pn, "), got ", dtype_name(grads[i].dtype));
  check_contiguous(p, pn.c_str());
  if (p.numel() > 0) check_not_null(p, pn.c_str());
  if (i > 0) check_same_device(params[0], "params[0]", p, pn.c_str());
  check_state(grads[i], gn, {p.dtype}, p.numel(), cat("as ", pn), params[0]);
  LORART_CHECK(steps[i] >= 1, "argument `steps[", i, "]`: expected >= 1 (the count after this step), got ", steps[i]);
  return adamw_scalars(o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, steps[i], o.maximize);
}

}  // namespace lorart::detail
