// lorart::Tensor: allocation, shared copies, strided deep copies, dtype conversion.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/half.h"
#include "lorart/tensor.h"
#include "testing.h"

using namespace lorart;

TEST(alloc_zeroed_aligned) {
  Tensor t(DType::F32, {3, 5});
  CHECK(t.defined() && t.ndim() == 2 && t.numel() == 15 && t.nbytes() == 60);
  CHECK(reinterpret_cast<uintptr_t>(t.data()) % 64 == 0);
  for (int i = 0; i < 15; ++i) CHECK(t.ptr<float>()[i] == 0.f);
  CHECK(t.view().is_contiguous() && t.view().shape[1] == 5 && t.view().strides[0] == 5);
  Tensor e(DType::BF16, {0, 4});
  CHECK(e.numel() == 0 && e.nbytes() == 0);
  CHECK(!Tensor().defined());
  CHECK_THROWS(Tensor(DType::F32, {-1}), "negative dimension -1");
  CHECK_THROWS(Tensor(DType::F32, {int64_t(1) << 40, int64_t(1) << 40}), "overflows int64");
  CHECK_THROWS(Tensor(DType::F64, {int64_t(1) << 61}), "byte count overflows");
}

TEST(copies_share_copy_of_is_deep_and_strided) {
  Tensor a(DType::F32, {2, 3});
  for (int i = 0; i < 6; ++i) a.ptr<float>()[i] = static_cast<float>(i);
  Tensor shared = a;
  shared.ptr<float>()[0] = 42.f;
  CHECK(a.ptr<float>()[0] == 42.f);
  Tensor deep = Tensor::copy_of(a.view());
  deep.ptr<float>()[1] = -1.f;
  CHECK(a.ptr<float>()[1] == 1.f);
  // the transpose of a [2, 3] as a strided view -> contiguous [3, 2]
  int64_t sh[2] = {3, 2}, st[2] = {1, 3};
  Tensor tr = Tensor::copy_of(TensorView(a.data(), DType::F32, 2, sh, st));
  const float expect[6] = {42, 3, 1, 4, 2, 5};
  for (int i = 0; i < 6; ++i) CHECK(tr.ptr<float>()[i] == expect[i]);
  TensorView cuda_view(a.data(), DType::F32, {6}, Device{DeviceType::CUDA, 0});
  CHECK_THROWS(Tensor::copy_of(cuda_view), "expected a CPU view");
}

TEST(dtype_conversion) {
  Tensor a(DType::F32, {4});
  const float v[4] = {1.0f, -2.5f, 1.00390625f /* 1 + 2^-8: a bf16 tie */, 65520.f /* f16 overflow */};
  std::memcpy(a.data(), v, sizeof v);
  Tensor b = a.to(DType::BF16);
  CHECK(b.dtype() == DType::BF16 && b.shape() == a.shape());
  CHECK(detail::bf16_to_f32(b.ptr<uint16_t>()[1]) == -2.5f);
  CHECK(detail::bf16_to_f32(b.ptr<uint16_t>()[2]) == 1.0f);  // ties to even
  Tensor h = a.to(DType::F16);
  CHECK(detail::f16_to_f32(h.ptr<uint16_t>()[0]) == 1.0f);
  CHECK(std::isinf(detail::f16_to_f32(h.ptr<uint16_t>()[3])));
  Tensor back = b.to(DType::F32);
  CHECK(back.ptr<float>()[1] == -2.5f);
  Tensor d = a.to(DType::F64);
  CHECK(d.ptr<double>()[2] == 1.00390625);
  CHECK_THROWS(a.to(DType::I32), "cannot convert float32 to int32");
}

TEST_MAIN()
