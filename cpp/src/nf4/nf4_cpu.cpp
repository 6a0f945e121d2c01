// CPU kernels for NF4: blockwise quantize, double quant, dequantize, small-M GEMV.
// Threaded with detail::parallel_for over NF4 blocks (disjoint outputs, no races).
#include "nf4/nf4_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common/check.h"
#include "common/cpu_loop.h"
#include "common/half.h"
#include "common/parallel.h"
#include "lorart/detail/nf4_math.h"
#include "nf4/nf4_cpu_simd.h"

namespace lorart::cpu {
namespace {

using detail::bf16;
using detail::f16;

// bad = the lowest block index seen holding NaN/inf (-1: none): the error names the first bad block whichever
// thread reaches one first (as the CUDA path, whose caller scans the absmax).
inline void note_bad_block(std::atomic<int64_t>& bad, int64_t b) {
  int64_t cur = bad.load(std::memory_order_relaxed);
  while ((cur < 0 || b < cur) && !bad.compare_exchange_weak(cur, b, std::memory_order_relaxed)) {
  }
}

template <class T>
void quantize_t(const T* w, int64_t n, int64_t bs, uint8_t* packed, float* absmax, std::atomic<int64_t>& bad) {
  const int64_t nb = (n + bs - 1) / bs;
  const bool fast = simd::available();
  detail::parallel_for(nb, 64, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(static_cast<size_t>(bs) + 1);
    std::vector<uint8_t> codes(static_cast<size_t>(bs) + 1);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t s = b * bs, len = std::min(bs, n - s);
      if (fast && len % 32 == 0) {  // whole 32-element units: the vector path (bit-identical)
        const uint32_t mx = simd::absmax_bits(w + s, len);
        if (mx >= 0x7f800000u) {
          note_bad_block(bad, b);
          absmax[b] = NAN;
          continue;
        }
        float amax;
        std::memcpy(&amax, &mx, 4);
        absmax[b] = amax;
        simd::encode(w + s, len, detail::nf4_inv_scale(amax), packed + s / 2);
        continue;
      }
      // max |v| on the float bits (monotonic for finite values) and a non-finite flag: integer
      // reductions, which the compiler vectorizes (a float max/sum chain it may not reorder).
      uint32_t mx = 0, nonfinite = 0;
      for (int64_t i = 0; i < len; ++i) {
        const float v = detail::to_f32(w[s + i]);
        buf[i] = v;
        uint32_t u;
        std::memcpy(&u, &v, 4);
        u &= 0x7fffffffu;
        mx = u > mx ? u : mx;
        nonfinite |= static_cast<uint32_t>(u >= 0x7f800000u);
      }
      if (nonfinite) {
        note_bad_block(bad, b);
        absmax[b] = NAN;
        continue;
      }
      float amax;
      std::memcpy(&amax, &mx, 4);
      absmax[b] = amax;
      const float inv = detail::nf4_inv_scale(amax);
      for (int64_t i = 0; i < len; ++i) codes[i] = detail::nf4_encode(buf[i] * inv);  // vectorizes
      // An odd count pads the last low nibble with code 7 (0.0), whatever the scale (not encode(0 * inv): a
      // subnormal absmax has an infinite reciprocal, and 0 * inf is NaN, code 0).
      if (len & 1) codes[len] = 7;
      const int64_t len2 = len + (len & 1);
      uint8_t* out = packed + s / 2;
      for (int64_t i = 0; i < len2 / 2; ++i) out[i] = detail::nf4_pack(codes[2 * i], codes[2 * i + 1]);
    }
  });
}

inline float block_scale(const NF4View& w, int64_t b) {
  if (!w.double_quant()) return w.absmax.ptr<float>()[b];
  return detail::nf4_block_scale(nullptr, w.absmax.ptr<uint8_t>(), w.nested_absmax.ptr<float>(),
                                 w.nested_code.ptr<float>(), w.offset, b);
}

// Portable decode of the flat elements [e0, e1) into dst. Per block, the 16 code values times the
// block scale are rounded to T once (the same float32 product as element-wise decoding, so the
// result is bit-identical); then every element is one table lookup.
template <class T>
void decode_scalar(const NF4View& w, int64_t e0, int64_t e1, T* dst) {
  const uint8_t* p = w.packed.ptr<uint8_t>();
  const int64_t bs = w.blocksize;
  float code[16];
  detail::nf4_fill_table(code);
  int64_t i = e0;
  while (i < e1) {
    const int64_t b = i / bs, end = std::min(e1, (b + 1) * bs);
    const float scale = block_scale(w, b);
    T t[16];
    for (int q = 0; q < 16; ++q) t[q] = detail::from_f32<T>(code[q] * scale);
    if (i & 1) { *dst++ = t[p[i >> 1] & 15]; ++i; }
    const uint8_t* src = p + (i >> 1);
    const int64_t pairs = (end - i) / 2;
    for (int64_t k = 0; k < pairs; ++k) {
      const uint8_t byte = src[k];
      dst[2 * k] = t[byte >> 4];
      dst[2 * k + 1] = t[byte & 15];
    }
    dst += 2 * pairs;
    i += 2 * pairs;
    if (i < end) { *dst++ = t[p[i >> 1] >> 4]; ++i; }
  }
}

// Decodes the flat elements [e0, e1) into dst: whole blocks from a block boundary by the vector
// kernels (nf4_cpu_simd.h), anything else (an unaligned start, a partial last block, a CPU
// without AVX2) by decode_scalar. Both give the same bits.
template <class T>
void decode_range(const NF4View& w, int64_t e0, int64_t e1, T* dst) {
  const int64_t bs = w.blocksize;
  if (simd::available() && e0 % bs == 0) {
    int64_t nblk = (e1 - e0) / bs;
    if (bs == 32) nblk &= ~int64_t{1};  // the bs-32 kernel takes pairs of blocks
    const uint8_t* src = w.packed.ptr<uint8_t>() + e0 / 2;
    float scales[256];
    for (int64_t b0 = 0; b0 < nblk; b0 += 256) {
      const int64_t nb = std::min<int64_t>(256, nblk - b0);
      for (int64_t j = 0; j < nb; ++j) scales[j] = block_scale(w, e0 / bs + b0 + j);
      if constexpr (std::is_same_v<T, float>) {
        if (bs >= 64) simd::decode_f32(src + b0 * bs / 2, nb, bs, scales, dst + b0 * bs);
        else decode_scalar<T>(w, e0 + b0 * bs, e0 + (b0 + nb) * bs, dst + b0 * bs);
      } else {
        constexpr simd::Out kind = std::is_same_v<T, bf16> ? simd::Out::BF16 : simd::Out::F16;
        simd::decode16(src + b0 * bs / 2, nb, bs, scales, reinterpret_cast<uint16_t*>(dst + b0 * bs), kind);
      }
    }
    e0 += nblk * bs;
    dst += nblk * bs;
  }
  if (e0 < e1) decode_scalar<T>(w, e0, e1, dst);
}

// Asks Linux to back the 2 MiB-aligned interior of a large output with huge pages (MADV_HUGEPAGE, a hint:
// ignored where transparent huge pages are off or the memory is not anonymous). A freshly allocated output
// (torch.empty of tens of MB is a new mapping) otherwise takes one page fault per 4 KiB on its first write,
// which costs more than the decode itself (measured 28 ms vs 7 ms for a fresh 4096x4096 bfloat16 output on a
// 2-core VM). Pages already present are left as they are.
void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (bytes < 4 * static_cast<int64_t>(kHuge)) return;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (e > a) (void)madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

template <class T>
void dequantize_t(const NF4View& w, T* out) {
  const int64_t n = w.numel();
  advise_huge_pages(out, n * static_cast<int64_t>(sizeof(T)));
  constexpr int64_t kChunk = 16384;  // elements per task (a multiple of every blocksize)
  detail::parallel_for((n + kChunk - 1) / kChunk, 1, [&](int64_t c0, int64_t c1) {
    const int64_t e0 = c0 * kChunk, e1 = std::min(n, c1 * kChunk);
    decode_range<T>(w, e0, e1, out + e0);
  });
}

// res[i] += scale * dot(xa row i, B row r): the LoRA term of lora_fused_linear_nf4 (lora/lora.cpp).
template <class T>
void add_lora(const GemvLora& l, int64_t r, int64_t m, float* res) {
  const T* br = static_cast<const T*>(l.B) + r * l.R;
  for (int64_t i = 0; i < m; ++i) {
    float acc = 0.f;
    for (int64_t j = 0; j < l.R; ++j) acc += l.xa[i * l.R + j] * detail::to_f32(br[j]);
    res[i] += l.scale * acc;
  }
}

template <class T>
constexpr simd::Out out_kind() {
  return std::is_same_v<T, float> ? simd::Out::F32 : std::is_same_v<T, bf16> ? simd::Out::BF16 : simd::Out::F16;
}

// res[i] = dot(x row i, wrow) for the m rows of x (row-major, k columns), a loop the compiler
// vectorizes with its baseline ISA (the portable GEMV path).
inline void dot_rows(const float* xf, int64_t m, int64_t k, const float* w, float* res) {
  for (int64_t i = 0; i < m; ++i) {
    const float* xr = xf + i * k;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 8 <= k; j += 8)
      for (int u = 0; u < 8; ++u) acc[u] += xr[j + u] * w[j + u];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; j < k; ++j) s += xr[j] * w[j];
    res[i] = s;
  }
}

// The vector GEMV (k a multiple of 64, blocksize >= 64: every 64-element step of a row lies in
// one block). x rows are permuted once into the order in which simd::gemv_decode produces the
// weights; one x row fuses decode and dot product, more rows decode each W row once into an
// L1-resident buffer and share it. Every weight is code * scale rounded to T (lorart/nf4.h's rule).
template <class T>
void gemv_simd(const T* x, int64_t m, const NF4View& w, const T* bias, T* out, const GemvLora* lora) {
  constexpr simd::Out R = out_kind<T>();
  const int64_t k = w.cols, rows = w.rows, steps = k / 64;
  std::vector<float> xp(static_cast<size_t>(m * k));
  int perm[64];
  for (int e = 0; e < 64; ++e) perm[e] = simd::gemv_perm_index(e, R == simd::Out::BF16);
  for (int64_t i = 0; i < m * k; i += 64)
    for (int e = 0; e < 64; ++e) xp[i + perm[e]] = detail::to_f32(x[i + e]);
  const uint8_t* packed = w.packed.ptr<uint8_t>();
  const int64_t shift = __builtin_ctzll(static_cast<unsigned long long>(w.blocksize));
  detail::parallel_for(rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> wrow(m > 1 ? static_cast<size_t>(2 * k) : 0), res(static_cast<size_t>(2 * m));
    auto finish = [&](int64_t r, float* rs) {
      const float b = bias ? detail::to_f32(bias[r]) : 0.f;
      if (lora != nullptr) add_lora<T>(*lora, r, m, rs);
      for (int64_t i = 0; i < m; ++i) out[i * rows + r] = detail::from_f32<T>(rs[i] + b);
    };
    for (int64_t r = r0; r < r1;) {
      const int64_t e0 = r * k;
      auto scale = [&](int64_t st) { return block_scale(w, (e0 + 64 * st) >> shift); };
      if (m == 1) {
        res[0] = simd::gemv_row1<R>(xp.data(), packed + e0 / 2, steps, scale);
      } else if (r + 1 < r1) {  // two weight rows share each x load (dot_rows2)
        auto scale2 = [&](int64_t st) { return block_scale(w, (e0 + k + 64 * st) >> shift); };
        simd::gemv_decode_row<R>(packed + e0 / 2, steps, scale, wrow.data());
        simd::gemv_decode_row<R>(packed + (e0 + k) / 2, steps, scale2, wrow.data() + k);
        simd::dot_rows2(xp.data(), m, k, wrow.data(), wrow.data() + k, res.data(), res.data() + m);
        finish(r, res.data());
        finish(r + 1, res.data() + m);
        r += 2;
        continue;
      } else {
        simd::gemv_decode_row<R>(packed + e0 / 2, steps, scale, wrow.data());
        simd::dot_rows(xp.data(), m, k, wrow.data(), res.data());
      }
      finish(r, res.data());
      ++r;
    }
  });
}

// One output row r at a time: decode W[r, :] rounded to T (as nf4_dequantize stores it: one rule,
// lorart/nf4.h) into a float row (L1-resident), then dot it with each x row (converted to float once).
template <class T>
void gemv_t(const T* x, int64_t m, const NF4View& w, const T* bias, T* out, const GemvLora* lora) {
  const int64_t k = w.cols, rows = w.rows;
  if (simd::available() && k % 64 == 0 && w.blocksize >= 64) return gemv_simd<T>(x, m, w, bias, out, lora);
  std::vector<float> xf(static_cast<size_t>(m * k));
  for (int64_t i = 0; i < m * k; ++i) xf[i] = detail::to_f32(x[i]);
  detail::parallel_for(rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> wrow(static_cast<size_t>(k)), res(static_cast<size_t>(m));
    std::vector<T> wt(std::is_same_v<T, float> ? 0 : static_cast<size_t>(k));
    for (int64_t r = r0; r < r1; ++r) {
      if constexpr (std::is_same_v<T, float>) {
        decode_range<float>(w, r * k, (r + 1) * k, wrow.data());
      } else {
        decode_range<T>(w, r * k, (r + 1) * k, wt.data());
        for (int64_t j = 0; j < k; ++j) wrow[j] = detail::to_f32(wt[j]);
      }
      dot_rows(xf.data(), m, k, wrow.data(), res.data());
      const float b = bias ? detail::to_f32(bias[r]) : 0.f;
      if (lora != nullptr) add_lora<T>(*lora, r, m, res.data());
      for (int64_t i = 0; i < m; ++i) out[i * rows + r] = detail::from_f32<T>(res[i] + b);
    }
  });
}

// detail::dynamic_encode without branches (a data-dependent branch per level mispredicts half the
// time): the number of midpoints strictly below x, ties to the lower index, NaN -> 0.
inline uint8_t nearest256(const float* mids, float x) {
  int idx = 0;
  for (int step = 128; step >= 1; step >>= 1) idx += x > mids[idx + step - 1] ? step : 0;
  return static_cast<uint8_t>(idx);
}

}  // namespace

bool set_simd(bool enabled) { return simd::enabled().exchange(enabled); }
bool simd_active() { return simd::available(); }

void nf4_quantize(const TensorView& weight, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax) {
  std::atomic<int64_t> bad{-1};
  detail::dispatch_float<false>(weight.dtype, [&](auto tag) {
    using T = decltype(tag);
    quantize_t<T>(weight.ptr<T>(), n, blocksize, packed, absmax, bad);
  });
  const int64_t b = bad.load();
  LORART_CHECK(b < 0, "argument `weight`: expected finite values, got NaN or inf in block ", b, " (elements ",
               b * blocksize, "..", std::min(n, (b + 1) * blocksize) - 1, ")");
}

void nf4_double_quant(const float* absmax, int64_t nb, float offset, const float* code, uint8_t* q,
                      float* nested_absmax) {
  const int64_t nn = (nb + kNF4NestedBlocksize - 1) / kNF4NestedBlocksize;
  float mids[255];  // the same float32 midpoints as detail::dynamic_encode
  for (int j = 0; j < 255; ++j) mids[j] = (code[j] + code[j + 1]) * 0.5f;
  detail::parallel_for(nn, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t s = c * kNF4NestedBlocksize, e = std::min(nb, s + kNF4NestedBlocksize);
      float amax = 0.f;
      for (int64_t i = s; i < e; ++i) amax = std::max(amax, std::fabs(absmax[i] - offset));
      nested_absmax[c] = amax;
      const float inv = detail::nf4_inv_scale(amax);
      int64_t i = s;
      if (simd::available()) {
        simd::nearest256(mids, absmax + s, (e - s) & ~int64_t{7}, offset, inv, q + s);
        i += (e - s) & ~int64_t{7};
      }
      for (; i < e; ++i) q[i] = nearest256(mids, (absmax[i] - offset) * inv);
    }
  });
}

void nf4_dequantize(const NF4View& w, const TensorView& out) {
  detail::dispatch_float<false>(out.dtype, [&](auto tag) {
    using T = decltype(tag);
    dequantize_t<T>(w, out.ptr<T>());
  });
}

void nf4_gemv(const TensorView& x, const NF4View& w, const TensorView& bias, const TensorView& out,
              const GemvLora* lora) {
  detail::dispatch_float<false>(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    gemv_t<T>(x.ptr<T>(), x.shape[0], w, bias.ptr<T>(), out.ptr<T>(), lora);
  });
}

}  // namespace lorart::cpu
