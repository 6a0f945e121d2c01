#include <string>

#include "common/check.h"
#include "common/cuda_utils.cuh"

namespace lorart::cuda {

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

int device_count(std::string* why) {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state
    if (why) {
      if (err == cudaErrorInsufficientDriver || err == cudaErrorNoDevice)
        *why = std::string("no usable CUDA driver or GPU: ") + cudaGetErrorString(err);
      else
        *why = std::string("CUDA is unavailable: ") + cudaGetErrorString(err);
    }
    return 0;
  }
  if (n == 0 && why) *why = "no CUDA GPU found";
  return n;
}

void check(int code, const char* what) {
  auto err = static_cast<cudaError_t>(code);
  if (err == cudaSuccess) return;
  std::string msg = std::string("CUDA error in ") + what + ": " + cudaGetErrorString(err);
  if (err == cudaErrorInsufficientDriver || err == cudaErrorNoDevice)
    msg += " (no usable CUDA driver/GPU on this machine)";
  detail::fail(ErrorKind::Runtime, msg);
}

void set_device(int device) {
  int cur = -1;
  check(static_cast<int>(cudaGetDevice(&cur)), "cudaGetDevice");
  if (cur != device) check(static_cast<int>(cudaSetDevice(device)), "cudaSetDevice");
}

int sm_count() {
  constexpr int kMax = 64;
  static int cache[kMax] = {};
  int dev = 0;
  check(static_cast<int>(cudaGetDevice(&dev)), "cudaGetDevice");
  if (dev < kMax && cache[dev]) return cache[dev];
  int n = 0;
  check(static_cast<int>(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev)), "cudaDeviceGetAttribute");
  if (dev < kMax) cache[dev] = n;
  return n;
}

}  // namespace lorart::cuda
