// Shared by the NF4 kernel tests (test_nf4_*.cpp): exact-size heap buffers (so that AddressSanitizer's redzone
// sits right after the last element, optionally one element in from an aligned start), an independent scalar
// reference of the format (docs/nf4.md, written from the spec, no kernel code: its own code table, its own
// bfloat16/float16 rounding), random NF4 weights, and a switch that runs a check on both CPU paths.
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "lorart/nf4.h"
#include "lorart/optim.h"

namespace nf4t {

using lorart::DType;
using lorart::TensorView;

// ---- the format, from the spec -----------------------------------------------------------------
const float kCode[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                         -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                         0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
                         0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

inline float mid(int j) { return (kCode[j] + kCode[j + 1]) * 0.5f; }

// The nearest code, ties to the lower one: the number of midpoints strictly below x (NaN: 0).
inline uint8_t encode(float x) {
  int c = 0;
  for (int j = 0; j < 15; ++j) c += x > mid(j) ? 1 : 0;
  return static_cast<uint8_t>(c);
}

inline uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// bfloat16 / float16 as values (double), from their bits. Rounding picks, of the two neighbours, the nearer by a
// double difference, ties to the even bits; the bits past the largest finite value (0x7f80 / 0x7c00) stand for
// 2^128 / 2^16 there, so that overflow rounds to inf as IEEE says.
inline double bf16_value(uint16_t h) {
  if ((h & 0x7fff) == 0x7f80) return (h & 0x8000 ? -1.0 : 1.0) * std::ldexp(1.0, 128);
  return from_bits(static_cast<uint32_t>(h) << 16);
}
inline double f16_value(uint16_t h) {
  const int e = (h >> 10) & 31, m = h & 1023;
  const double s = h & 0x8000 ? -1.0 : 1.0;
  if (e == 31 && m != 0) return std::numeric_limits<double>::quiet_NaN();
  return s * (e == 0 ? std::ldexp(m, -24) : std::ldexp(1024 + m, e - 25));  // e == 31, m == 0: 2^16
}
inline uint16_t nearest_even(double x, uint16_t lo, double vlo, double vhi) {  // lo + 1 is the other neighbour
  const double dlo = std::fabs(x - vlo), dhi = std::fabs(x - vhi);
  if (dlo != dhi) return dlo < dhi ? lo : static_cast<uint16_t>(lo + 1);
  return (lo & 1) ? static_cast<uint16_t>(lo + 1) : lo;
}
inline uint16_t round_bf16(float f) {
  if (f != f) return 0x7fc0;
  const uint16_t sign = bits(f) >> 31 ? 0x8000 : 0, lo = static_cast<uint16_t>((bits(f) & 0x7fffffffu) >> 16);
  if (lo >= 0x7f80) return sign | 0x7f80;
  const double a = std::fabs(static_cast<double>(f));
  return sign | nearest_even(a, lo, bf16_value(lo), bf16_value(static_cast<uint16_t>(lo + 1)));
}
inline uint16_t round_f16(float f) {
  if (f != f) return 0x7e00;
  const uint16_t sign = bits(f) >> 31 ? 0x8000 : 0;
  const double a = std::fabs(static_cast<double>(f));
  if (a >= 65536.0) return sign | 0x7c00;
  // the largest bits with value <= a: the unit in the last place of a's binade (subnormals: 2^-24), a's floor in it
  const int e = a >= 0x1p-14 ? std::ilogb(a) : -14;
  const double ulp = std::ldexp(1.0, e - 10), q = std::floor(a / ulp);
  const uint16_t lo = static_cast<uint16_t>(a >= 0x1p-14 ? ((e + 15) << 10) | (static_cast<int>(q) - 1024)
                                                         : static_cast<int>(q));
  if (lo == 0x7c00) return sign | 0x7c00;
  return sign | nearest_even(a, lo, f16_value(lo), f16_value(static_cast<uint16_t>(lo + 1)));
}

// A float rounded to dtype dt, as a float (inf/NaN kept).
inline float round_to(DType dt, float f) {
  if (dt == DType::BF16) return static_cast<float>(bf16_value(round_bf16(f)));  // 0x7f80: 2^128 -> inf
  if (dt == DType::F16) {
    const uint16_t h = round_f16(f);
    if ((h & 0x7fff) == 0x7c00) return h & 0x8000 ? -INFINITY : INFINITY;
    return static_cast<float>(f16_value(h));
  }
  return f;
}

// ---- buffers -----------------------------------------------------------------------------------
// n elements of dt on the heap, exactly sized: data() is `off` elements past the allocation's start.
struct Buf {
  std::vector<unsigned char> mem;
  DType dt = DType::F32;
  int64_t n = 0, off = 0;
  Buf() = default;
  Buf(DType dt_, int64_t n_, int64_t off_ = 0)
      : mem(static_cast<size_t>((n_ + off_) * static_cast<int64_t>(lorart::dtype_size(dt_)))),
        dt(dt_), n(n_), off(off_) {}
  void* data() { return mem.empty() ? nullptr : mem.data() + off * lorart::dtype_size(dt); }
  const void* data() const { return mem.empty() ? nullptr : mem.data() + off * lorart::dtype_size(dt); }
  template <class T> T* as() { return static_cast<T*>(data()); }
  template <class T> const T* as() const { return static_cast<const T*>(data()); }
  TensorView view(std::initializer_list<int64_t> shape) { return TensorView(data(), dt, shape); }
  size_t nbytes() const { return static_cast<size_t>(n) * lorart::dtype_size(dt); }
  // Stores v rounded to dt (F32/BF16/F16 storage; U8 stores the byte).
  void set(int64_t i, float v) {
    if (dt == DType::F32) as<float>()[i] = v;
    else if (dt == DType::BF16) as<uint16_t>()[i] = round_bf16(v);
    else if (dt == DType::F16) as<uint16_t>()[i] = round_f16(v);
    else as<uint8_t>()[i] = static_cast<uint8_t>(v);
  }
  float get(int64_t i) const {
    if (dt == DType::F32) return as<float>()[i];
    if (dt == DType::U8) return as<uint8_t>()[i];
    const uint16_t h = as<uint16_t>()[i];
    if (dt == DType::BF16) return from_bits(static_cast<uint32_t>(h) << 16);
    if ((h & 0x7c00) == 0x7c00) return (h & 0x3ff) ? NAN : (h & 0x8000 ? -INFINITY : INFINITY);
    return static_cast<float>(f16_value(h));
  }
  bool same_bytes(const Buf& o) const { return nbytes() == o.nbytes() && std::memcmp(data(), o.data(), nbytes()) == 0; }
};

// Equal values, NaN matching NaN (-0 matching +0: a sum of products may give either).
inline bool same_value(float a, float b) { return a == b || (a != a && b != b); }

// ---- an NF4 weight -----------------------------------------------------------------------------
struct Weight {
  int64_t rows = 0, cols = 0, bs = 64;
  bool dq = false;
  Buf packed, absmax, nested, code;
  float offset = 0.f;
  int64_t n() const { return rows * cols; }
  int64_t nblocks() const { return (n() + bs - 1) / bs; }
  lorart::NF4View view() {
    lorart::NF4View v;
    v.packed = packed.view({(n() + 1) / 2, 1});
    v.absmax = absmax.view({nblocks()});
    if (dq) {
      v.nested_absmax = nested.view({nested.n});
      v.nested_code = code.view({256});
      v.offset = offset;
    }
    v.blocksize = bs;
    v.rows = rows;
    v.cols = cols;
    return v;
  }
  // The block scale and element i decoded in float32 (the product rounded on its own).
  float scale(int64_t b) const {
    if (!dq) return absmax.as<float>()[b];
    volatile float p = code.as<float>()[absmax.as<uint8_t>()[b]] * nested.as<float>()[b / 256];
    return p + offset;
  }
  float decode(int64_t i) const {
    const uint8_t byte = packed.as<uint8_t>()[i / 2];
    return kCode[(i & 1) ? (byte & 15) : (byte >> 4)] * scale(i / bs);
  }
};

// Random nibbles and block scales over six decades (double quant: random codes of the dynamic map, random
// nested scales and offset); every buffer `off` elements into its allocation.
inline Weight random_weight(int64_t rows, int64_t cols, int64_t bs, bool dq, uint32_t seed, int64_t off = 0) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-3.f, 3.f);
  Weight w;
  w.rows = rows, w.cols = cols, w.bs = bs, w.dq = dq;
  const int64_t nb = w.nblocks();
  w.packed = Buf(DType::U8, (w.n() + 1) / 2, off);
  for (int64_t i = 0; i < w.packed.n; ++i) w.packed.as<uint8_t>()[i] = static_cast<uint8_t>(rng());
  if (!dq) {
    w.absmax = Buf(DType::F32, nb, off);
    for (int64_t b = 0; b < nb; ++b) w.absmax.as<float>()[b] = std::pow(10.f, u(rng));
    return w;
  }
  w.absmax = Buf(DType::U8, nb, off);
  for (int64_t b = 0; b < nb; ++b) w.absmax.as<uint8_t>()[b] = static_cast<uint8_t>(rng());
  w.nested = Buf(DType::F32, (nb + 255) / 256, off);
  for (int64_t c = 0; c < w.nested.n; ++c) w.nested.as<float>()[c] = std::pow(10.f, u(rng));
  w.code = Buf(DType::F32, 256, off);
  const std::vector<float> dyn = lorart::dynamic_map(true);
  std::memcpy(w.code.data(), dyn.data(), 256 * sizeof(float));
  w.offset = std::pow(10.f, u(rng));
  return w;
}

// ---- the GEMV's reference ------------------------------------------------------------------------
// The LoRA term scale * xa B^T of lora_fused_linear_nf4 (xa float32 [M, R], B [rows, R] in x's dtype).
struct LoraTerm {
  const Buf* xa = nullptr;
  const Buf* B = nullptr;
  int64_t R = 0;
  double scale = 0.0;
};

// The double-precision product x W^T + bias (+ the LoRA term) with the weights as stored (wt), and the sum of the
// magnitudes of its terms per output (for an error bound).
struct Reference {
  std::vector<double> y, mag;
  int64_t m = 0, rows = 0, k = 0, R = 0;
};
inline Reference reference(const Buf& x, int64_t m, const Weight& w, const std::vector<double>& wt, const Buf* bias,
                           const LoraTerm& lora = {}) {
  Reference ref{std::vector<double>(static_cast<size_t>(m * w.rows)), std::vector<double>(static_cast<size_t>(m * w.rows)),
                m, w.rows, w.cols, lora.R};
  const int64_t k = w.cols;
  std::vector<double> xd(static_cast<size_t>(m * k));
  for (int64_t i = 0; i < m * k; ++i) xd[i] = x.get(i);
  const double* xp = xd.data();
  const double* wp = wt.data();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t r = 0; r < w.rows; ++r) {
      double s = bias ? bias->get(r) : 0.0, a = std::fabs(s);
      const double *xr = xp + i * k, *wr = wp + r * k;
      for (int64_t j = 0; j < k; ++j) {
        const double p = xr[j] * wr[j];
        s += p;
        a += std::fabs(p);
      }
      for (int64_t j = 0; j < lora.R; ++j) {
        const double p = lora.scale * lora.xa->get(i * lora.R + j) * lora.B->get(r * lora.R + j);
        s += p;
        a += std::fabs(p);
      }
      ref.y[i * w.rows + r] = s;
      ref.mag[i * w.rows + r] = a;
    }
  return ref;
}

// out against the reference: the same non-finite class (NaN, +inf, -inf) and finite values within float32
// summation's error bound plus the one rounding to dt. The kernels keep at least eight float32 accumulators (vector
// lanes or an array) of at most ceil(k / 8) sequential products each, combine them in a tree and add at most 7 tail
// products, the bias and the LoRA term (R products) after: 2 (k / 8 + R + 12) u sum |terms| bounds that with a
// margin of two. Returns the number of misses.
inline int64_t misses(const Buf& out, const Reference& ref, DType dt) {
  const double u = std::ldexp(1.0, -24), rel = dt == DType::F32 ? u : dt == DType::BF16 ? 0x1p-8 : 0x1p-10;
  const double abs_floor = dt == DType::F16 ? 0x1p-24 : 0.0;
  int64_t miss = 0;
  for (int64_t i = 0; i < ref.m * ref.rows; ++i) {
    const double s = ref.y[i], got = out.get(i);
    bool ok;
    if (!std::isfinite(s) || !std::isfinite(got)) ok = (std::isnan(s) && std::isnan(got)) || s == got;
    else ok = std::fabs(got - s) <= 2.0 * static_cast<double>(ref.k / 8 + ref.R + 12) * u * ref.mag[i] + rel * std::fabs(s) + abs_floor;
    if (!ok && miss < 3)
      std::fprintf(stderr, "    out[%lld, %lld] = %.9g, reference %.9g\n", (long long)(i / ref.rows),
                   (long long)(i % ref.rows), got, s);
    miss += ok ? 0 : 1;
  }
  return miss;
}

// ---- the two CPU paths -------------------------------------------------------------------------
// Runs f(simd) with the x86 vector paths on (simd = true; where the CPU has them) and off (the portable loops),
// restoring the setting after.
inline void on_both_paths(const std::function<void(bool)>& f) {
  const bool old = lorart::set_cpu_simd(true);
  try {
    f(true);
    lorart::set_cpu_simd(false);
    f(false);
  } catch (...) {
    lorart::set_cpu_simd(old);
    throw;
  }
  lorart::set_cpu_simd(old);
}

const DType kFloatTypes[3] = {DType::F32, DType::BF16, DType::F16};

}  // namespace nf4t
