// Public LoRA API: argument checks (once) and CPU / CUDA dispatch.
#include "lorart/lora.h"

#include <cmath>

#include "common/check.h"
#include "lora/lora_cpu.h"
#include "nf4/nf4_cpu.h"
#ifdef LORART_WITH_CUDA
#include "common/cuda_api.h"
#include "lora/lora_launch.h"
#include "nf4/nf4_launch.h"
#endif

namespace lorart {
namespace {

using detail::cat;

constexpr std::initializer_list<DType> kFloat = {DType::F32, DType::BF16, DType::F16, DType::F64};

// [rows, cols] with unit inner stride (rows may be strided).
void check_matrix(const TensorView& t, const char* name) {
  detail::check_ndim(t, name, 2);
  detail::check_not_null(t, name);
  LORART_CHECK(t.shape[1] <= 1 || t.strides[1] == 1, "argument `", name,
               "`: expected unit stride along the last dimension, got strides [", t.strides[0], ", ", t.strides[1],
               "]");
  LORART_CHECK(t.shape[0] <= 1 || t.strides[0] >= t.shape[1], "argument `", name, "`: overlapping rows (stride ",
               t.strides[0], " for ", t.shape[1], " columns)");
}

void check_same_dtype(const TensorView& t, const char* name, const TensorView& ref, const char* ref_name) {
  LORART_CHECK_TYPE(t.dtype == ref.dtype, "argument `", name, "`: expected dtype ", dtype_name(ref.dtype), " (as `",
                    ref_name, "`), got ", dtype_name(t.dtype));
}

void check_device(const TensorView& t, const char* name, const TensorView& ref, const char* ref_name) {
  detail::check_same_device(ref, ref_name, t, name);
}

void check_cuda_dtype(const TensorView& t, const char* name) {
  if (t.is_cuda())
    LORART_CHECK_TYPE(t.dtype != DType::F64, "argument `", name,
                      "`: float64 is supported on the CPU only (CUDA: float32|bfloat16|float16)");
}

void check_p(double p) {
  LORART_CHECK(p >= 0.0 && p < 1.0, "argument `p`: expected a dropout probability in [0, 1), got ", p);
}

DType acc_dtype(DType d) { return d == DType::F64 ? DType::F64 : DType::F32; }

// x [M, K], A [r, K], xa [M, r] (float32, float64 for float64 x).
void check_shrink(const TensorView& x, const TensorView& A, const TensorView& xa) {
  check_matrix(x, "x");
  detail::check_dtype(x, "x", kFloat);
  check_cuda_dtype(x, "x");
  detail::check_device_supported(x, "x");
  detail::check_contiguous(A, "A");
  check_same_dtype(A, "A", x, "x");
  detail::check_shape(A, "A", {-1, x.shape[1]});
  check_device(A, "A", x, "x");
  detail::check_contiguous(xa, "xa");
  detail::check_dtype(xa, "xa", {acc_dtype(x.dtype)});
  detail::check_shape(xa, "xa", {x.shape[0], A.shape[0]});
  check_device(xa, "xa", x, "x");
}

// y [M, N] = ... + scale * xa @ B.T: B [N, r], bias [N] or null.
void check_out(const TensorView& x, const TensorView& xa, const TensorView& B, const TensorView& bias,
               const TensorView& y, int64_t N) {
  detail::check_contiguous(xa, "xa");
  detail::check_dtype(xa, "xa", {acc_dtype(x.dtype)});
  detail::check_shape(xa, "xa", {x.shape[0], -1});
  detail::check_not_null(xa, "xa");
  check_device(xa, "xa", x, "x");
  detail::check_contiguous(B, "B");
  check_same_dtype(B, "B", x, "x");
  detail::check_shape(B, "B", {N, xa.shape[1]});
  detail::check_not_null(B, "B");
  check_device(B, "B", x, "x");
  if (bias.data) {
    detail::check_contiguous(bias, "bias");
    check_same_dtype(bias, "bias", x, "x");
    detail::check_shape(bias, "bias", {N});
    check_device(bias, "bias", x, "x");
  }
  check_matrix(y, "y");
  check_same_dtype(y, "y", x, "x");
  detail::check_shape(y, "y", {x.shape[0], N});
  check_device(y, "y", x, "x");
}

}  // namespace

void lora_dropout(const TensorView& x, const TensorView& out, double p, uint64_t seed, Stream stream) {
  check_matrix(x, "x");
  detail::check_dtype(x, "x", kFloat);
  check_cuda_dtype(x, "x");
  detail::check_device_supported(x, "x");
  check_matrix(out, "out");
  check_same_dtype(out, "out", x, "x");
  detail::check_shape(out, "out", {x.shape[0], x.shape[1]});
  check_device(out, "out", x, "x");
  check_p(p);
  if (x.numel() == 0) return;
  if (x.is_cuda()) {
#ifdef LORART_WITH_CUDA
    cuda::set_device(x.device.index);
    cuda::lora_dropout(x.dtype, x.data, x.strides[0], out.data, out.strides[0], x.shape[0], x.shape[1], p, seed,
                       stream);
#endif
  } else {
    detail::cpu_lora_dropout(x, out, p, seed);
  }
}

void lora_shrink(const TensorView& x, const TensorView& A, double p, uint64_t seed, const TensorView& xa,
                 Stream stream) {
  check_shrink(x, A, xa);
  check_p(p);
  if (xa.numel() == 0) return;
  if (x.is_cuda()) {
#ifdef LORART_WITH_CUDA
    cuda::set_device(x.device.index);
    cuda::lora_shrink(x.dtype, x.data, x.strides[0], A.data, x.shape[0], x.shape[1], A.shape[0], p, seed,
                      xa.ptr<float>(), stream);
#endif
  } else {
    detail::cpu_lora_shrink(x, A, p, seed, xa);
  }
}

int64_t lora_fused_max_rows() { return 16; }

void lora_fused_linear(const TensorView& x, const TensorView& W, const TensorView& bias, const TensorView& xa,
                       const TensorView& B, double scale, const TensorView& y, Stream stream) {
  check_matrix(x, "x");
  detail::check_dtype(x, "x", kFloat);
  check_cuda_dtype(x, "x");
  detail::check_device_supported(x, "x");
  LORART_CHECK(x.shape[0] <= lora_fused_max_rows(), "argument `x`: the fused small-M path takes at most ",
               lora_fused_max_rows(), " rows, got ", x.shape[0]);
  detail::check_contiguous(W, "W");
  check_same_dtype(W, "W", x, "x");
  detail::check_shape(W, "W", {-1, x.shape[1]});
  check_device(W, "W", x, "x");
  check_out(x, xa, B, bias, y, W.shape[0]);
  if (y.numel() == 0) return;
  if (x.is_cuda()) {
#ifdef LORART_WITH_CUDA
    cuda::set_device(x.device.index);
    cuda::lora_fused_linear(x.dtype, x.data, x.strides[0], W.data, bias.data, xa.ptr<float>(), B.data, B.shape[1],
                            static_cast<float>(scale), y.data, y.strides[0], x.shape[0], W.shape[0], x.shape[1],
                            stream);
#endif
  } else {
    detail::cpu_lora_fused_linear(x, W, bias, xa, B, scale, y);
  }
}

void lora_fused_linear_nf4(const TensorView& x, const NF4View& W, const TensorView& bias, const TensorView& xa,
                           const TensorView& B, double scale, const TensorView& y, Stream stream) {
  check_matrix(x, "x");
  detail::check_contiguous(x, "x");  // (the NF4 GEMV reads x and writes y densely)
  detail::check_contiguous(y, "y");
  detail::check_dtype(x, "x", {DType::F32, DType::BF16, DType::F16});
  detail::check_device_supported(x, "x");
  LORART_CHECK(x.shape[0] <= lora_fused_max_rows(), "argument `x`: the fused small-M path takes at most ",
               lora_fused_max_rows(), " rows, got ", x.shape[0]);
  nf4_check(W);
  LORART_CHECK(W.cols == x.shape[1], "argument `cols`: expected ", x.shape[1], " (x's last dimension), got ",
               W.cols);
  check_device(W.packed, "packed", x, "x");
  check_out(x, xa, B, bias, y, W.rows);
  if (y.numel() == 0) return;
  // The NF4 GEMV of lorart/nf4.h (one decode and one rounding rule for every NF4 layer) with the LoRA term
  // folded in before its one rounding.
  if (x.is_cuda()) {
#ifdef LORART_WITH_CUDA
    cuda::set_device(x.device.index);
    cuda::NF4Addend add{xa.ptr<float>(), B.data, B.shape[1], static_cast<float>(scale)};
    cuda::nf4_gemv(x.data, x.dtype, x.shape[0], cuda::NF4Ptrs::from(W), bias.data, y.data, stream, add);
#endif
  } else {
    const cpu::GemvLora add{xa.ptr<float>(), B.data, B.shape[1], static_cast<float>(scale)};
    cpu::nf4_gemv(x, W, bias, y, &add);
  }
}

void lora_grouped_add(const TensorView& y, const TensorView& x, const TensorView& A_stack, const TensorView& B_stack,
                      const TensorView& ranks, const TensorView& scales, const TensorView& idx,
                      const TensorView& xa_ws, Stream stream) {
  check_matrix(x, "x");
  detail::check_dtype(x, "x", kFloat);
  check_cuda_dtype(x, "x");
  detail::check_device_supported(x, "x");
  detail::check_ndim(A_stack, "A_stack", 3);
  detail::check_contiguous(A_stack, "A_stack");
  check_same_dtype(A_stack, "A_stack", x, "x");
  detail::check_shape(A_stack, "A_stack", {-1, -1, x.shape[1]});
  check_device(A_stack, "A_stack", x, "x");
  const int64_t L = A_stack.shape[0], RM = A_stack.shape[1];
  detail::check_contiguous(B_stack, "B_stack");
  check_same_dtype(B_stack, "B_stack", x, "x");
  detail::check_shape(B_stack, "B_stack", {L, -1, RM});
  check_device(B_stack, "B_stack", x, "x");
  const int64_t N = B_stack.shape[1];
  detail::check_contiguous(ranks, "ranks");
  detail::check_dtype(ranks, "ranks", {DType::I32});
  detail::check_shape(ranks, "ranks", {L});
  check_device(ranks, "ranks", x, "x");
  detail::check_contiguous(scales, "scales");
  detail::check_dtype(scales, "scales", {DType::F32});
  detail::check_shape(scales, "scales", {L});
  check_device(scales, "scales", x, "x");
  detail::check_ndim(idx, "adapter_idx", 1);
  detail::check_dtype(idx, "adapter_idx", {DType::I32, DType::I64});
  detail::check_shape(idx, "adapter_idx", {x.shape[0]});
  check_device(idx, "adapter_idx", x, "x");
  detail::check_contiguous(xa_ws, "xa_ws");
  detail::check_dtype(xa_ws, "xa_ws", {acc_dtype(x.dtype)});
  detail::check_shape(xa_ws, "xa_ws", {x.shape[0], RM});
  check_device(xa_ws, "xa_ws", x, "x");
  check_matrix(y, "y");
  check_same_dtype(y, "y", x, "x");
  detail::check_shape(y, "y", {x.shape[0], N});
  check_device(y, "y", x, "x");
  // Index and rank ranges are checked here on the CPU; on CUDA (where reading them back would synchronise) the
  // kernels treat an index outside [0, L) as "no adapter" and the Python layer validates what it builds.
  if (!x.is_cuda()) {
    for (int64_t a = 0; a < L; ++a) {
      const int32_t r = ranks.ptr<int32_t>()[a];
      LORART_CHECK(r >= 0 && r <= RM, "argument `ranks`: ranks[", a, "] = ", r, " is outside [0, ", RM, "]");
    }
    for (int64_t m = 0; m < x.shape[0]; ++m) {
      const int64_t i = idx.dtype == DType::I64 ? idx.ptr<int64_t>()[m * idx.strides[0]]
                                                : idx.ptr<int32_t>()[m * idx.strides[0]];
      LORART_CHECK(i >= -1 && i < L, "argument `adapter_idx`: adapter_idx[", m, "] = ", i, " is outside [-1, ", L,
                   ")");
    }
  }
  if (y.numel() == 0) return;
  if (x.is_cuda()) {
#ifdef LORART_WITH_CUDA
    cuda::set_device(x.device.index);
    cuda::lora_grouped_add(x.dtype, y.data, y.strides[0], x.data, x.strides[0], A_stack.data, B_stack.data,
                           ranks.ptr<int32_t>(), scales.ptr<float>(), idx.data, idx.dtype == DType::I64,
                           idx.strides[0], xa_ws.ptr<float>(), x.shape[0], N, x.shape[1], RM, L, stream);
#endif
  } else {
    detail::cpu_lora_grouped_add(y, x, A_stack, B_stack, ranks, scales, idx, xa_ws);
  }
}

namespace {
void check_merge(const TensorView& W, const TensorView& A, const TensorView& B, double scale) {
  detail::check_ndim(W, "W", 2);
  detail::check_contiguous(W, "W");
  detail::check_dtype(W, "W", kFloat);
  check_cuda_dtype(W, "W");
  detail::check_device_supported(W, "W");
  detail::check_contiguous(A, "A");
  check_same_dtype(A, "A", W, "W");
  detail::check_shape(A, "A", {-1, W.shape[1]});
  check_device(A, "A", W, "W");
  detail::check_contiguous(B, "B");
  check_same_dtype(B, "B", W, "W");
  detail::check_shape(B, "B", {W.shape[0], A.shape[0]});
  check_device(B, "B", W, "W");
  LORART_CHECK(std::isfinite(scale), "argument `scale`: expected a finite number, got ", scale);
}
}  // namespace

void lora_merge(const TensorView& W, const TensorView& A, const TensorView& B, double scale, Stream stream) {
  check_merge(W, A, B, scale);
  if (W.numel() == 0) return;
  if (W.is_cuda()) {
#ifdef LORART_WITH_CUDA
    cuda::set_device(W.device.index);
    cuda::lora_merge(W.dtype, W.data, A.data, B.data, W.shape[0], W.shape[1], A.shape[0], static_cast<float>(scale),
                     nullptr, stream);
#endif
  } else {
    detail::cpu_lora_merge(W, A, B, scale);
  }
}

void lora_merge_count_nonfinite(const TensorView& W, const TensorView& A, const TensorView& B, double scale,
                                const TensorView& count, Stream stream) {
  check_merge(W, A, B, scale);
  detail::check_dtype(count, "count", {DType::I32});
  detail::check_shape(count, "count", {1});
  check_device(count, "count", W, "W");
  if (W.is_cuda()) {
#ifdef LORART_WITH_CUDA
    cuda::set_device(W.device.index);
    cuda::lora_merge(W.dtype, W.data, A.data, B.data, W.shape[0], W.shape[1], A.shape[0], static_cast<float>(scale),
                     count.ptr<int32_t>(), stream);
#endif
  } else {
    const int64_t c = W.numel() ? detail::cpu_lora_merge_count_nonfinite(W, A, B, scale) : 0;
    count.ptr<int32_t>()[0] = static_cast<int32_t>(c > INT32_MAX ? INT32_MAX : c);
  }
}

}  // namespace lorart
