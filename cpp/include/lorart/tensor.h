// lorart::Tensor: a minimal owning, contiguous CPU tensor (64-byte aligned buffer)
// for the I/O and adapter-store code. Kernels take `view()` (lorart::TensorView).
// Copies share the buffer (like torch.Tensor); `Tensor::copy_of(t.view())` is a deep copy.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <vector>

#include "lorart/common.h"

namespace lorart {

class Tensor {
 public:
  Tensor() = default;
  // Zero-filled tensor of the given dtype and shape (throws on a negative dim or overflow).
  Tensor(DType dtype, const std::vector<int64_t>& shape);
  Tensor(DType dtype, std::initializer_list<int64_t> shape) : Tensor(dtype, std::vector<int64_t>(shape)) {}
  // A contiguous copy of a CPU view (any strides).
  static Tensor copy_of(const TensorView& v);

  bool defined() const { return data_ != nullptr || view_.ndim > 0; }
  DType dtype() const { return view_.dtype; }
  int ndim() const { return view_.ndim; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t size(int dim) const { return view_.size(dim); }
  int64_t numel() const { return view_.numel(); }
  size_t nbytes() const { return nbytes_; }
  void* data() const { return data_.get(); }
  template <class T> T* ptr() const { return static_cast<T*>(data()); }
  const TensorView& view() const { return view_; }

  // A converted copy: float32/float16/bfloat16/float64 convert to each other (round to
  // nearest even); other dtypes only to themselves.
  Tensor to(DType dtype) const;

 private:
  std::shared_ptr<uint8_t> data_;
  size_t nbytes_ = 0;
  std::vector<int64_t> shape_;
  TensorView view_;
};

// Element count of `shape`, or an Error naming `what` if a dim is negative or the
// product (times `itemsize` bytes) overflows int64.
int64_t checked_numel(const std::vector<int64_t>& shape, size_t itemsize, const char* what);

}  // namespace lorart
