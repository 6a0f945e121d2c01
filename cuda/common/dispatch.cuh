// The one dtype dispatch of the CUDA launchers: f(Tag<T>{}) with T the CUDA storage type of a float dtype
// (float, __nv_bfloat16, __half). Callers check dtypes first, naming the argument; any other dtype reaching
// here is a TypeError naming `what`.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/check.h"

namespace lorart::cuda {

template <class T>
struct Tag {
  using type = T;
};

template <class F>
void dispatch_float(DType dt, const char* what, F&& f) {
  switch (dt) {
    case DType::F32: f(Tag<float>{}); return;
    case DType::BF16: f(Tag<__nv_bfloat16>{}); return;
    case DType::F16: f(Tag<__half>{}); return;
    default: detail::fail(ErrorKind::Type, detail::cat(what, ": unsupported CUDA dtype ", dtype_name(dt)));
  }
}

}  // namespace lorart::cuda
