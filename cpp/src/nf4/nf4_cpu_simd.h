// x86 fast paths of the CPU NF4 kernels (AVX2 + FMA + F16C, chosen at run time; nf4_cpu.cpp keeps
// the portable loops, which also handle every unaligned head and tail). All of them work on whole
// 64-element steps (32 packed bytes) of one NF4 block and are bit-identical to the scalar loops:
//  * decode16: per block the 16 code values times the scale, rounded to bfloat16/float16, become
//    two 16-byte tables (low and high bytes); every element is then two byte shuffles (vpshufb).
//  * decode_f32: byte planes of the 16 float32 code values, shuffled and re-assembled to floats,
//    times the block scale (the same float32 product as the scalar decode).
//  * gemv_step1: the same float32 decode in a fixed permuted order, each weight rounded to the compute
//    type (the GEMV's one rule), fused with the dot product against x rows permuted the same way once
//    per call (see gemv_perm_index).
//  * encode: max |x| on the float bits, then the code by a 4-level branch-free binary search over
//    the 15 midpoints (ties to the lower code, as nf4_encode), packed two codes per byte.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common/half.h"
#include "lorart/detail/nf4_math.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define LORART_NF4_SIMD 1
#endif

namespace lorart::cpu::simd {

enum class Out { F32, BF16, F16 };

// Index into the permuted x row of the element at offset e (0..63) of a 64-element step, for the
// order in which gemv_step decodes: the high nibbles (even elements) then the low nibbles (odd),
// each as four float vectors whose lanes hold packed bytes (l * 16 + f * 4 + s % 4), l = s / 4.
// bfloat16 (lookup_bf16) orders each group of 16 bytes as: even bytes 0..7, odd bytes 0..7, even 8..15, odd 8..15.
inline int gemv_perm_index(int e, bool bf16 = false) {
  const int h = e & 1, byte = e >> 1, l = byte >> 4, p = byte & 15;
  if (bf16) return 32 * h + 8 * (2 * (p >> 3) + (p & 1)) + 4 * l + ((p & 7) >> 1);
  return 32 * h + 8 * (p >> 2) + 4 * l + (p & 3);
}

// Whether the vector paths may run: on by default, off when the environment sets LORART_CPU_SIMD=0, and
// switchable at run time (lorart::set_cpu_simd) so that tests check the portable loops on any machine.
inline std::atomic<bool>& enabled() {
  static std::atomic<bool> on{[] {
    const char* v = std::getenv("LORART_CPU_SIMD");
    return !(v != nullptr && v[0] == '0' && v[1] == 0);
  }()};
  return on;
}

#ifdef LORART_NF4_SIMD
inline bool supported() {
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
}
inline bool available() { return supported() && enabled().load(std::memory_order_relaxed); }

#define LORART_NF4_TARGET __attribute__((target("avx2,fma,f16c")))

// The 16 code values as four byte planes (plane k = byte k of each float32), each plane repeated
// in both 128-bit lanes (vpshufb looks up within a lane).
struct Planes {
  alignas(32) uint8_t b[4][32];
  Planes() {
    for (int q = 0; q < 16; ++q) {
      const float v = detail::nf4_code(q);
      uint8_t bytes[4];
      std::memcpy(bytes, &v, 4);
      for (int k = 0; k < 4; ++k) b[k][q] = b[k][q + 16] = bytes[k];
    }
  }
};
inline const Planes& planes() {
  static const Planes p;
  return p;
}

LORART_NF4_TARGET inline __m256 codes_lo8() {
  return _mm256_setr_ps(detail::kNF4_0, detail::kNF4_1, detail::kNF4_2, detail::kNF4_3, detail::kNF4_4,
                        detail::kNF4_5, detail::kNF4_6, detail::kNF4_7);
}
LORART_NF4_TARGET inline __m256 codes_hi8() {
  return _mm256_setr_ps(detail::kNF4_8, detail::kNF4_9, detail::kNF4_10, detail::kNF4_11, detail::kNF4_12,
                        detail::kNF4_13, detail::kNF4_14, detail::kNF4_15);
}

// float32 -> bfloat16 bits in the low half of each 32-bit lane, as detail::f32_to_bf16 (round to
// nearest even; NaN -> (bits >> 16) | 0x40).
LORART_NF4_TARGET inline __m256i to_bf16_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
  const __m256i nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i mag = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  const __m256i is_nan = _mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x7f800000));
  return _mm256_blendv_epi8(r, nan, is_nan);
}

// float32 -> float16 bits (8 lanes) as detail::f32_to_f16 (nearest even; NaN -> sign | 0x7e00).
LORART_NF4_TARGET inline __m128i to_f16_bits(__m256 v) {
  const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  const __m128i nan16 = _mm_packs_epi32(_mm256_castsi256_si128(_mm256_castps_si256(nan)),
                                        _mm256_extracti128_si256(_mm256_castps_si256(nan), 1));
  const __m128i quiet = _mm_or_si128(_mm_and_si128(h, _mm_set1_epi16(static_cast<short>(0x8000))),
                                     _mm_set1_epi16(0x7e00));
  return _mm_blendv_epi8(h, quiet, nan16);
}

// The 16-bit values of code[q] * scale (q = 0..15) as [low bytes | high bytes], 16 each.
LORART_NF4_TARGET inline __m256i tables16(float scale, Out out) {
  const __m256 s = _mm256_set1_ps(scale);
  const __m256 v0 = _mm256_mul_ps(codes_lo8(), s), v1 = _mm256_mul_ps(codes_hi8(), s);
  __m256i w;  // the 16 values in order as uint16
  if (out == Out::BF16) {  // packus interleaves the lanes: [0-3, 8-11 | 4-7, 12-15] -> reorder qwords
    w = _mm256_permute4x64_epi64(_mm256_packus_epi32(to_bf16_bits(v0), to_bf16_bits(v1)), 0xD8);
  } else {
    w = _mm256_set_m128i(to_f16_bits(v1), to_f16_bits(v0));
  }
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,  //
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  return _mm256_permute4x64_epi64(_mm256_shuffle_epi8(w, split), 0xD8);
}

// One 64-element step into 16-bit outputs with the tables of its block. The dword permute puts
// packed bytes [0-3, 8-11, ...] in lane 0 and [4-7, 12-15, ...] in lane 1 so that the in-lane
// unpacks come out in element order.
LORART_NF4_TARGET inline void decode16_step(const uint8_t* src, __m256i tl, __m256i th, uint16_t* dst) {
  const __m256i m = _mm256_set1_epi8(0x0f);
  const __m256i v = _mm256_permutevar8x32_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)),
                                                _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m), lo = _mm256_and_si256(v, m);
  const __m256i i0 = _mm256_unpacklo_epi8(hi, lo), i1 = _mm256_unpackhi_epi8(hi, lo);
  __m256i l = _mm256_shuffle_epi8(tl, i0), h = _mm256_shuffle_epi8(th, i0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_unpacklo_epi8(l, h));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16), _mm256_unpackhi_epi8(l, h));
  l = _mm256_shuffle_epi8(tl, i1);
  h = _mm256_shuffle_epi8(th, i1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 32), _mm256_unpacklo_epi8(l, h));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 48), _mm256_unpackhi_epi8(l, h));
}

// Decodes `nblocks` whole blocks of `bs` elements (bs >= 64, or bs == 32 with nblocks even) from
// src (packed bytes of the first block) into dst, one scale per block.
LORART_NF4_TARGET inline void decode16(const uint8_t* src, int64_t nblocks, int64_t bs, const float* scales,
                                       uint16_t* dst, Out out) {
  if (bs == 32) {  // one step = two blocks: i0 (elements 0..31) uses the first's tables, i1 the second's
    const __m256i m = _mm256_set1_epi8(0x0f);
    for (int64_t b = 0; b < nblocks; b += 2) {
      const __m256i ta = tables16(scales[b], out), tb = tables16(scales[b + 1], out);
      const __m256i v = _mm256_permutevar8x32_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16 * b)),
                                                    _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m), lo = _mm256_and_si256(v, m);
      const __m256i i0 = _mm256_unpacklo_epi8(hi, lo), i1 = _mm256_unpackhi_epi8(hi, lo);
      uint16_t* d = dst + 32 * b;
      __m256i l = _mm256_shuffle_epi8(_mm256_permute2x128_si256(ta, ta, 0x00), i0);
      __m256i h = _mm256_shuffle_epi8(_mm256_permute2x128_si256(ta, ta, 0x11), i0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), _mm256_unpacklo_epi8(l, h));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 16), _mm256_unpackhi_epi8(l, h));
      l = _mm256_shuffle_epi8(_mm256_permute2x128_si256(tb, tb, 0x00), i1);
      h = _mm256_shuffle_epi8(_mm256_permute2x128_si256(tb, tb, 0x11), i1);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 32), _mm256_unpacklo_epi8(l, h));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 48), _mm256_unpackhi_epi8(l, h));
    }
    return;
  }
  const int64_t steps = bs / 64;
  for (int64_t b = 0; b < nblocks; ++b) {
    const __m256i t = tables16(scales[b], out);
    const __m256i tl = _mm256_permute2x128_si256(t, t, 0x00), th = _mm256_permute2x128_si256(t, t, 0x11);
    for (int64_t k = 0; k < steps; ++k) decode16_step(src + (b * steps + k) * 32, tl, th, dst + (b * steps + k) * 64);
  }
}

// The 32 float32 code values selected by the nibble indices in `idx` (in-lane): f[j] lane l holds
// the values of idx bytes (l * 16 + j * 4 .. + 3).
LORART_NF4_TARGET inline void lookup_f32(__m256i idx, __m256 f[4]) {
  const Planes& p = planes();
  const __m256i b0 = _mm256_shuffle_epi8(_mm256_load_si256(reinterpret_cast<const __m256i*>(p.b[0])), idx);
  const __m256i b1 = _mm256_shuffle_epi8(_mm256_load_si256(reinterpret_cast<const __m256i*>(p.b[1])), idx);
  const __m256i b2 = _mm256_shuffle_epi8(_mm256_load_si256(reinterpret_cast<const __m256i*>(p.b[2])), idx);
  const __m256i b3 = _mm256_shuffle_epi8(_mm256_load_si256(reinterpret_cast<const __m256i*>(p.b[3])), idx);
  const __m256i a_lo = _mm256_unpacklo_epi8(b0, b1), a_hi = _mm256_unpackhi_epi8(b0, b1);
  const __m256i c_lo = _mm256_unpacklo_epi8(b2, b3), c_hi = _mm256_unpackhi_epi8(b2, b3);
  f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(a_lo, c_lo));
  f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(a_lo, c_lo));
  f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(a_hi, c_hi));
  f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(a_hi, c_hi));
}

// Decodes `nblocks` whole blocks (bs >= 64) into float32 in element order. Packed words (2 bytes)
// are regrouped so that lane 0 holds the even words and lane 1 the odd ones: the lookups then
// come out in element order.
LORART_NF4_TARGET inline void decode_f32(const uint8_t* src, int64_t nblocks, int64_t bs, const float* scales,
                                         float* dst) {
  const __m256i m = _mm256_set1_epi8(0x0f);
  const __m256i words = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,  //
                                         0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
  const int64_t steps = bs / 64;
  for (int64_t b = 0; b < nblocks; ++b) {
    const __m256 s = _mm256_set1_ps(scales[b]);
    for (int64_t k = 0; k < steps; ++k) {
      const uint8_t* sp = src + (b * steps + k) * 32;
      float* d = dst + (b * steps + k) * 64;
      const __m256i v = _mm256_permute4x64_epi64(
          _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp)), words), 0xD8);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m), lo = _mm256_and_si256(v, m);
      __m256 f[4];
      lookup_f32(_mm256_unpacklo_epi8(hi, lo), f);
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(d + 8 * j, _mm256_mul_ps(f[j], s));
      lookup_f32(_mm256_unpackhi_epi8(hi, lo), f);
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(d + 32 + 8 * j, _mm256_mul_ps(f[j], s));
    }
  }
}

// One 64-element step decoded (unscaled) in the gemv_perm_index order.
LORART_NF4_TARGET inline void gemv_decode(const uint8_t* src, __m256 f[8]) {
  const __m256i m = _mm256_set1_epi8(0x0f);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  lookup_f32(_mm256_and_si256(_mm256_srli_epi16(v, 4), m), f);
  lookup_f32(_mm256_and_si256(v, m), f + 4);
}

LORART_NF4_TARGET inline float hsum(__m256 v) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}

// The 8 weights code * scale (float32) as the compute type R holds them, widened back (F32: unchanged): the
// GEMV's one rounding rule (lorart/nf4.h), the bits of from_f32<R> for the finite values a block produces.
template <Out R>
LORART_NF4_TARGET inline __m256 round_to(__m256 v) {
  if constexpr (R == Out::F16) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else if constexpr (R == Out::BF16) {  // round to nearest even on the bits, keep the high half
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd);
    return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  } else {
    return v;
  }
}

// A block's 16 weights code[q] * scale rounded to bfloat16 as two byte tables, each in both 128-bit lanes:
// tl = the low bytes, th = the high bytes (the bits of detail::f32_to_bf16, NaN included). The code vectors are
// ordered (0-3, 8-11 | 4-7, 12-15) so that packus leaves the 16 values in order across the lanes.
LORART_NF4_TARGET inline void tables_bf16(float scale, __m256i& tl, __m256i& th) {
  using namespace detail;
  const __m256 s = _mm256_set1_ps(scale);
  const __m256 c0 = _mm256_setr_ps(kNF4_0, kNF4_1, kNF4_2, kNF4_3, kNF4_8, kNF4_9, kNF4_10, kNF4_11);
  const __m256 c1 = _mm256_setr_ps(kNF4_4, kNF4_5, kNF4_6, kNF4_7, kNF4_12, kNF4_13, kNF4_14, kNF4_15);
  const __m256i w = _mm256_packus_epi32(to_bf16_bits(_mm256_mul_ps(c0, s)), to_bf16_bits(_mm256_mul_ps(c1, s)));
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,  //
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m256i b = _mm256_shuffle_epi8(w, split);  // [lo 0-7, hi 0-7 | lo 8-15, hi 8-15]
  tl = _mm256_permute4x64_epi64(b, 0x88);           // qwords 0, 2, 0, 2
  th = _mm256_permute4x64_epi64(b, 0xDD);           // qwords 1, 3, 1, 3
}

// The 32 weights of the nibble indices in `idx` (in-lane) from a block's tables_bf16, widened to float32 (a
// bfloat16 is the high half of its float32) by a shift or a mask, no shuffle: in lane l, f[0] holds the
// weights of idx bytes l * 16 + 0, 2, 4, 6; f[1] of bytes 1, 3, 5, 7; f[2] of 8, 10, 12, 14; f[3] of 9, 11, 13,
// 15 (gemv_perm_index(e, true)).
LORART_NF4_TARGET inline void lookup_bf16(__m256i idx, __m256i tl, __m256i th, __m256 f[4]) {
  const __m256i l = _mm256_shuffle_epi8(tl, idx), h = _mm256_shuffle_epi8(th, idx);
  const __m256i u0 = _mm256_unpacklo_epi8(l, h), u1 = _mm256_unpackhi_epi8(l, h);
  const __m256i hi16 = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  f[0] = _mm256_castsi256_ps(_mm256_slli_epi32(u0, 16));
  f[1] = _mm256_castsi256_ps(_mm256_and_si256(u0, hi16));
  f[2] = _mm256_castsi256_ps(_mm256_slli_epi32(u1, 16));
  f[3] = _mm256_castsi256_ps(_mm256_and_si256(u1, hi16));
}

// acc += x * w for one 64-element step, w = round_to<R>(code * scale) (the permuted order of gemv_decode), into
// four accumulators (two FMAs each per step: the FMA latency, not the decode, would otherwise bound the loop).
// bfloat16: the 16 rounded weights of the block become two byte tables (tables_bf16, the same bits as
// round_to<BF16> of each product) and every weight is two byte shuffles, no multiply or rounding per weight
// (in its own permuted order: gemv_perm_index(e, true)).
template <Out R>
LORART_NF4_TARGET inline void gemv_step1(const float* x, const uint8_t* src, float scale, __m256 acc[4]) {
  __m256 f[8];
  const __m256i m = _mm256_set1_epi8(0x0f);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  if constexpr (R == Out::BF16) {
    __m256i tl, th;
    tables_bf16(scale, tl, th);
    lookup_bf16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m), tl, th, f);
    lookup_bf16(_mm256_and_si256(v, m), tl, th, f + 4);
  } else {
    const __m256 s = _mm256_set1_ps(scale);
    lookup_f32(_mm256_and_si256(_mm256_srli_epi16(v, 4), m), f);
    lookup_f32(_mm256_and_si256(v, m), f + 4);
    for (int j = 0; j < 8; ++j) f[j] = round_to<R>(_mm256_mul_ps(f[j], s));
  }
  for (int j = 0; j < 8; ++j) acc[j & 3] = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8 * j), f[j], acc[j & 3]);
}

// dot(x, W row) for one x row (permuted, 64 * steps floats) and a W row of `steps` 64-element
// steps at src; scale(k) is the block scale of step k. Decode and dot product fused, each weight
// code * scale rounded to R first (the same weights as gemv_decode_row).
template <Out R, class Scale>
LORART_NF4_TARGET inline float gemv_row1(const float* xp, const uint8_t* src, int64_t steps, Scale scale) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t k = 0; k < steps; ++k) gemv_step1<R>(xp + 64 * k, src + 32 * k, scale(k), acc);
  return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}

// A W row of `steps` steps decoded into w (permuted order, 64 * steps floats): code * scale rounded to R.
template <Out R, class Scale>
LORART_NF4_TARGET inline void gemv_decode_row(const uint8_t* src, int64_t steps, Scale scale, float* w) {
  for (int64_t k = 0; k < steps; ++k) {
    __m256 f[8];
    if constexpr (R == Out::BF16) {  // the byte tables, as gemv_step1
      __m256i tl, th;
      tables_bf16(scale(k), tl, th);
      const __m256i m = _mm256_set1_epi8(0x0f);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32 * k));
      lookup_bf16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m), tl, th, f);
      lookup_bf16(_mm256_and_si256(v, m), tl, th, f + 4);
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(w + 64 * k + 8 * j, f[j]);
      continue;
    }
    gemv_decode(src + 32 * k, f);
    const __m256 s = _mm256_set1_ps(scale(k));
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(w + 64 * k + 8 * j, round_to<R>(_mm256_mul_ps(f[j], s)));
  }
}

// res[i] = dot(x row i, w) for m rows of k floats (k a multiple of 8); 4 x rows per pass share
// each weight load.
LORART_NF4_TARGET inline void dot_rows(const float* xf, int64_t m, int64_t k, const float* w, float* res) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    const float* x0 = xf + i * k;
    const float *x1 = x0 + k, *x2 = x1 + k, *x3 = x2 + k;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < k; j += 8) {
      const __m256 wv = _mm256_loadu_ps(w + j);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + j), wv, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + j), wv, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x2 + j), wv, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x3 + j), wv, a3);
    }
    res[i] = hsum(a0); res[i + 1] = hsum(a1); res[i + 2] = hsum(a2); res[i + 3] = hsum(a3);
  }
  for (; i < m; ++i) {
    const float* xr = xf + i * k;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + j), _mm256_loadu_ps(w + j), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + j + 8), _mm256_loadu_ps(w + j + 8), a1);
    }
    if (j < k) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + j), _mm256_loadu_ps(w + j), a0);
    res[i] = hsum(_mm256_add_ps(a0, a1));
  }
}

// dot_rows for two weight rows at once: r0[i] = dot(x row i, w0), r1[i] = dot(x row i, w1). Four x rows times two
// weight rows per pass (eight accumulators): each x load feeds two FMAs, which halves the x traffic from L2 that
// bounds dot_rows for long rows. The same sums in the same order as dot_rows (bit-identical results).
LORART_NF4_TARGET inline void dot_rows2(const float* xf, int64_t m, int64_t k, const float* w0, const float* w1,
                                        float* r0, float* r1) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    const float* x0 = xf + i * k;
    const float *x1 = x0 + k, *x2 = x1 + k, *x3 = x2 + k;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t j = 0; j < k; j += 8) {
      const __m256 u = _mm256_loadu_ps(w0 + j), v = _mm256_loadu_ps(w1 + j);
      __m256 xv = _mm256_loadu_ps(x0 + j);
      a0 = _mm256_fmadd_ps(xv, u, a0);
      b0 = _mm256_fmadd_ps(xv, v, b0);
      xv = _mm256_loadu_ps(x1 + j);
      a1 = _mm256_fmadd_ps(xv, u, a1);
      b1 = _mm256_fmadd_ps(xv, v, b1);
      xv = _mm256_loadu_ps(x2 + j);
      a2 = _mm256_fmadd_ps(xv, u, a2);
      b2 = _mm256_fmadd_ps(xv, v, b2);
      xv = _mm256_loadu_ps(x3 + j);
      a3 = _mm256_fmadd_ps(xv, u, a3);
      b3 = _mm256_fmadd_ps(xv, v, b3);
    }
    r0[i] = hsum(a0); r0[i + 1] = hsum(a1); r0[i + 2] = hsum(a2); r0[i + 3] = hsum(a3);
    r1[i] = hsum(b0); r1[i + 1] = hsum(b1); r1[i + 2] = hsum(b2); r1[i + 3] = hsum(b3);
  }
  if (i < m) {  // the last m % 4 rows as dot_rows does them
    dot_rows(xf + i * k, m - i, k, w0, r0 + i);
    dot_rows(xf + i * k, m - i, k, w1, r1 + i);
  }
}

// ---- quantize ---------------------------------------------------------------------------------

// 8 elements as float32 from float32 / bfloat16 / float16 storage.
template <class T>
LORART_NF4_TARGET inline __m256 load8(const T* p) {
  if constexpr (sizeof(T) == 4) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (std::is_same_v<T, detail::bf16>)
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else
      return _mm256_cvtph_ps(h);
  }
}

// max |x| over len elements (a multiple of 8) as float bits (monotonic for non-negative floats);
// >= 0x7f800000 means a NaN or inf was seen.
template <class T>
LORART_NF4_TARGET inline uint32_t absmax_bits(const T* p, int64_t len) {
  const __m256i mask = _mm256_set1_epi32(0x7fffffff);
  __m256i mx = _mm256_setzero_si256();
  for (int64_t i = 0; i < len; i += 8)
    mx = _mm256_max_epu32(mx, _mm256_and_si256(_mm256_castps_si256(load8(p + i)), mask));
  __m128i m4 = _mm_max_epu32(_mm256_castsi256_si128(mx), _mm256_extracti128_si256(mx, 1));
  m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, 0x4E));
  m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, 0xB1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m4));
}

// Codes (int32 lanes) of 8 scaled values: the number of midpoints strictly below x, found in four
// compare levels (midpoint 7, then 3 | 11, then 1 | 5 | 9 | 13, then the even ones).
LORART_NF4_TARGET inline __m256i encode8(__m256 x) {
  using namespace detail;
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i c1 = _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_set1_ps(kNF4Mid7), _CMP_GT_OQ));
  const __m256 m2 = _mm256_blendv_ps(_mm256_set1_ps(kNF4Mid3), _mm256_set1_ps(kNF4Mid11), _mm256_castsi256_ps(c1));
  const __m256i c2 = _mm256_castps_si256(_mm256_cmp_ps(x, m2, _CMP_GT_OQ));
  __m256i idx = _mm256_or_si256(_mm256_and_si256(c1, _mm256_set1_epi32(2)), _mm256_and_si256(c2, one));
  const __m256 t3 = _mm256_setr_ps(kNF4Mid1, kNF4Mid5, kNF4Mid9, kNF4Mid13, 0.f, 0.f, 0.f, 0.f);
  const __m256i c3 = _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_permutevar8x32_ps(t3, idx), _CMP_GT_OQ));
  idx = _mm256_or_si256(_mm256_slli_epi32(idx, 1), _mm256_and_si256(c3, one));
  const __m256 t4 = _mm256_setr_ps(kNF4Mid0, kNF4Mid2, kNF4Mid4, kNF4Mid6, kNF4Mid8, kNF4Mid10, kNF4Mid12, kNF4Mid14);
  const __m256i c4 = _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_permutevar8x32_ps(t4, idx), _CMP_GT_OQ));
  return _mm256_or_si256(_mm256_slli_epi32(idx, 1), _mm256_and_si256(c4, one));
}

// Encodes len elements (a multiple of 32) scaled by inv into len / 2 packed bytes.
template <class T>
LORART_NF4_TARGET inline void encode(const T* p, int64_t len, float inv, uint8_t* out) {
  const __m256 s = _mm256_set1_ps(inv);
  const __m256i ff = _mm256_set1_epi16(0xff);
  for (int64_t i = 0; i < len; i += 32) {
    __m256i c[4];
    for (int j = 0; j < 4; ++j) c[j] = encode8(_mm256_mul_ps(load8(p + i + 8 * j), s));
    // 32 codes in element order as bytes (packs interleave the lanes; the dword permute undoes it)
    const __m256i b = _mm256_permutevar8x32_epi32(
        _mm256_packus_epi16(_mm256_packus_epi32(c[0], c[1]), _mm256_packus_epi32(c[2], c[3])),
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // each 16-bit word holds (even code, odd code): byte = even << 4 | odd
    const __m256i w = _mm256_and_si256(_mm256_or_si256(_mm256_slli_epi16(b, 4), _mm256_srli_epi16(b, 8)), ff);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi16(w, w), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i / 2), _mm256_castsi256_si128(packed));
  }
}
// Double quant of n values (a multiple of 8): q[i] = the number of the 255 sorted midpoints
// strictly below (a[i] - offset) * inv, by an 8-level branch-free binary search.
LORART_NF4_TARGET inline void nearest256(const float* mids, const float* a, int64_t n, float offset, float inv,
                                         uint8_t* q) {
  const __m256 off = _mm256_set1_ps(offset), s = _mm256_set1_ps(inv);
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 x = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(a + i), off), s);
    // levels 1-4 (midpoints 127; 63 | 191; 31 + 64j; 15 + 32j) from registers, 5-8 by gathers
    const __m256i c1 = _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_set1_ps(mids[127]), _CMP_GT_OQ));
    __m256i idx = _mm256_and_si256(c1, _mm256_set1_epi32(128));
    const __m256 m2 = _mm256_blendv_ps(_mm256_set1_ps(mids[63]), _mm256_set1_ps(mids[191]), _mm256_castsi256_ps(c1));
    idx = _mm256_add_epi32(idx, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(x, m2, _CMP_GT_OQ)),
                                                 _mm256_set1_epi32(64)));
    const __m256 t3 = _mm256_setr_ps(mids[31], mids[95], mids[159], mids[223], 0.f, 0.f, 0.f, 0.f);
    const __m256 m3 = _mm256_permutevar8x32_ps(t3, _mm256_srli_epi32(idx, 6));
    idx = _mm256_add_epi32(idx, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(x, m3, _CMP_GT_OQ)),
                                                 _mm256_set1_epi32(32)));
    const __m256 t4 = _mm256_setr_ps(mids[15], mids[47], mids[79], mids[111], mids[143], mids[175], mids[207],
                                     mids[239]);
    const __m256 m4 = _mm256_permutevar8x32_ps(t4, _mm256_srli_epi32(idx, 5));
    idx = _mm256_add_epi32(idx, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(x, m4, _CMP_GT_OQ)),
                                                 _mm256_set1_epi32(16)));
    for (int step = 8; step >= 1; step >>= 1) {
      const __m256 m = _mm256_i32gather_ps(mids, _mm256_add_epi32(idx, _mm256_set1_epi32(step - 1)), 4);
      idx = _mm256_add_epi32(idx, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(x, m, _CMP_GT_OQ)),
                                                   _mm256_set1_epi32(step)));
    }
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(idx), _mm256_extracti128_si256(idx, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packus_epi16(w, w));
  }
}
#undef LORART_NF4_TARGET
#else  // no vector paths: available() is false and these are never called
inline bool supported() { return false; }
inline bool available() { return false; }
inline void decode16(const uint8_t*, int64_t, int64_t, const float*, uint16_t*, Out) {}
inline void decode_f32(const uint8_t*, int64_t, int64_t, const float*, float*) {}
template <Out R, class Scale> inline float gemv_row1(const float*, const uint8_t*, int64_t, Scale) { return 0.f; }
template <Out R, class Scale> inline void gemv_decode_row(const uint8_t*, int64_t, Scale, float*) {}
inline void dot_rows(const float*, int64_t, int64_t, const float*, float*) {}
inline void dot_rows2(const float*, int64_t, int64_t, const float*, const float*, float*, float*) {}
template <class T> inline uint32_t absmax_bits(const T*, int64_t) { return 0; }
template <class T> inline void encode(const T*, int64_t, float, uint8_t*) {}
inline void nearest256(const float*, const float*, int64_t, float, float, uint8_t*) {}
#endif

}  // namespace lorart::cpu::simd
