#include <algorithm>
#include <sstream>
#include <thread>

#include "common/check.h"
#include "common/cuda_api.h"

#ifndef LORART_VERSION
#define LORART_VERSION "0.0.0"
#endif

namespace lorart {

const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::F64: return "float64";
    case DType::U8: return "uint8";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
    case DType::I8: return "int8";
    case DType::Bool: return "bool";
  }
  return "unknown";
}

size_t dtype_size(DType d) {
  switch (d) {
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: return 2;
    case DType::F64: case DType::I64: return 8;
    case DType::U8: case DType::I8: case DType::Bool: return 1;
  }
  return 0;
}

std::string device_name(Device d) {
  return d.is_cuda() ? "cuda:" + std::to_string(d.index) : std::string("cpu");
}

TensorView::TensorView(void* data_, DType dtype_, std::initializer_list<int64_t> shape_, Device device_)
    : data(data_), dtype(dtype_), ndim(static_cast<int>(shape_.size())), device(device_) {
  LORART_CHECK(ndim <= kMaxDims, "TensorView: at most ", kMaxDims, " dimensions, got ", ndim);
  int i = 0;
  for (int64_t s : shape_) shape[i++] = s;
  int64_t st = 1;
  for (int d = ndim - 1; d >= 0; --d) { strides[d] = st; st *= shape[d]; }
}

TensorView::TensorView(void* data_, DType dtype_, int ndim_, const int64_t* shape_, const int64_t* strides_,
                       Device device_)
    : data(data_), dtype(dtype_), ndim(ndim_), device(device_) {
  LORART_CHECK(ndim >= 0 && ndim <= kMaxDims, "TensorView: at most ", kMaxDims, " dimensions, got ", ndim);
  int64_t st = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    shape[d] = shape_[d];
    strides[d] = strides_ ? strides_[d] : st;
    st *= shape[d];
  }
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[d];
  return n;
}

int64_t TensorView::size(int dim) const {
  int d = dim < 0 ? dim + ndim : dim;
  LORART_CHECK(d >= 0 && d < ndim, "dimension ", dim, " out of range for a ", ndim, "-d tensor");
  return shape[d];
}

bool TensorView::is_contiguous() const {
  if (numel() == 0) return true;  // no element to misplace (torch agrees)
  int64_t st = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    if (shape[d] != 1 && strides[d] != st) return false;
    st *= shape[d];
  }
  return true;
}

std::string TensorView::shape_str() const {
  std::ostringstream os;
  os << '[';
  for (int d = 0; d < ndim; ++d) os << (d ? ", " : "") << shape[d];
  os << ']';
  return os.str();
}

BuildInfo build_info() {
  BuildInfo b;
  b.version = LORART_VERSION;
#ifdef LORART_WITH_CUDA
  b.cuda_compiled = true;
  b.cuda_architectures = LORART_CUDA_ARCHS;
  b.cuda_runtime_version = cuda::runtime_version();
#endif
  return b;
}

int cuda_device_count(std::string* why) {
#ifdef LORART_WITH_CUDA
  return cuda::device_count(why);
#else
  if (why) *why = "lorart was built without CUDA kernels (nvcc was not found at build time)";
  return 0;
#endif
}

namespace detail {

void fail(ErrorKind kind, const std::string& msg) { throw Error(msg, kind); }

void check_dtype(const TensorView& t, const char* name, std::initializer_list<DType> allowed) {
  for (DType d : allowed)
    if (t.dtype == d) return;
  std::string exp;
  for (DType d : allowed) exp += (exp.empty() ? "" : "|") + std::string(dtype_name(d));
  fail(ErrorKind::Type, cat("argument `", name, "`: expected dtype ", exp, ", got ", dtype_name(t.dtype)));
}

void check_ndim(const TensorView& t, const char* name, int ndim) {
  LORART_CHECK(t.ndim == ndim, "argument `", name, "`: expected a ", ndim, "-d tensor, got shape ", t.shape_str());
}

void check_contiguous(const TensorView& t, const char* name) {
  LORART_CHECK(t.is_contiguous(), "argument `", name, "`: expected a contiguous tensor (shape ", t.shape_str(), ")");
}

void check_shape(const TensorView& t, const char* name, std::initializer_list<int64_t> dims) {
  bool ok = t.ndim == static_cast<int>(dims.size());
  int i = 0;
  for (int64_t d : dims) {
    if (ok && d != -1 && t.shape[i] != d) ok = false;
    ++i;
  }
  if (ok) return;
  std::ostringstream exp;
  exp << '[';
  i = 0;
  for (int64_t d : dims) {
    exp << (i++ ? ", " : "");
    if (d == -1) exp << '*'; else exp << d;
  }
  exp << ']';
  fail(ErrorKind::Value, cat("argument `", name, "`: expected shape ", exp.str(), ", got ", t.shape_str()));
}

void check_same_device(const TensorView& a, const char* an, const TensorView& b, const char* bn) {
  LORART_CHECK(a.device.type == b.device.type && a.device.index == b.device.index, "arguments `", an, "` and `",
               bn, "` must be on the same device, got ", device_name(a.device), " and ", device_name(b.device));
}

void check_not_null(const TensorView& t, const char* name) {
  LORART_CHECK(t.data != nullptr || t.numel() == 0, "argument `", name, "`: null data pointer");
}

void check_device_supported(const TensorView& t, const char* name) {
#ifndef LORART_WITH_CUDA
  if (t.is_cuda())
    fail(ErrorKind::Runtime, cat("argument `", name, "` is on ", device_name(t.device),
                                 " but lorart was built without CUDA kernels (nvcc was not found at build time; "
                                 "rebuild with CUDA, LORART_CUDA=ON)"));
#endif
}

}  // namespace detail
}  // namespace lorart
