// Shared pieces of the vectorised CPU loops (see docs/DEVELOPING.md, "Vectorised CPU loops").
#pragma once

#include "common/check.h"
#include "common/half.h"
#include "lorart/common.h"

// Put before a loop function: GCC builds AVX-512 / AVX2+FMA clones and picks one at load time by x86-64
// feature level. Not "arch=haswell": that clone is dispatched with __builtin_cpu_is("haswell"), false on
// every AMD CPU (AMD EPYC ran the SSE2 AdamW loop: 1.26 -> 0.55 ms per 1M elements at one thread once fixed).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define LORART_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LORART_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LORART_CPU_CLONES
#endif

namespace lorart::detail {

// The compute type of a storage type: float for float and the 16-bit types, double for double.
template <class T> struct Compute { using type = float; };
template <> struct Compute<double> { using type = double; };
inline double load(double x) { return x; }
template <class T> inline float load(T x) { return to_f32(x); }
template <class T> inline T store(double x) { return x; }
template <class T> inline T store(float x) { return from_f32<T>(x); }

// The sum of f(j) over j < n in 8 interleaved partial sums: a fixed order that GCC vectorises without
// -ffast-math (a plain `acc += f(j)` loop stays scalar: GCC never reorders a floating-point reduction).
template <class Fn>
inline auto sum8(int64_t n, Fn f) -> decltype(f(0)) {
  using F = decltype(f(0));
  F acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int k = 0; k < 8; ++k) acc[k] += f(j + k);
  for (int k = 0; j < n; ++j, ++k) acc[k] += f(j);
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// The one dtype dispatch of the CPU kernels: calls fn(T{}) with the storage type of a float dtype (float, bf16,
// f16 and, unless WithF64 is false, double). Callers check dtypes first, naming the argument; any other dtype
// reaching here is a TypeError.
template <bool WithF64 = true, class Fn>
void dispatch_float(DType dt, Fn&& fn) {
  switch (dt) {
    case DType::F32: fn(float{}); return;
    case DType::BF16: fn(bf16{}); return;
    case DType::F16: fn(f16{}); return;
    case DType::F64:
      if constexpr (WithF64) {
        fn(double{});
        return;
      }
      break;
    default: break;
  }
  fail(ErrorKind::Type, cat("unsupported dtype ", dtype_name(dt)));
}

}  // namespace lorart::detail
