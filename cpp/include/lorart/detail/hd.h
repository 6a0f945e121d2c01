// Shared by the CPU and CUDA drivers: the marker for math that runs on both.
#pragma once

#if defined(__CUDACC__)
#define LORART_HD __host__ __device__ __forceinline__
#else
#define LORART_HD inline
#endif
