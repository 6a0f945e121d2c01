// Internal argument checks shared by every capability (one place, not per file).
#pragma once

#include <initializer_list>
#include <sstream>
#include <string>

#include "lorart/common.h"

namespace lorart::detail {

[[noreturn]] void fail(ErrorKind kind, const std::string& msg);

template <class... A>
std::string cat(const A&... a) {
  std::ostringstream os;
  (os << ... << a);
  return os.str();
}

// "argument `x`: expected dtype float32|bfloat16, got uint8"
void check_dtype(const TensorView& t, const char* name, std::initializer_list<DType> allowed);
void check_ndim(const TensorView& t, const char* name, int ndim);
void check_contiguous(const TensorView& t, const char* name);
// dims equal to -1 match anything
void check_shape(const TensorView& t, const char* name, std::initializer_list<int64_t> dims);
void check_same_device(const TensorView& a, const char* an, const TensorView& b, const char* bn);
void check_not_null(const TensorView& t, const char* name);
// Throws when `t` lives on a CUDA device but this build has no CUDA kernels.
void check_device_supported(const TensorView& t, const char* name);

}  // namespace lorart::detail

#define LORART_CHECK(cond, ...)                                                              \
  do {                                                                                       \
    if (!(cond)) ::lorart::detail::fail(::lorart::ErrorKind::Value, ::lorart::detail::cat(__VA_ARGS__)); \
  } while (0)
#define LORART_CHECK_TYPE(cond, ...)                                                         \
  do {                                                                                       \
    if (!(cond)) ::lorart::detail::fail(::lorart::ErrorKind::Type, ::lorart::detail::cat(__VA_ARGS__)); \
  } while (0)
