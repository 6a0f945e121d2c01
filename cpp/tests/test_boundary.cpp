// The public API's layout checks: a view whose strides a kernel does not handle is refused with an error
// naming the argument (never read as if contiguous); zero-size views of any strides are fine; a CUDA view
// on a build without CUDA kernels is a clear error and is never dereferenced.
#include <cstdint>
#include <vector>

#include "lorart/act.h"
#include "lorart/lora.h"
#include "lorart/nf4.h"
#include "lorart/norm.h"
#include "testing.h"

using namespace lorart;

namespace {

TensorView strided(void* p, DType dt, std::initializer_list<int64_t> shape, std::initializer_list<int64_t> strides,
                   Device dev = {}) {
  std::vector<int64_t> sh(shape), st(strides);
  return TensorView(p, dt, static_cast<int>(sh.size()), sh.data(), st.data(), dev);
}

}  // namespace

TEST(non_contiguous_views_are_refused_by_name) {
  std::vector<float> a(4096, 0.5f), b(4096, 0.25f), c(4096), d(4096);
  // rms_norm: a weight with stride 2
  CHECK_THROWS(rms_norm(TensorView(a.data(), DType::F32, {4, 8}), strided(b.data(), DType::F32, {8}, {2}), 1e-6,
                        TensorView(c.data(), DType::F32, {4, 8}), TensorView(d.data(), DType::F32, {4})),
               "argument `weight`: expected a contiguous tensor");
  // lora_merge: a transposed A
  CHECK_THROWS(lora_merge(TensorView(a.data(), DType::F32, {8, 16}), strided(b.data(), DType::F32, {4, 16}, {1, 4}),
                          TensorView(c.data(), DType::F32, {8, 4}), 1.0),
               "argument `A`: expected a contiguous tensor");
  // lora_dropout: x with a non-unit inner stride
  CHECK_THROWS(lora_dropout(strided(a.data(), DType::F32, {4, 8}, {1, 4}), TensorView(c.data(), DType::F32, {4, 8}),
                            0.1, 1),
               "argument `x`: expected unit stride");
  // swiglu: up as a broadcast (stride 0)
  CHECK_THROWS(swiglu(TensorView(a.data(), DType::F32, {4, 8}), strided(b.data(), DType::F32, {4, 8}, {0, 1}),
                      TensorView(c.data(), DType::F32, {4, 8})),
               "argument `up`: expected a contiguous tensor");
  // nf4_dequantize: packed bytes with stride 2
  std::vector<uint8_t> packed(64);
  NF4View w;
  w.packed = strided(packed.data(), DType::U8, {32}, {2});
  w.absmax = TensorView(a.data(), DType::F32, {1});
  w.rows = 8;
  w.cols = 8;
  CHECK_THROWS(nf4_dequantize(w, TensorView(c.data(), DType::F32, {8, 8})), "argument `packed`: expected a contiguous");
}

TEST(zero_size_views_of_any_strides_are_contiguous) {
  CHECK(strided(nullptr, DType::F32, {0, 5}, {1, 0}).is_contiguous());
  CHECK(strided(nullptr, DType::F32, {5, 0}, {1, 5}).is_contiguous());
  std::vector<float> w(5, 1.f);
  rms_norm(strided(nullptr, DType::F32, {0, 5}, {1, 7}), TensorView(w.data(), DType::F32, {5}), 1e-6,
           strided(nullptr, DType::F32, {0, 5}, {1, 3}), TensorView(nullptr, DType::F32, {0}));
}

TEST(cuda_view_without_usable_gpu_is_a_clear_error) {
  if (cuda_device_count() > 0) return;  // a CPU-only build, or a CUDA build on a machine without a usable GPU
  const Device gpu{DeviceType::CUDA, 0};
  void* dangling = reinterpret_cast<void*>(uintptr_t(0x1000));  // never dereferenced
  NF4View w;
  w.packed = TensorView(dangling, DType::U8, {32, 1}, gpu);
  w.absmax = TensorView(dangling, DType::F32, {1}, gpu);
  w.rows = 8;
  w.cols = 8;
  // "... built without CUDA kernels" or "CUDA error in cudaGetDevice: ... (no usable CUDA driver/GPU ...)"
  CHECK_THROWS(nf4_dequantize(w, TensorView(dangling, DType::F32, {8, 8}, gpu)), "CUDA");
}

TEST_MAIN()
