// CPU LoRA apply for the adapter store: y[rows] += s * (x[rows] @ A.T) @ B.T,
// accumulated in float32.
#include <algorithm>
#include <utility>
#include <vector>

#include "common/check.h"
#include "common/half.h"
#include "common/parallel.h"
#include "lorart/adapter_store.h"

namespace lorart {

namespace {
inline float ld(const void* p, DType d, int64_t i) {
  switch (d) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::BF16: return detail::bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return detail::f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}
inline void st(void* p, DType d, int64_t i, float v) {
  switch (d) {
    case DType::F32: static_cast<float*>(p)[i] = v; break;
    case DType::BF16: static_cast<uint16_t*>(p)[i] = detail::f32_to_bf16(v); break;
    default: static_cast<uint16_t*>(p)[i] = detail::f32_to_f16(v); break;
  }
}
}  // namespace

void lora_apply_cpu(const TensorView& x, const TensorView& A, const TensorView& B, float scaling,
                    const TensorView& y, const std::vector<int64_t>* rows, const char* what) {
  const std::initializer_list<DType> floats = {DType::F32, DType::BF16, DType::F16};
  detail::check_dtype(x, "x", floats);
  detail::check_dtype(A, "lora_A", floats);
  detail::check_dtype(B, "lora_B", floats);
  detail::check_dtype(y, "y", floats);
  const std::pair<const TensorView*, const char*> all[] = {{&x, "x"}, {&A, "lora_A"}, {&B, "lora_B"}, {&y, "y"}};
  for (const auto& t : all) {
    LORART_CHECK(!t.first->is_cuda(), what, ": argument `", t.second, "` is on ", device_name(t.first->device),
                 "; the adapter store computes on the CPU");
    detail::check_contiguous(*t.first, t.second);
  }
  detail::check_ndim(x, "x", 2);
  detail::check_ndim(y, "y", 2);
  detail::check_ndim(A, "lora_A", 2);
  detail::check_ndim(B, "lora_B", 2);
  const int64_t n = x.shape[0], in = x.shape[1], r = A.shape[0], out = B.shape[0];
  LORART_CHECK(A.shape[1] == in, what, ": x has ", in, " features but lora_A is ", A.shape_str(),
               " (expected [r, ", in, "])");
  LORART_CHECK(B.shape[1] == r, what, ": lora_B is ", B.shape_str(), " but lora_A has rank ", r);
  LORART_CHECK(y.shape[0] == n && y.shape[1] == out, what, ": expected y of shape [", n, ", ", out, "], got ",
               y.shape_str());
  if (rows)
    for (int64_t i : *rows) LORART_CHECK(i >= 0 && i < n, what, ": row index ", i, " out of range [0, ", n, ")");
  const int64_t m = rows ? static_cast<int64_t>(rows->size()) : n;
  if (m == 0 || out == 0) return;
  detail::check_not_null(x, "x");
  detail::check_not_null(y, "y");
  const int64_t work = (in + out) * (r > 0 ? r : 1);
  detail::parallel_for(m, std::max<int64_t>(1, 65536 / std::max<int64_t>(work, 1)), [&](int64_t b, int64_t e) {
    std::vector<float> h(static_cast<size_t>(r));
    for (int64_t k = b; k < e; ++k) {
      const int64_t i = rows ? (*rows)[k] : k;
      for (int64_t j = 0; j < r; ++j) {
        float acc = 0.f;
        for (int64_t c = 0; c < in; ++c) acc += ld(x.data, x.dtype, i * in + c) * ld(A.data, A.dtype, j * in + c);
        h[j] = acc;
      }
      for (int64_t o = 0; o < out; ++o) {
        float acc = 0.f;
        for (int64_t j = 0; j < r; ++j) acc += h[j] * ld(B.data, B.dtype, o * r + j);
        st(y.data, y.dtype, i * out + o, ld(y.data, y.dtype, i * out + o) + scaling * acc);
      }
    }
  });
}

}  // namespace lorart
