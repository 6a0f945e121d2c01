// lorart._C: the pybind11 module over the torch-free core. No libtorch here: the
// Python op layer (lorart.ops) turns tensors into views and calls these functions.
#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "bind.h"

namespace lorart::py {

namespace {
std::vector<std::pair<std::string, BindFn>>& registry() {
  static std::vector<std::pair<std::string, BindFn>> r;
  return r;
}
}  // namespace

Registrar::Registrar(const char* name, BindFn fn) { registry().emplace_back(name, fn); }

}  // namespace lorart::py

PYBIND11_MODULE(_C, m) {
  namespace py = pybind11;
  m.doc() = "lorart core (C++/CUDA kernels on raw pointers)";

  // A *local* translator: pybind11's global translator list is shared with every other pybind11
  // module of the same internals version in the process (triton's, for one), and a foreign translator
  // that meets our exceptions can crash. Everything thrown out of lorart's functions is mapped here.
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const lorart::Error& e) {
      switch (e.kind()) {
        case lorart::ErrorKind::Type: PyErr_SetString(PyExc_TypeError, e.what()); return;
        case lorart::ErrorKind::Value: PyErr_SetString(PyExc_ValueError, e.what()); return;
        default: PyErr_SetString(PyExc_RuntimeError, e.what()); return;
      }
    } catch (py::error_already_set& e) {
      e.restore();
    } catch (const py::builtin_exception& e) {
      e.set_error();
    } catch (const std::bad_alloc&) {
      PyErr_SetString(PyExc_MemoryError, "lorart: out of memory");
    } catch (const std::exception& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  m.def("build_info", [] {
    lorart::BuildInfo b = lorart::build_info();
    py::dict d;
    d["version"] = b.version;
    d["cuda_compiled"] = b.cuda_compiled;
    d["cuda_architectures"] = b.cuda_architectures;
    d["cuda_runtime_version"] = b.cuda_runtime_version;
    return d;
  });
  m.def("cuda_device_count", [] {
    std::string why;
    int n = lorart::cuda_device_count(&why);
    return py::make_tuple(n, why);
  }, "(count, reason when 0)");
  m.def("set_num_threads", &lorart::set_num_threads, py::arg("n"));
  m.def("get_num_threads", &lorart::get_num_threads);

  auto& reg = lorart::py::registry();
  std::sort(reg.begin(), reg.end());
  for (auto& [name, fn] : reg) fn(m);
}
