// Internal: the few CUDA runtime services the C++ side needs, implemented in
// cuda/common/runtime.cu (only when built with CUDA). No CUDA headers here.
#pragma once

#include <string>

#include "lorart/common.h"

namespace lorart::cuda {

int runtime_version();
int device_count(std::string* why);
// Throws a lorart::Error (Runtime) naming `what` when `err` (a cudaError_t) is not success.
void check(int err, const char* what);
// Makes `device` current for the calling thread (used by the public API).
void set_device(int device);

}  // namespace lorart::cuda
