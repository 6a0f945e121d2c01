// Shared by the pybind11 binding files (one per capability, cpp/python/bind_<cap>.cpp).
//
// Tensors arrive from Python as the tuple made by lorart.ops._common.view(t):
//   (data_ptr, dtype_code, shape, strides, device_type, device_index)
// and are converted to lorart::TensorView by the type caster below. Streams arrive
// as integers (torch.cuda.current_stream().cuda_stream, 0 on CPU).
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

#include "lorart/common.h"

namespace lorart::py {

namespace py = pybind11;
using BindFn = void (*)(py::module_&);

// Each binding file registers itself: `static Registrar reg("nf4", &bind);`
struct Registrar {
  Registrar(const char* name, BindFn fn);
};

inline Stream as_stream(uint64_t s) { return reinterpret_cast<Stream>(static_cast<uintptr_t>(s)); }

}  // namespace lorart::py

namespace pybind11::detail {

template <>
struct type_caster<lorart::TensorView> {
  PYBIND11_TYPE_CASTER(lorart::TensorView, const_name("TensorView"));

  bool load(handle src, bool) {
    if (!isinstance<tuple>(src)) return false;
    auto t = reinterpret_borrow<tuple>(src);
    if (t.size() != 6) return false;
    auto shape = t[2].cast<tuple>();
    auto strides = t[3].cast<tuple>();
    if (shape.size() != strides.size() || shape.size() > static_cast<size_t>(lorart::kMaxDims)) return false;
    int64_t sh[lorart::kMaxDims], st[lorart::kMaxDims];
    for (size_t i = 0; i < shape.size(); ++i) {
      sh[i] = shape[i].cast<int64_t>();
      st[i] = strides[i].cast<int64_t>();
    }
    lorart::Device dev{static_cast<lorart::DeviceType>(t[4].cast<int>()), t[5].cast<int>()};
    value = lorart::TensorView(reinterpret_cast<void*>(static_cast<uintptr_t>(t[0].cast<uint64_t>())),
                               static_cast<lorart::DType>(t[1].cast<int>()), static_cast<int>(shape.size()), sh,
                               st, dev);
    return true;
  }
};

}  // namespace pybind11::detail
