// Shared by the pybind11 binding files (one per capability, cpp/python/bind_<cap>.cpp).
//
// Tensors arrive from Python as torch.Tensor objects themselves and are converted to
// lorart::TensorView by the type caster below, which reads the pointer, dtype, shape,
// strides and device from the tensor at call time. The tensor is an argument of the call,
// so Python keeps it (and its storage) alive until the call returns: no view can outlive
// its tensor, and nothing can hand the core a pointer without the tensor that owns it.
// The core checks the layout a kernel assumes (contiguity, unit stride) and names the
// argument when it does not hold. Streams arrive as integers (the raw cudaStream_t, 0 on CPU).
//
// An NF4 weight (lorart.nf4.NF4Weight, lorart.ops.nf4.NF4Args: any object with the fields packed,
// absmax, nested_absmax, nested_code, offset, blocksize, rows, cols) arrives as that one object and
// becomes a lorart::NF4View; the caster holds references to its tensors for the call, so they live
// even if the object dropped them meanwhile.
//
// No libtorch here: the torch Python objects the caster needs (torch.Tensor and the dtypes)
// are looked up once, by import, the first time a tensor is converted.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

#include "lorart/common.h"
#include "lorart/nf4.h"

namespace lorart::py {

namespace py = pybind11;
using BindFn = void (*)(py::module_&);

// Each binding file registers itself: `static Registrar reg("nf4", &bind);`
struct Registrar {
  Registrar(const char* name, BindFn fn);
};

inline Stream as_stream(uint64_t s) { return reinterpret_cast<Stream>(static_cast<uintptr_t>(s)); }

// Reads a torch.Tensor into a view (throws TypeError/ValueError for what the core cannot take).
// Returns false when `src` is not a torch.Tensor (pybind11 then reports the incompatible argument).
bool tensor_to_view(py::handle src, TensorView& out);

// Reads an NF4 weight object into a view, its four tensors into `keep` (held for the call). Returns false
// when `src` has no `packed` field; throws TypeError naming a field of the wrong kind.
bool nf4_to_view(py::handle src, NF4View& out, py::object (&keep)[4]);

}  // namespace lorart::py

namespace pybind11::detail {

template <>
struct type_caster<lorart::TensorView> {
  PYBIND11_TYPE_CASTER(lorart::TensorView, const_name("torch.Tensor"));

  bool load(handle src, bool) { return lorart::py::tensor_to_view(src, value); }
};

template <>
struct type_caster<lorart::NF4View> {
  PYBIND11_TYPE_CASTER(lorart::NF4View, const_name("NF4Weight"));

  object keep[4];  // packed, absmax, nested_absmax, nested_code
  bool load(handle src, bool) { return lorart::py::nf4_to_view(src, value, keep); }
};

}  // namespace pybind11::detail
