#include "lorart/tensor.h"

#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

#include "common/check.h"
#include "common/half.h"

namespace lorart {

int64_t checked_numel(const std::vector<int64_t>& shape, size_t itemsize, const char* what) {
  LORART_CHECK(shape.size() <= static_cast<size_t>(kMaxDims), what, ": at most ", kMaxDims, " dimensions, got ",
               shape.size());
  const int64_t max = std::numeric_limits<int64_t>::max();
  int64_t n = 1;
  for (int64_t d : shape) {
    LORART_CHECK(d >= 0, what, ": negative dimension ", d);
    LORART_CHECK(d == 0 || n <= max / d, what, ": element count overflows int64");
    n *= d;
  }
  LORART_CHECK(itemsize == 0 || n <= max / static_cast<int64_t>(itemsize), what, ": byte count overflows int64");
  return n;
}

Tensor::Tensor(DType dtype, const std::vector<int64_t>& shape) : shape_(shape) {
  int64_t n = checked_numel(shape, dtype_size(dtype), "Tensor");
  nbytes_ = static_cast<size_t>(n) * dtype_size(dtype);
  size_t alloc = (nbytes_ + 63) / 64 * 64;
  if (alloc == 0) alloc = 64;
  void* p = std::aligned_alloc(64, alloc);
  if (!p) detail::fail(ErrorKind::Runtime, detail::cat("Tensor: out of memory allocating ", alloc, " bytes"));
  std::memset(p, 0, alloc);
  data_ = std::shared_ptr<uint8_t>(static_cast<uint8_t*>(p), [](uint8_t* q) { std::free(q); });
  view_ = TensorView(p, dtype, static_cast<int>(shape.size()), shape.data());
}

Tensor Tensor::copy_of(const TensorView& v) {
  LORART_CHECK(!v.is_cuda(), "Tensor::copy_of: expected a CPU view, got ", device_name(v.device));
  std::vector<int64_t> shape(v.shape, v.shape + v.ndim);
  Tensor t(v.dtype, shape);
  int64_t n = t.numel();
  if (n == 0) return t;
  detail::check_not_null(v, "Tensor::copy_of");
  size_t isz = dtype_size(v.dtype);
  if (v.is_contiguous()) {
    std::memcpy(t.data(), v.data, t.nbytes());
    return t;
  }
  int64_t idx[kMaxDims] = {};
  const uint8_t* src = static_cast<const uint8_t*>(v.data);
  uint8_t* dst = t.ptr<uint8_t>();
  for (int64_t i = 0; i < n; ++i) {
    int64_t off = 0;
    for (int d = 0; d < v.ndim; ++d) off += idx[d] * v.strides[d];
    std::memcpy(dst + i * isz, src + off * static_cast<int64_t>(isz), isz);
    for (int d = v.ndim - 1; d >= 0; --d) {
      if (++idx[d] < v.shape[d]) break;
      idx[d] = 0;
    }
  }
  return t;
}

namespace {
bool is_float(DType d) { return d == DType::F32 || d == DType::F16 || d == DType::BF16 || d == DType::F64; }
double load_float(const void* p, DType d, int64_t i) {
  switch (d) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::F64: return static_cast<const double*>(p)[i];
    case DType::F16: return detail::f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return detail::bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}
void store_float(void* p, DType d, int64_t i, double v) {
  switch (d) {
    case DType::F32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case DType::F64: static_cast<double*>(p)[i] = v; break;
    case DType::F16: static_cast<uint16_t*>(p)[i] = detail::f32_to_f16(static_cast<float>(v)); break;
    default: static_cast<uint16_t*>(p)[i] = detail::f32_to_bf16(static_cast<float>(v)); break;
  }
}
}  // namespace

Tensor Tensor::to(DType dtype) const {
  if (dtype == this->dtype()) return copy_of(view_);
  LORART_CHECK_TYPE(is_float(dtype) && is_float(this->dtype()), "Tensor::to: cannot convert ",
                    dtype_name(this->dtype()), " to ", dtype_name(dtype), " (float dtypes only)");
  Tensor t(dtype, shape_);
  int64_t n = numel();
  // float64 -> half goes through float32 (double rounding is acceptable here).
  for (int64_t i = 0; i < n; ++i) store_float(t.data(), dtype, i, load_float(data(), this->dtype(), i));
  return t;
}

}  // namespace lorart
