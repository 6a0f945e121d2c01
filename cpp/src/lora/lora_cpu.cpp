// CPU drivers of the LoRA kernels (threaded with detail::parallel_for). Arguments were checked in lora.cpp.
#include "lora/lora_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "common/check.h"
#include "common/cpu_loop.h"
#include "common/parallel.h"
#include "lorart/detail/lora_math.h"
#include "nf4/nf4_cpu_simd.h"

namespace lorart::detail {
namespace {

constexpr int64_t kGrain = 1 << 14;  // elements of work per task, roughly
constexpr int64_t kVecGrain = 1 << 16;  // the same for vectorised loops (waking a worker costs ~10 us)

inline int64_t rows_grain(int64_t work_per_row) { return work_per_row >= kGrain ? 1 : kGrain / work_per_row; }

template <class T>
using Acc = typename Compute<T>::type;  // float, double for double

int64_t idx_at(const TensorView& idx, int64_t m) {
  return idx.dtype == DType::I64 ? idx.ptr<int64_t>()[m * idx.strides[0]]
                                 : static_cast<int64_t>(idx.ptr<int32_t>()[m * idx.strides[0]]);
}

}  // namespace

#ifdef LORART_NF4_SIMD
#define LORART_LORA_TARGET __attribute__((target("avx2,fma,f16c")))
namespace {

// lora_mix32 on 8 lanes.
LORART_LORA_TARGET inline __m256i mix32_8(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x846ca68bu)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

// One row of dropout (AVX2), bit-identical to the scalar loop: the hash of lora_dropout_hash on 8 consecutive
// indices at a time (lanes whose 64-bit index would carry into the high word within the vector, once per 2^32
// elements, take the scalar loop), keep = hash >= threshold (unsigned), x * keep_scale in float32, rounded to
// the storage type as from_f32.
template <class T>
LORART_LORA_TARGET void dropout_row_avx2(const T* x, T* out, int64_t K, uint64_t base, const LoraDropoutKey& key,
                                        float keep_scale) {
  const __m256i k1 = _mm256_set1_epi32(static_cast<int>(key.k1)), thr = _mm256_set1_epi32(static_cast<int>(key.threshold));
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 sc = _mm256_set1_ps(keep_scale);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const uint64_t idx = base + static_cast<uint64_t>(k);
    const uint32_t lo = static_cast<uint32_t>(idx);
    if (lo > 0xFFFFFFF8u) {  // the high word changes inside these 8 lanes
      for (int j = 0; j < 8; ++j) {
        const bool keep = lora_dropout_keep(key, idx + j);
        out[k + j] = from_f32<T>(keep ? to_f32(x[k + j]) * keep_scale : 0.0f);
      }
      continue;
    }
    const uint32_t hi_term = static_cast<uint32_t>(idx >> 32) * 0x9E3779B1u ^ key.k2;
    const __m256i l = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(lo)), lanes);
    const __m256i h = mix32_8(_mm256_xor_si256(mix32_8(_mm256_xor_si256(l, k1)),
                                               _mm256_set1_epi32(static_cast<int>(hi_term))));
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_max_epu32(h, thr), h));
    __m256 v;
    if constexpr (std::is_same_v<T, float>) {
      v = _mm256_loadu_ps(x + k);
    } else if constexpr (std::is_same_v<T, bf16>) {
      v = _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + k))), 16));
    } else {
      v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + k)));
    }
    v = _mm256_and_ps(_mm256_mul_ps(v, sc), keep);  // dropped lanes: +0, as the scalar loop's 0.0f
    if constexpr (std::is_same_v<T, float>) {
      _mm256_storeu_ps(out + k, v);
    } else if constexpr (std::is_same_v<T, bf16>) {
      const __m256i b = cpu::simd::to_bf16_bits(v);  // in the low half of each 32-bit lane
      const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), packed);
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), cpu::simd::to_f16_bits(v));
    }
  }
  for (; k < K; ++k) {
    const bool keep = lora_dropout_keep(key, base + static_cast<uint64_t>(k));
    out[k] = from_f32<T>(keep ? to_f32(x[k]) * keep_scale : 0.0f);
  }
}

}  // namespace
#undef LORART_LORA_TARGET
#endif

template <class T>
void cpu_lora_dropout_row(const T* x, T* out, int64_t K, uint64_t base, const LoraDropoutKey& key,
                          Acc<T> keep_scale) {
#ifdef LORART_NF4_SIMD
  if constexpr (!std::is_same_v<T, double>) {
    if (cpu::simd::available()) return dropout_row_avx2<T>(x, out, K, base, key, keep_scale);
  }
#endif
  for (int64_t k = 0; k < K; ++k) {
    const bool keep = lora_dropout_keep(key, base + static_cast<uint64_t>(k));
    out[k] = store<T>(keep ? load(x[k]) * keep_scale : Acc<T>(0));
  }
}
template void cpu_lora_dropout_row<float>(const float*, float*, int64_t, uint64_t, const LoraDropoutKey&, float);
template void cpu_lora_dropout_row<double>(const double*, double*, int64_t, uint64_t, const LoraDropoutKey&, double);
template void cpu_lora_dropout_row<bf16>(const bf16*, bf16*, int64_t, uint64_t, const LoraDropoutKey&, float);
template void cpu_lora_dropout_row<f16>(const f16*, f16*, int64_t, uint64_t, const LoraDropoutKey&, float);

void cpu_lora_dropout(const TensorView& x, const TensorView& out, double p, uint64_t seed) {
  const int64_t M = x.shape[0], K = x.shape[1];
  const LoraDropoutKey key = lora_dropout_key(seed, p);
  dispatch_float(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto keep_scale = static_cast<Acc<T>>(1.0 / (1.0 - p));
    const T* xp = x.ptr<T>();
    T* op = out.ptr<T>();
    parallel_for(M, rows_grain(K), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        cpu_lora_dropout_row<T>(xp + m * x.strides[0], op + m * out.strides[0], K, static_cast<uint64_t>(m * K), key,
                                keep_scale);
    });
  });
}

void cpu_lora_shrink(const TensorView& x, const TensorView& Aw, double p, uint64_t seed, const TensorView& xa) {
  const int64_t M = x.shape[0], K = x.shape[1], R = Aw.shape[0];
  const LoraDropoutKey key = lora_dropout_key(seed, p);
  dispatch_float(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    const A keep_scale = static_cast<A>(p > 0 ? 1.0 / (1.0 - p) : 1.0);
    const T* xp = x.ptr<T>();
    const T* ap = Aw.ptr<T>();
    parallel_for(M * R, rows_grain(K), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t m = i / R, j = i % R;
        const T* xr = xp + m * x.strides[0];
        const T* ar = ap + j * K;
        A acc = 0;
        if (p > 0) {
          for (int64_t k = 0; k < K; ++k)
            if (lora_dropout_keep(key, static_cast<uint64_t>(m * K + k))) acc += load(xr[k]) * load(ar[k]);
          acc *= keep_scale;
        } else {
          for (int64_t k = 0; k < K; ++k) acc += load(xr[k]) * load(ar[k]);
        }
        if constexpr (std::is_same_v<T, double>) xa.ptr<double>()[m * R + j] = acc;
        else xa.ptr<float>()[m * R + j] = acc;
      }
    });
  });
}

namespace {

// y[m, n] = dot(x[m], Wrow) + bias[n] + scale * dot(xa[m], B[n]) for all m, with Wrow given as acc values.
template <class T>
void finish_row(const TensorView& x, const Acc<T>* wrow, const TensorView& bias, const TensorView& xa,
                const TensorView& B, double scale, const TensorView& y, int64_t n) {
  using A = Acc<T>;
  const int64_t M = x.shape[0], K = x.shape[1], R = B.shape[1];
  const T* brow = B.ptr<T>() + n * R;
  const A b = bias.data ? load(bias.ptr<T>()[n]) : A(0);
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x.ptr<T>() + m * x.strides[0];
    A acc = 0;
    for (int64_t k = 0; k < K; ++k) acc += load(xr[k]) * wrow[k];
    A la = 0;
    const A* xam = xa.ptr<A>() + m * R;
    for (int64_t j = 0; j < R; ++j) la += xam[j] * load(brow[j]);
    y.ptr<T>()[m * y.strides[0] + n] = store<T>(acc + b + static_cast<A>(scale) * la);
  }
}

}  // namespace

void cpu_lora_fused_linear(const TensorView& x, const TensorView& W, const TensorView& bias, const TensorView& xa,
                           const TensorView& B, double scale, const TensorView& y) {
  const int64_t N = W.shape[0], K = W.shape[1];
  dispatch_float(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    parallel_for(N, rows_grain(K * x.shape[0]), [&](int64_t n0, int64_t n1) {
      std::vector<A> wrow(static_cast<size_t>(K));
      for (int64_t n = n0; n < n1; ++n) {
        const T* w = W.ptr<T>() + n * K;
        for (int64_t k = 0; k < K; ++k) wrow[k] = load(w[k]);
        finish_row<T>(x, wrow.data(), bias, xa, B, scale, y, n);
      }
    });
  });
}

namespace {

// y[n] += s * (B[n, :r] . xa[:r]) for n in [n0, n1): B rows of RM values (r used).
template <class T, class A>
LORART_CPU_CLONES void grouped_expand(const T* __restrict__ B, int64_t RM, int64_t r, const A* __restrict__ xa, A s,
                                      T* __restrict__ y, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* b = B + n * RM;
    const A acc = sum8(r, [&](int64_t j) { return xa[j] * load(b[j]); });
    y[n] = store<T>(load(y[n]) + s * acc);
  }
}

// xa[i] = x[m] . A[a, j] for the flat indices i = m * RM + j in [i0, i1) (0 where row m has no adapter or
// j >= its rank); one call per task, so the per-CPU clone is picked once per range, not once per dot.
template <class T, class A>
LORART_CPU_CLONES void grouped_shrink(const T* __restrict__ x, int64_t ldx, const T* __restrict__ As,
                                      const int64_t* __restrict__ rows, const int32_t* __restrict__ rk, int64_t K,
                                      int64_t RM, A* __restrict__ xa, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t m = i / RM, j = i % RM, a = rows[m];
    if (a < 0 || j >= rk[a]) {
      xa[i] = A(0);
      continue;
    }
    const T* xr = x + m * ldx;
    const T* ar = As + (a * RM + j) * K;
    xa[i] = sum8(K, [&](int64_t k) { return load(xr[k]) * load(ar[k]); });
  }
}

}  // namespace

void cpu_lora_grouped_add(const TensorView& y, const TensorView& x, const TensorView& A_stack,
                          const TensorView& B_stack, const TensorView& ranks, const TensorView& scales,
                          const TensorView& idx, const TensorView& xa_ws) {
  const int64_t M = x.shape[0], K = x.shape[1], RM = A_stack.shape[1], N = B_stack.shape[1];
  const int32_t* rk = ranks.ptr<int32_t>();
  const float* sc = scales.ptr<float>();
  dispatch_float(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = Acc<T>;
    A* xa = xa_ws.ptr<A>();
    std::vector<int64_t> rows(static_cast<size_t>(M));
    for (int64_t m = 0; m < M; ++m) rows[m] = idx_at(idx, m);
    // shrink: xa[m, j] = x[m] . A[a, j] (the dots vectorise: 8 partial sums; a task is >= kVecGrain MACs)
    parallel_for(M * RM, std::max<int64_t>(1, kVecGrain / std::max<int64_t>(K, 1)), [&](int64_t i0, int64_t i1) {
      grouped_shrink<T, A>(x.ptr<T>(), x.strides[0], A_stack.ptr<T>(), rows.data(), rk, K, RM, xa, i0, i1);
    });
    // expand: y[m, n] += s * B[a, n, :r] . xa[m, :r], in column blocks so that a few rows still use every thread
    const int64_t nb = std::max<int64_t>(1, std::min<int64_t>(N, kVecGrain / std::max<int64_t>(RM, 1)));
    const int64_t blocks = (N + nb - 1) / nb;
    parallel_for(M * blocks, std::max<int64_t>(1, kVecGrain / (nb * std::max<int64_t>(RM, 1))), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m = t / blocks, n0 = (t % blocks) * nb, a = rows[m];
        if (a < 0) continue;
        grouped_expand<T, A>(B_stack.ptr<T>() + a * N * RM, RM, rk[a], xa + m * RM, static_cast<A>(sc[a]),
                             y.ptr<T>() + m * y.strides[0], n0, std::min(N, n0 + nb));
      }
    });
  });
}

namespace {

// Calls row_fn(n, wrow_ptr, merged_values) for each row n of W with merged = W + scale * B @ A (acc type).
template <class T, class F>
void merge_rows(const TensorView& W, const TensorView& Aw, const TensorView& B, double scale, F&& row_fn) {
  using A = Acc<T>;
  const int64_t N = W.shape[0], K = W.shape[1], R = Aw.shape[0];
  parallel_for(N, rows_grain(K * R), [&](int64_t n0, int64_t n1) {
    std::vector<A> d(static_cast<size_t>(K));
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t k = 0; k < K; ++k) d[k] = 0;
      for (int64_t j = 0; j < R; ++j) {
        const A b = load(B.ptr<T>()[n * R + j]);
        const T* ar = Aw.ptr<T>() + j * K;
        for (int64_t k = 0; k < K; ++k) d[k] += b * load(ar[k]);
      }
      T* wr = W.ptr<T>() + n * K;
      for (int64_t k = 0; k < K; ++k) d[k] = load(wr[k]) + static_cast<A>(scale) * d[k];
      row_fn(wr, d.data(), K);
    }
  });
}

}  // namespace

void cpu_lora_merge(const TensorView& W, const TensorView& Aw, const TensorView& B, double scale) {
  dispatch_float(W.dtype, [&](auto tag) {
    using T = decltype(tag);
    merge_rows<T>(W, Aw, B, scale, [](T* wr, const Acc<T>* v, int64_t K) {
      for (int64_t k = 0; k < K; ++k) wr[k] = store<T>(v[k]);
    });
  });
}

int64_t cpu_lora_merge_count_nonfinite(const TensorView& W, const TensorView& Aw, const TensorView& B, double scale) {
  std::atomic<int64_t> bad{0};
  dispatch_float(W.dtype, [&](auto tag) {
    using T = decltype(tag);
    merge_rows<T>(W, Aw, B, scale, [&](T*, const Acc<T>* v, int64_t K) {
      int64_t c = 0;
      for (int64_t k = 0; k < K; ++k) c += !std::isfinite(load(store<T>(v[k])));
      if (c) bad += c;
    });
  });
  return bad.load();
}

}  // namespace lorart::detail
