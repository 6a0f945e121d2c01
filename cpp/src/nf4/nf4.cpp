// NF4 public API: argument checks (once) and device dispatch. CPU kernels live in
// nf4_cpu.cpp, CUDA launchers in cuda/nf4/.
#include "lorart/nf4.h"

#include "common/check.h"
#include "common/cuda_api.h"
#include "nf4/nf4_cpu.h"
#ifdef LORART_WITH_CUDA
#include "nf4/nf4_launch.h"
#endif

namespace lorart {
namespace {

using detail::check_contiguous;
using detail::check_dtype;
using detail::check_not_null;
using detail::check_same_device;

void check_blocksize(int64_t blocksize) {
  LORART_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
               "argument `blocksize`: expected a power of two in [32, 4096], got ", blocksize);
}

void check_numel(const TensorView& t, const char* name, int64_t n) {
  LORART_CHECK(t.numel() == n, "argument `", name, "`: expected ", n, " elements, got ", t.numel(), " (shape ",
               t.shape_str(), ")");
}

void check_buffer(const TensorView& t, const char* name, std::initializer_list<DType> dt, int64_t n) {
  check_dtype(t, name, dt);
  check_numel(t, name, n);
  check_contiguous(t, name);
  check_not_null(t, name);
}

}  // namespace

void nf4_check(const NF4View& w) {
  check_blocksize(w.blocksize);
  LORART_CHECK(w.rows > 0 && w.cols > 0, "NF4 weight: expected rows > 0 and cols > 0, got rows=", w.rows,
               ", cols=", w.cols);
  // (before numel(): a lying shape must not overflow rows * cols, nor the byte and block counts made from it)
  constexpr int64_t kMaxElements = int64_t{1} << 62;
  LORART_CHECK(w.cols <= kMaxElements / w.rows, "NF4 weight: rows=", w.rows, " x cols=", w.cols,
               " is too many elements (at most 2^62)");
  const int64_t n = w.numel(), nb = w.nblocks();
  check_buffer(w.packed, "packed", {DType::U8}, (n + 1) / 2);
  check_dtype(w.absmax, "absmax", {DType::F32, DType::U8});
  check_buffer(w.absmax, "absmax", {w.absmax.dtype}, nb);
  check_same_device(w.packed, "packed", w.absmax, "absmax");
  if (w.double_quant()) {
    LORART_CHECK(w.nested_absmax.data != nullptr && w.nested_code.data != nullptr,
                 "argument `absmax` is uint8 (double quantization) but `nested_absmax`/`nested_code` are missing");
    check_buffer(w.nested_absmax, "nested_absmax", {DType::F32}, (nb + kNF4NestedBlocksize - 1) / kNF4NestedBlocksize);
    check_buffer(w.nested_code, "nested_code", {DType::F32}, 256);
    check_same_device(w.packed, "packed", w.nested_absmax, "nested_absmax");
    check_same_device(w.packed, "packed", w.nested_code, "nested_code");
  } else {
    LORART_CHECK(w.nested_absmax.data == nullptr && w.nested_code.data == nullptr,
                 "argument `absmax` is float32 (no double quantization) but `nested_absmax`/`nested_code` were given");
  }
  detail::check_device_supported(w.packed, "packed");
}

void nf4_quantize(const TensorView& weight, int64_t blocksize, const TensorView& packed, const TensorView& absmax,
                  Stream stream) {
  check_blocksize(blocksize);
  check_dtype(weight, "weight", {DType::F32, DType::BF16, DType::F16});
  check_contiguous(weight, "weight");
  const int64_t n = weight.numel();
  LORART_CHECK(n > 0, "argument `weight`: expected a non-empty tensor, got shape ", weight.shape_str());
  check_not_null(weight, "weight");
  check_buffer(packed, "packed", {DType::U8}, (n + 1) / 2);
  check_buffer(absmax, "absmax", {DType::F32}, (n + blocksize - 1) / blocksize);
  check_same_device(weight, "weight", packed, "packed");
  check_same_device(weight, "weight", absmax, "absmax");
  detail::check_device_supported(weight, "weight");
  if (weight.is_cuda()) {
#ifdef LORART_WITH_CUDA
    cuda::set_device(weight.device.index);
    cuda::nf4_quantize(weight.data, weight.dtype, n, blocksize, packed.ptr<uint8_t>(), absmax.ptr<float>(), stream);
#endif
  } else {
    cpu::nf4_quantize(weight, n, blocksize, packed.ptr<uint8_t>(), absmax.ptr<float>());
  }
}

void nf4_double_quant(const TensorView& absmax, const TensorView& offset, const TensorView& code, const TensorView& q,
                      const TensorView& nested_absmax, Stream stream) {
  check_dtype(absmax, "absmax", {DType::F32});
  check_contiguous(absmax, "absmax");
  const int64_t nb = absmax.numel();
  LORART_CHECK(nb > 0, "argument `absmax`: expected a non-empty tensor");
  check_buffer(offset, "offset", {DType::F32}, 1);
  check_buffer(code, "code", {DType::F32}, 256);
  check_buffer(q, "q", {DType::U8}, nb);
  check_buffer(nested_absmax, "nested_absmax", {DType::F32}, (nb + kNF4NestedBlocksize - 1) / kNF4NestedBlocksize);
  for (const TensorView* t : {&offset, &code, &q, &nested_absmax}) check_same_device(absmax, "absmax", *t, "outputs");
  detail::check_device_supported(absmax, "absmax");
  if (absmax.is_cuda()) {
#ifdef LORART_WITH_CUDA
    cuda::set_device(absmax.device.index);
    cuda::nf4_double_quant(absmax.ptr<float>(), nb, offset.ptr<float>(), code.ptr<float>(), q.ptr<uint8_t>(),
                           nested_absmax.ptr<float>(), stream);
#endif
  } else {
    cpu::nf4_double_quant(absmax.ptr<float>(), nb, *offset.ptr<float>(), code.ptr<float>(), q.ptr<uint8_t>(),
                          nested_absmax.ptr<float>());
  }
}

void nf4_dequantize(const NF4View& w, const TensorView& out, Stream stream) {
  nf4_check(w);
  check_buffer(out, "out", {DType::F32, DType::BF16, DType::F16}, w.numel());
  check_same_device(w.packed, "packed", out, "out");
  if (out.is_cuda()) {
#ifdef LORART_WITH_CUDA
    cuda::set_device(out.device.index);
    cuda::nf4_dequantize(cuda::NF4Ptrs::from(w), out.data, out.dtype, stream);
#endif
  } else {
    cpu::nf4_dequantize(w, out);
  }
}

int64_t nf4_gemv_max_rows() { return 16; }

bool set_cpu_simd(bool enabled) { return cpu::set_simd(enabled); }
bool cpu_simd_active() { return cpu::simd_active(); }

void nf4_gemv(const TensorView& x, const NF4View& w, const TensorView& bias, const TensorView& out, Stream stream) {
  nf4_check(w);
  check_dtype(x, "x", {DType::F32, DType::BF16, DType::F16});
  detail::check_ndim(x, "x", 2);
  check_contiguous(x, "x");
  LORART_CHECK(x.shape[1] == w.cols, "argument `x`: expected ", w.cols, " columns (in_features), got shape ",
               x.shape_str());
  const int64_t m = x.shape[0];
  check_buffer(out, "out", {x.dtype}, m * w.rows);
  check_same_device(x, "x", w.packed, "packed");
  check_same_device(x, "x", out, "out");
  if (bias.data != nullptr) {
    check_buffer(bias, "bias", {x.dtype}, w.rows);
    check_same_device(x, "x", bias, "bias");
  }
  if (m == 0) return;
  check_not_null(x, "x");
  if (x.is_cuda()) {
#ifdef LORART_WITH_CUDA
    LORART_CHECK(m <= nf4_gemv_max_rows(), "argument `x`: the CUDA NF4 GEMV takes at most ", nf4_gemv_max_rows(),
                 " rows, got ", m);
    cuda::set_device(x.device.index);
    cuda::nf4_gemv(x.data, x.dtype, m, cuda::NF4Ptrs::from(w), bias.data, out.data, stream);
#endif
  } else {
    cpu::nf4_gemv(x, w, bias, out);
  }
}

}  // namespace lorart
