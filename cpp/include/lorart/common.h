// lorart public API: the types every function takes.
//
// Tensors cross the API as non-owning views (data pointer, dtype, shape, strides,
// device). Nothing here depends on torch or on the CUDA headers: a CUDA stream is
// passed as an opaque `Stream` (a cudaStream_t cast to void*; nullptr = the legacy
// default stream). Errors are thrown as lorart::Error with a message that names
// the argument, what was expected and what was got.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

namespace lorart {

enum class DType : int32_t { F32 = 0, F16 = 1, BF16 = 2, F64 = 3, U8 = 4, I32 = 5, I64 = 6, I8 = 7, Bool = 8 };
enum class DeviceType : int32_t { CPU = 0, CUDA = 1 };

struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;
  bool is_cuda() const { return type == DeviceType::CUDA; }
};

using Stream = void*;  // cudaStream_t on CUDA devices; ignored on the CPU

const char* dtype_name(DType d);
size_t dtype_size(DType d);
std::string device_name(Device d);

// Kinds map to Python's TypeError / ValueError / RuntimeError in lorart._C.
enum class ErrorKind : int32_t { Value = 0, Type = 1, Runtime = 2 };

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg, ErrorKind kind = ErrorKind::Value)
      : std::runtime_error(msg), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

constexpr int kMaxDims = 8;

// A non-owning, strided view. Strides are in elements.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::F32;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};
  Device device{};

  TensorView() = default;
  // Contiguous view over `data` with the given shape.
  TensorView(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device = {});
  TensorView(void* data, DType dtype, int ndim, const int64_t* shape, const int64_t* strides = nullptr,
             Device device = {});

  int64_t numel() const;
  int64_t size(int dim) const;  // negative dims count from the end
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  bool is_contiguous() const;
  bool is_cuda() const { return device.is_cuda(); }
  std::string shape_str() const;  // "[4, 8]"
  template <class T>
  T* ptr() const { return static_cast<T*>(data); }
};

// What this build of the library contains.
struct BuildInfo {
  std::string version;
  bool cuda_compiled = false;
  std::string cuda_architectures;  // "80;90" or ""
  int cuda_runtime_version = 0;    // e.g. 13000, 0 without CUDA
};
BuildInfo build_info();

// Number of usable CUDA devices; 0 when built without CUDA or when no driver/GPU
// is present. `why` (optional) receives the reason when 0.
int cuda_device_count(std::string* why = nullptr);

// Threads used by the CPU kernels (default: hardware concurrency).
void set_num_threads(int n);
int get_num_threads();

// The x86 vector paths of the CPU kernels (AVX2 + FMA + F16C, chosen at run time when the CPU has them):
// enabled by default, off with the environment variable LORART_CPU_SIMD=0 or set_cpu_simd(false), which then
// runs the portable loops (tests check both): NF4 quantize, double quant and dequantize and the LoRA dropout give
// the same bits; the NF4 GEMV sums its float32 products in another order (the same within float32 rounding, not
// the same bits). Returns the previous setting.
bool set_cpu_simd(bool enabled);
// Whether the vector paths run now (the CPU supports them and they are enabled).
bool cpu_simd_active();

}  // namespace lorart
