// x86 fast path for the CPU NF4 decode (AVX2 + F16C, chosen at run time; the scalar loop in
// nf4_cpu.cpp runs elsewhere). 16 packed bytes (32 elements) per step: nibbles in element
// order -> int32 lanes -> code value by two 8-entry permutes and a blend -> times the block
// scale (the same float32 product as the scalar path) -> stored as float32, or rounded to
// bfloat16 / float16 to nearest-even. Bit-identical to the scalar loop for finite values.
#pragma once

#include <cstdint>

#include "lorart/detail/nf4_math.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LORART_NF4_SIMD 1
#endif

namespace lorart::cpu::simd {

enum class Out { F32, BF16, F16 };

#ifdef LORART_NF4_SIMD
inline bool available() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return ok;
}

#define LORART_NF4_TARGET __attribute__((target("avx2,f16c")))

LORART_NF4_TARGET inline void store8(float v0, __m256 v, void* dst, Out out) {
  (void)v0;
  if (out == Out::F32) {
    _mm256_storeu_ps(static_cast<float*>(dst), v);
  } else if (out == Out::F16) {
    _mm_storeu_si128(static_cast<__m128i*>(dst), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {  // bfloat16, round to nearest even: (u + 0x7fff + ((u >> 16) & 1)) >> 16
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(static_cast<__m128i*>(dst), packed);
  }
}

// The 8 table values (code * scale, float32) as `round` holds them, widened back (F32: unchanged).
LORART_NF4_TARGET inline __m256 round_table(__m256 v, Out round) {
  if (round == Out::F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  if (round == Out::BF16) {  // round to nearest even on the bits, keep the high half
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd);
    return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  return v;
}

// Decodes `chunks` x 16 packed bytes at src (one block scale) into 32 * chunks outputs at dst. `round`: the
// float32 outputs rounded to that type first (the GEMV's weights as the compute dtype holds them; lorart/nf4.h).
LORART_NF4_TARGET inline void decode(const uint8_t* src, int64_t chunks, float scale, void* dst, Out out,
                                     Out round = Out::F32) {
  const __m256 s = _mm256_set1_ps(scale);
  // the 16 values code * scale (the same float32 products as the scalar path), once per block
  const __m256 lo = round_table(_mm256_mul_ps(_mm256_setr_ps(detail::kNF4_0, detail::kNF4_1, detail::kNF4_2,
                                                             detail::kNF4_3, detail::kNF4_4, detail::kNF4_5,
                                                             detail::kNF4_6, detail::kNF4_7), s), round);
  const __m256 hi = round_table(_mm256_mul_ps(_mm256_setr_ps(detail::kNF4_8, detail::kNF4_9, detail::kNF4_10,
                                                             detail::kNF4_11, detail::kNF4_12, detail::kNF4_13,
                                                             detail::kNF4_14, detail::kNF4_15), s), round);
  const __m128i mask = _mm_set1_epi8(0x0f);
  const int esize = out == Out::F32 ? 4 : 2;
  char* d = static_cast<char*>(dst);
  for (int64_t c = 0; c < chunks; ++c) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * c));
    const __m128i h = _mm_and_si128(_mm_srli_epi16(v, 4), mask), l = _mm_and_si128(v, mask);
    const __m128i codes[2] = {_mm_unpacklo_epi8(h, l), _mm_unpackhi_epi8(h, l)};  // element order
    for (int g = 0; g < 4; ++g) {
      const __m128i c8 = g & 1 ? _mm_srli_si128(codes[g >> 1], 8) : codes[g >> 1];
      const __m256i idx = _mm256_cvtepu8_epi32(c8);
      const __m256 val = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
      store8(0.f, val, d + (32 * c + 8 * g) * esize, out);
    }
  }
}
LORART_NF4_TARGET inline float hsum(__m256 v) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}

inline bool fma_available() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// res[i] = dot(x row i, w) for m rows of k floats; 4 x rows per pass share each weight load.
__attribute__((target("avx2,fma"))) inline void dot_rows(const float* xf, int64_t m, int64_t k, const float* w,
                                                         float* res) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    const float* x0 = xf + i * k;
    const float *x1 = x0 + k, *x2 = x1 + k, *x3 = x2 + k;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t j = 0;
    for (; j + 8 <= k; j += 8) {
      const __m256 wv = _mm256_loadu_ps(w + j);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + j), wv, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + j), wv, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x2 + j), wv, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x3 + j), wv, a3);
    }
    float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
    for (; j < k; ++j) { s0 += x0[j] * w[j]; s1 += x1[j] * w[j]; s2 += x2[j] * w[j]; s3 += x3[j] * w[j]; }
    res[i] = s0; res[i + 1] = s1; res[i + 2] = s2; res[i + 3] = s3;
  }
  for (; i < m; ++i) {
    const float* xr = xf + i * k;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + j), _mm256_loadu_ps(w + j), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + j + 8), _mm256_loadu_ps(w + j + 8), a1);
    }
    float s0 = hsum(_mm256_add_ps(a0, a1));
    for (; j < k; ++j) s0 += xr[j] * w[j];
    res[i] = s0;
  }
}
#undef LORART_NF4_TARGET
#else
inline bool fma_available() { return false; }
inline void dot_rows(const float*, int64_t, int64_t, const float*, float*) {}
inline bool available() { return false; }
inline void decode(const uint8_t*, int64_t, float, void*, Out, Out = Out::F32) {}
#endif

}  // namespace lorart::cpu::simd
