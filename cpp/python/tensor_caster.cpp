// torch.Tensor -> lorart::TensorView and NF4 weight object -> lorart::NF4View for the bindings (see
// bind.h). Reads the objects' own attributes at call time; the tensor, an argument of the call (or held
// by the NF4 caster), outlives the view.
#include <string>

#include "bind.h"

namespace lorart::py {
namespace {

constexpr int kNumDTypes = 9;
// torch dtype names in lorart::DType order (F32, F16, BF16, F64, U8, I32, I64, I8, Bool)
const char* const kTorchDTypes[kNumDTypes] = {"float32", "float16", "bfloat16", "float64", "uint8",
                                              "int32",   "int64",   "int8",     "bool"};

struct Torch {
  PyObject* tensor_type;
  PyObject* dtypes[kNumDTypes];
  PyObject *data_ptr, *dtype, *shape, *stride, *is_cuda, *is_cpu, *get_device, *device;
};

// Looked up once (with the GIL held); the references are kept for the life of the process.
const Torch& torch_objects() {
  static const Torch t = [] {
    Torch r{};
    py::module_ torch = py::module_::import("torch");
    r.tensor_type = py::object(torch.attr("Tensor")).release().ptr();
    for (int i = 0; i < kNumDTypes; ++i) r.dtypes[i] = py::object(torch.attr(kTorchDTypes[i])).release().ptr();
    r.data_ptr = PyUnicode_InternFromString("data_ptr");
    r.dtype = PyUnicode_InternFromString("dtype");
    r.shape = PyUnicode_InternFromString("shape");
    r.stride = PyUnicode_InternFromString("stride");
    r.is_cuda = PyUnicode_InternFromString("is_cuda");
    r.is_cpu = PyUnicode_InternFromString("is_cpu");
    r.get_device = PyUnicode_InternFromString("get_device");
    r.device = PyUnicode_InternFromString("device");
    return r;
  }();
  return t;
}

py::object attr(py::handle o, PyObject* name) {
  PyObject* r = PyObject_GetAttr(o.ptr(), name);
  if (!r) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}

py::object call0(py::handle o, PyObject* name) {
  PyObject* r = PyObject_CallMethodObjArgs(o.ptr(), name, nullptr);
  if (!r) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(r);
}

int64_t as_i64(PyObject* v) {
  const long long x = PyLong_AsLongLong(v);
  if (x == -1 && PyErr_Occurred()) throw py::error_already_set();
  return static_cast<int64_t>(x);
}

}  // namespace

bool tensor_to_view(py::handle src, TensorView& out) {
  const Torch& T = torch_objects();
  const int is_tensor = PyObject_IsInstance(src.ptr(), T.tensor_type);
  if (is_tensor < 0) throw py::error_already_set();
  if (!is_tensor) return false;

  Device dev{};
  if (PyObject_IsTrue(attr(src, T.is_cuda).ptr())) {
    dev.type = DeviceType::CUDA;
    dev.index = static_cast<int>(as_i64(call0(src, T.get_device).ptr()));
  } else if (!PyObject_IsTrue(attr(src, T.is_cpu).ptr())) {
    throw py::value_error("lorart: a tensor on " + py::str(attr(src, T.device)).cast<std::string>() +
                          " cannot be passed to lorart's kernels (cpu or cuda tensors only)");
  }

  py::object dt = attr(src, T.dtype);
  int code = -1;
  for (int i = 0; i < kNumDTypes; ++i)
    if (dt.ptr() == T.dtypes[i]) code = i;
  if (code < 0)
    throw py::type_error("lorart: a tensor of dtype " + py::str(dt).cast<std::string>() +
                         " cannot be passed to lorart's kernels");

  py::object shape = attr(src, T.shape);    // torch.Size: a tuple
  py::object stride = call0(src, T.stride);  // a tuple
  if (!PyTuple_Check(shape.ptr()) || !PyTuple_Check(stride.ptr())) throw py::type_error("lorart: tensor shape/stride");
  const Py_ssize_t nd = PyTuple_GET_SIZE(shape.ptr());
  if (nd > kMaxDims || PyTuple_GET_SIZE(stride.ptr()) != nd)
    throw py::value_error("lorart: tensors of at most " + std::to_string(kMaxDims) + " dimensions, got " +
                          std::to_string(nd));
  int64_t sh[kMaxDims], st[kMaxDims];
  for (Py_ssize_t i = 0; i < nd; ++i) {
    sh[i] = as_i64(PyTuple_GET_ITEM(shape.ptr(), i));
    st[i] = as_i64(PyTuple_GET_ITEM(stride.ptr(), i));
  }
  const int64_t ptr = as_i64(call0(src, T.data_ptr).ptr());
  out = TensorView(reinterpret_cast<void*>(static_cast<uintptr_t>(ptr)), static_cast<DType>(code),
                   static_cast<int>(nd), sh, st, dev);
  return true;
}

bool nf4_to_view(py::handle src, NF4View& out, py::object (&keep)[4]) {
  static const char* const kTensors[4] = {"packed", "absmax", "nested_absmax", "nested_code"};
  if (!PyObject_HasAttrString(src.ptr(), "packed")) return false;
  TensorView* views[4] = {&out.packed, &out.absmax, &out.nested_absmax, &out.nested_code};
  for (int i = 0; i < 4; ++i) {
    keep[i] = src.attr(kTensors[i]);
    if (i >= 2 && keep[i].is_none()) continue;  // no double quantization: views with data == nullptr
    if (!tensor_to_view(keep[i], *views[i]))
      throw py::type_error(std::string("lorart: NF4 weight: `") + kTensors[i] + "` must be a torch.Tensor" +
                           (i >= 2 ? " or None" : "") + ", got " +
                           py::str(py::type::of(keep[i]).attr("__name__")).cast<std::string>());
  }
  const double offset = PyFloat_AsDouble(src.attr("offset").ptr());
  if (offset == -1.0 && PyErr_Occurred()) throw py::error_already_set();
  out.offset = static_cast<float>(offset);
  out.blocksize = as_i64(src.attr("blocksize").ptr());
  out.rows = as_i64(src.attr("rows").ptr());
  out.cols = as_i64(src.attr("cols").ptr());
  return true;
}

}  // namespace lorart::py
