// RMSNorm: argument checks, device dispatch and the CPU kernels (rows in parallel; backward sums the
// weight gradient over per-chunk partials).
#include <algorithm>
#include <vector>

#include "common/check.h"
#include "common/cpu_loop.h"
#include "common/parallel.h"
#include "lorart/detail/norm_math.h"
#include "lorart/norm.h"
#ifdef LORART_WITH_CUDA
#include "common/cuda_api.h"
#include "norm/norm_launch.h"
#endif

namespace lorart {
namespace {

using detail::Compute;
using detail::load;
using detail::store;
using detail::sum8;
// a float value rounded to T's precision and widened back (identity for float and double)
template <class T, class F> inline F round_to(F v) { return load(store<T>(v)); }

template <class T, class F = typename Compute<T>::type>
LORART_CPU_CLONES void forward_row(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, F* rstd,
                                    int64_t h, F eps) {
  const F r = detail::rms_rstd<F>(sum8(h, [&](int64_t j) { const F v = load(x[j]); return v * v; }), h, eps);
  *rstd = r;
  for (int64_t j = 0; j < h; ++j) y[j] = store<T>(load(w[j]) * round_to<T>(load(x[j]) * r));
}

template <class T, class F = typename Compute<T>::type>
LORART_CPU_CLONES void backward_row(const T* __restrict__ x, const T* __restrict__ w, F r, const T* __restrict__ dy,
                                     T* __restrict__ dx, F* __restrict__ dw, int64_t h) {
  const F c = sum8(h, [&](int64_t j) { return round_to<T>(load(dy[j]) * load(w[j])) * (load(x[j]) * r); }) / F(h);
  for (int64_t j = 0; j < h; ++j) {
    const F n = load(x[j]) * r;
    dx[j] = store<T>(detail::rms_dx<F>(round_to<T>(load(dy[j]) * load(w[j])), n, r, c));
  }
  if (dw != nullptr)
    for (int64_t j = 0; j < h; ++j) dw[j] += load(dy[j]) * round_to<T>(load(x[j]) * r);
}

template <class T>
void cpu_forward(const TensorView& x, const TensorView& w, double eps, const TensorView& y, const TensorView& rstd) {
  using F = typename Compute<T>::type;
  const int64_t rows = x.shape[0], h = x.shape[1];
  detail::parallel_for(rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(h, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      forward_row<T>(x.ptr<const T>() + i * h, w.ptr<const T>(), y.ptr<T>() + i * h, rstd.ptr<F>() + i, h, F(eps));
  });
}

template <class T>
void cpu_backward(const TensorView& x, const TensorView& w, const TensorView& rstd, const TensorView& dy,
                  const TensorView& dx, const TensorView& dw) {
  using F = typename Compute<T>::type;
  const int64_t rows = x.shape[0], h = x.shape[1];
  const bool want_dw = dw.data != nullptr || dw.ndim > 0;
  // a fixed number of row chunks (not the pool's split), so the weight gradient's sum order is deterministic
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows, 4 * get_num_threads()));
  std::vector<F> part(want_dw ? static_cast<size_t>(chunks * h) : 0, F(0));
  detail::parallel_for(chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      F* acc = want_dw ? part.data() + c * h : nullptr;
      for (int64_t i = rows * c / chunks; i < rows * (c + 1) / chunks; ++i)
        backward_row<T>(x.ptr<const T>() + i * h, w.ptr<const T>(), rstd.ptr<const F>()[i], dy.ptr<const T>() + i * h,
                        dx.ptr<T>() + i * h, acc, h);
    }
  });
  if (!want_dw) return;
  F* out = dw.ptr<F>();
  for (int64_t j = 0; j < h; ++j) out[j] = 0;
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t j = 0; j < h; ++j) out[j] += part[c * h + j];
}

DType stat_dtype(const TensorView& x) { return x.dtype == DType::F64 ? DType::F64 : DType::F32; }

void check_rows(const TensorView& t, const char* name, const TensorView& x) {
  LORART_CHECK_TYPE(t.dtype == x.dtype, "argument `", name, "`: expected dtype ", dtype_name(x.dtype),
                    " (as `x`), got ", dtype_name(t.dtype));
  detail::check_shape(t, name, {x.shape[0], x.shape[1]});
  detail::check_contiguous(t, name);
  detail::check_same_device(x, "x", t, name);
  if (t.numel() > 0) detail::check_not_null(t, name);
}

void check_vec(const TensorView& t, const char* name, const TensorView& x, DType dt, int64_t n) {
  LORART_CHECK_TYPE(t.dtype == dt, "argument `", name, "`: expected dtype ", dtype_name(dt), ", got ",
                    dtype_name(t.dtype));
  detail::check_shape(t, name, {n});
  detail::check_contiguous(t, name);
  detail::check_same_device(x, "x", t, name);
  if (t.numel() > 0) detail::check_not_null(t, name);
}

void check_x(const TensorView& x, const TensorView& w) {
  detail::check_dtype(x, "x", {DType::F32, DType::BF16, DType::F16, DType::F64});
  detail::check_ndim(x, "x", 2);
  LORART_CHECK(x.shape[1] > 0, "argument `x`: expected rows of at least one element, got shape ", x.shape_str());
  detail::check_contiguous(x, "x");
  if (x.numel() > 0) detail::check_not_null(x, "x");
  detail::check_device_supported(x, "x");
  LORART_CHECK_TYPE(!(x.is_cuda() && x.dtype == DType::F64), "argument `x`: float64 runs on the CPU only");
  LORART_CHECK(!x.is_cuda() || x.shape[1] <= rms_norm_max_hidden(),
               "argument `x`: the CUDA kernels take rows of at most ", rms_norm_max_hidden(), " elements, got ",
               x.shape[1]);
  check_vec(w, "weight", x, x.dtype, x.shape[1]);
}

}  // namespace

int64_t rms_norm_max_hidden() { return int64_t(1024) * detail::kRmsPerThread; }

void rms_norm(const TensorView& x, const TensorView& weight, double eps, const TensorView& out, const TensorView& rstd,
              Stream stream) {
  check_x(x, weight);
  LORART_CHECK(eps >= 0.0, "argument `eps`: expected >= 0, got ", eps);
  check_rows(out, "out", x);
  check_vec(rstd, "rstd", x, stat_dtype(x), x.shape[0]);
  if (x.numel() == 0) return;
  if (x.is_cuda()) {
#ifdef LORART_WITH_CUDA
    cuda::set_device(x.device.index);
    cuda::rms_norm(x.dtype, x.data, weight.data, static_cast<float>(eps), out.data, rstd.ptr<float>(), x.shape[0],
                   x.shape[1], stream);
#endif
  } else {
    detail::dispatch_float(x.dtype, [&](auto t) { cpu_forward<decltype(t)>(x, weight, eps, out, rstd); });
  }
}

void rms_norm_backward(const TensorView& x, const TensorView& weight, const TensorView& rstd,
                       const TensorView& grad_out, const TensorView& grad_x, const TensorView& grad_weight,
                       Stream stream) {
  check_x(x, weight);
  check_vec(rstd, "rstd", x, stat_dtype(x), x.shape[0]);
  check_rows(grad_out, "grad_out", x);
  check_rows(grad_x, "grad_x", x);
  const bool want_dw = grad_weight.data != nullptr || grad_weight.ndim > 0;  // a default view: not wanted
  if (want_dw) check_vec(grad_weight, "grad_weight", x, stat_dtype(x), x.shape[1]);
  if (x.numel() == 0 && !want_dw) return;  // with no rows, grad_weight is still written (zeros)
  if (x.is_cuda()) {
#ifdef LORART_WITH_CUDA
    cuda::set_device(x.device.index);
    cuda::rms_norm_backward(x.dtype, x.data, weight.data, rstd.ptr<const float>(), grad_out.data, grad_x.data,
                            want_dw ? grad_weight.ptr<float>() : nullptr, x.shape[0], x.shape[1], stream);
#endif
  } else {
    detail::dispatch_float(x.dtype,
                           [&](auto t) { cpu_backward<decltype(t)>(x, weight, rstd, grad_out, grad_x, grad_weight); });
  }
}

}  // namespace lorart
