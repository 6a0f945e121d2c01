// Helpers for the CUDA launchers: error checks and stream casts.
#pragma once

#include <cuda_runtime.h>

#include "common/cuda_api.h"
#include "lorart/common.h"

namespace lorart::cuda {

inline cudaStream_t as_stream(Stream s) { return static_cast<cudaStream_t>(s); }

// Check the launch that was just issued (configuration errors surface here).
inline void check_launch(const char* kernel) { check(static_cast<int>(cudaGetLastError()), kernel); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Number of SMs of the current device (cached per device).
int sm_count();

}  // namespace lorart::cuda

#define LORART_CUDA_CHECK(expr) ::lorart::cuda::check(static_cast<int>(expr), #expr)
