// CPU kernels for NF4: blockwise quantize, double quant, dequantize, small-M GEMV.
// Threaded with detail::parallel_for over NF4 blocks (disjoint outputs, no races).
#include "nf4/nf4_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "common/check.h"
#include "common/half.h"
#include "common/parallel.h"
#include "lorart/detail/nf4_math.h"

namespace lorart::cpu {
namespace {

using detail::bf16;
using detail::f16;

template <class F>
void dispatch_float(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: f(float{}); break;
    case DType::BF16: f(bf16{}); break;
    case DType::F16: f(f16{}); break;
    default: detail::fail(ErrorKind::Type, "NF4: unsupported dtype");
  }
}

template <class T>
void quantize_t(const T* w, int64_t n, int64_t bs, uint8_t* packed, float* absmax, std::atomic<int64_t>& bad) {
  const int64_t nb = (n + bs - 1) / bs;
  detail::parallel_for(nb, 64, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(static_cast<size_t>(bs) + 1);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t s = b * bs, len = std::min(bs, n - s);
      float amax = 0.f, probe = 0.f;
      for (int64_t i = 0; i < len; ++i) {
        float v = detail::to_f32(w[s + i]);
        buf[i] = v;
        float a = std::fabs(v);
        amax = a > amax ? a : amax;
        probe += v * 0.f;  // NaN iff some v is NaN or +-inf
      }
      if (probe != 0.f || std::isnan(probe)) {
        int64_t expected = -1;
        bad.compare_exchange_strong(expected, b);
        absmax[b] = NAN;
        continue;
      }
      absmax[b] = amax;
      const float inv = detail::nf4_inv_scale(amax);
      if (len & 1) buf[len] = 0.f;  // pads the last low nibble with code 7 (0.0)
      uint8_t* out = packed + s / 2;
      for (int64_t i = 0; i < len; i += 2)
        out[i / 2] = detail::nf4_pack(detail::nf4_encode(buf[i] * inv), detail::nf4_encode(buf[i + 1] * inv));
    }
  });
}

// Scaled code table of one block: t[q] = code[q] * scale (the same float32 product).
inline void scaled_table(float scale, float* t) {
  for (int q = 0; q < 16; ++q) t[q] = detail::nf4_code(q) * scale;
}

inline float block_scale(const NF4View& w, int64_t b) {
  if (!w.double_quant()) return w.absmax.ptr<float>()[b];
  return detail::nf4_block_scale(nullptr, w.absmax.ptr<uint8_t>(), w.nested_absmax.ptr<float>(),
                                 w.nested_code.ptr<float>(), w.offset, b);
}

template <class T>
void dequantize_t(const NF4View& w, T* out) {
  const int64_t n = w.numel(), bs = w.blocksize, nb = w.nblocks();
  const uint8_t* p = w.packed.ptr<uint8_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / bs);
  detail::parallel_for(nb, grain, [&](int64_t b0, int64_t b1) {
    float t[16];
    for (int64_t b = b0; b < b1; ++b) {
      scaled_table(block_scale(w, b), t);
      const int64_t s = b * bs, len = std::min(bs, n - s);
      const uint8_t* src = p + s / 2;
      T* dst = out + s;
      const int64_t pairs = len / 2;
      for (int64_t k = 0; k < pairs; ++k) {
        const uint8_t byte = src[k];
        dst[2 * k] = detail::from_f32<T>(t[byte >> 4]);
        dst[2 * k + 1] = detail::from_f32<T>(t[byte & 15]);
      }
      if (len & 1) dst[len - 1] = detail::from_f32<T>(t[src[pairs] >> 4]);
    }
  });
}

// One output row n at a time: decode W[n, :] into a float row, then dot with each x row.
template <class T>
void gemv_t(const T* x, int64_t m, const NF4View& w, const T* bias, T* out) {
  const int64_t k = w.cols, rows = w.rows, bs = w.blocksize, n_el = w.numel();
  const uint8_t* p = w.packed.ptr<uint8_t>();
  std::vector<float> xf(static_cast<size_t>(m * k));
  for (int64_t i = 0; i < m * k; ++i) xf[i] = detail::to_f32(x[i]);
  detail::parallel_for(rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> wrow(static_cast<size_t>(k));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * k;
      for (int64_t j = 0; j < k;) {  // decode run by run: [j, end) lies in one block
        const int64_t e = base + j, b = e / bs;
        const int64_t end = std::min(k, std::min((b + 1) * bs, n_el) - base);
        const float scale = block_scale(w, b);
        for (; j < end; ++j) {
          const int64_t ei = base + j;
          const uint8_t byte = p[ei >> 1];
          wrow[j] = detail::nf4_code((ei & 1) ? (byte & 15) : (byte >> 4)) * scale;
        }
      }
      for (int64_t i = 0; i < m; ++i) {
        const float* xr = xf.data() + i * k;
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t j = 0;
        for (; j + 8 <= k; j += 8)
          for (int u = 0; u < 8; ++u) acc[u] += xr[j + u] * wrow[j + u];
        float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        for (; j < k; ++j) s += xr[j] * wrow[j];
        if (bias) s += detail::to_f32(bias[r]);
        out[i * rows + r] = detail::from_f32<T>(s);
      }
    }
  });
}

}  // namespace

void nf4_quantize(const TensorView& weight, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax) {
  std::atomic<int64_t> bad{-1};
  dispatch_float(weight.dtype, [&](auto tag) {
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
  detail::parallel_for(nn, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t s = c * kNF4NestedBlocksize, e = std::min(nb, s + kNF4NestedBlocksize);
      float amax = 0.f;
      for (int64_t i = s; i < e; ++i) amax = std::max(amax, std::fabs(absmax[i] - offset));
      nested_absmax[c] = amax;
      const float inv = detail::nf4_inv_scale(amax);
      for (int64_t i = s; i < e; ++i) q[i] = detail::dynamic_encode(code, (absmax[i] - offset) * inv);
    }
  });
}

void nf4_dequantize(const NF4View& w, const TensorView& out) {
  dispatch_float(out.dtype, [&](auto tag) {
    using T = decltype(tag);
    dequantize_t<T>(w, out.ptr<T>());
  });
}

void nf4_gemv(const TensorView& x, const NF4View& w, const TensorView& bias, const TensorView& out) {
  dispatch_float(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    gemv_t<T>(x.ptr<T>(), x.shape[0], w, bias.ptr<T>(), out.ptr<T>());
  });
}

}  // namespace lorart::cpu
