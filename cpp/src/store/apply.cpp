// The store's apply: checks naming the adapter and module, then the shared LoRA kernel
// (lorart::lora_grouped_add) with one adapter per call and per-row indices.
#include <vector>

#include "common/check.h"
#include "lorart/adapter_store.h"
#include "lorart/lora.h"
#include "store/apply.h"

namespace lorart::detail {

void check_apply_args(const TensorView& x, const TensorView& y, const char* what) {
  check_dtype(x, "x", {DType::F32, DType::BF16, DType::F16});
  const std::pair<const TensorView*, const char*> all[] = {{&x, "x"}, {&y, "y"}};
  for (const auto& t : all) {
    LORART_CHECK(!t.first->is_cuda(), what, ": argument `", t.second, "` is on ", device_name(t.first->device),
                 "; the adapter store computes on the CPU");
    check_ndim(*t.first, t.second, 2);
    check_contiguous(*t.first, t.second);
  }
  LORART_CHECK(y.dtype == x.dtype, what, ": argument `y`: expected dtype ", dtype_name(x.dtype), " (x's), got ",
               dtype_name(y.dtype));
  LORART_CHECK(y.shape[0] == x.shape[0], what, ": x has ", x.shape[0], " rows but y has ", y.shape[0]);
}

void apply_rows(const Adapter& a, const std::string& module, const LoraPair& p, const TensorView& x,
                const TensorView& y, const std::vector<int64_t>& idx, const char* what) {
  const int64_t M = x.shape[0], K = x.shape[1], r = p.rank(), N = p.out_features();
  LORART_CHECK(p.in_features() == K, what, ": x has ", K, " features but lora_A is ", p.A.view().shape_str(),
               " (expected [", r, ", ", K, "])");
  LORART_CHECK(y.shape[1] == N, what, ": expected y of shape [", M, ", ", N, "] (lora_B is ",
               p.B.view().shape_str(), "), got ", y.shape_str());
  if (M == 0 || N == 0) return;
  Tensor A = p.A, B = p.B;
  if (A.dtype() != x.dtype) A = A.to(x.dtype);
  if (B.dtype() != x.dtype) B = B.to(x.dtype);
  int32_t rank = static_cast<int32_t>(r);
  float scale = p.scaling.value_or(a.scaling);
  Tensor ws(DType::F32, {M, r});
  TensorView A3(A.data(), A.dtype(), {1, r, K}), B3(B.data(), B.dtype(), {1, N, r});
  lora_grouped_add(y, x, A3, B3, TensorView(&rank, DType::I32, {1}), TensorView(&scale, DType::F32, {1}),
                   TensorView(const_cast<int64_t*>(idx.data()), DType::I64, {M}), ws.view());
}

}  // namespace lorart::detail
