// The CPU NF4 quantize, double quant and dequantize kernels through the public API (lorart/nf4.h), under the
// sanitizers in CI: tails and edges (a count that is no multiple of the blocksize, one block, a partial last
// block, odd counts, chunk boundaries, more than 256 blocks for the nested scales), buffers one element off
// an aligned start and sized exactly (ASan's redzone right after the last element), NaN/inf in input blocks
// and block scales, every dtype, on the x86 vector path and the portable loops (lorart::set_cpu_simd): both
// give the same bits, equal to an independent scalar reference of the format (nf4_testing.h).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "lorart/nf4.h"
#include "nf4_testing.h"
#include "testing.h"

using namespace lorart;
using namespace nf4t;

namespace {

// rows x cols: one element, odd counts, 31/32/33 and 63/64/65 around the blocksizes and the 32-element vector
// units, one partial block, rows spanning blocks, a 16384-element chunk boundary crossed with a partial tail,
// more than 256 blocks (two nested scales) at blocksize 64.
const int64_t kShapes[][2] = {{1, 1},  {1, 2},   {1, 31},  {1, 32},   {1, 33},   {3, 5},     {1, 64},
                              {5, 63}, {7, 96},  {2, 4096}, {3, 4097}, {17, 65}, {33, 520},  {1, 16449}};
const int64_t kBlocksizes[] = {32, 64, 128, 4096};

// Weights over six decades, an all-zero block, a block of tiny (subnormal in float32) values and negative
// zeros: every branch of the scale (absmax 0, a reciprocal that overflows) on both paths.
Buf make_weight(DType dt, int64_t n, int64_t bs, uint32_t seed, int64_t off) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::uniform_real_distribution<float> u(-3.f, 3.f);
  Buf w(dt, n, off);
  for (int64_t i = 0; i < n; ++i) w.set(i, nd(rng) * std::pow(10.f, u(rng)));
  const int64_t nb = (n + bs - 1) / bs;
  if (nb >= 3) {
    for (int64_t i = bs; i < 2 * bs; ++i) w.set(i, (i & 1) ? -0.f : 0.f);
    for (int64_t i = 2 * bs; i < std::min(n, 3 * bs); ++i) w.set(i, nd(rng) * 1e-40f);
  }
  return w;
}

struct Quantized {
  std::vector<uint8_t> packed;
  std::vector<float> absmax;
};

Quantized ref_quantize(const Buf& w, int64_t bs) {
  const int64_t n = w.n, nb = (n + bs - 1) / bs;
  Quantized q{std::vector<uint8_t>(static_cast<size_t>((n + 1) / 2)), std::vector<float>(static_cast<size_t>(nb))};
  std::vector<uint8_t> codes(static_cast<size_t>(n + 1), 7);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t s = b * bs, e = std::min(n, s + bs);
    float amax = 0.f;
    for (int64_t i = s; i < e; ++i) amax = std::max(amax, std::fabs(w.get(i)));
    q.absmax[b] = amax;
    const float inv = amax > 0.f ? 1.0f / amax : 0.f;
    for (int64_t i = s; i < e; ++i) codes[i] = encode(w.get(i) * inv);
  }
  for (int64_t k = 0; k < (n + 1) / 2; ++k) q.packed[k] = static_cast<uint8_t>(codes[2 * k] << 4 | codes[2 * k + 1]);
  return q;
}

Quantized run_quantize(Buf& w, int64_t bs, int64_t off) {
  const int64_t n = w.n, nb = (n + bs - 1) / bs;
  Buf packed(DType::U8, (n + 1) / 2, off), absmax(DType::F32, nb, off);
  nf4_quantize(w.view({n}), bs, packed.view({(n + 1) / 2, 1}), absmax.view({nb}));
  Quantized q{std::vector<uint8_t>(packed.as<uint8_t>(), packed.as<uint8_t>() + packed.n),
              std::vector<float>(absmax.as<float>(), absmax.as<float>() + nb)};
  return q;
}

bool same_floats(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

TEST(the_switch_picks_the_path) {
  // (both paths are only tested where the vector one exists: any x86-64 CPU with AVX2 + FMA + F16C, as CI's)
  const bool old = set_cpu_simd(false);
  CHECK(!cpu_simd_active());
  set_cpu_simd(true);
#if defined(__x86_64__)
  CHECK(cpu_simd_active());
#endif
  set_cpu_simd(old);
}

TEST(reference_rounding_is_ieee) {
  CHECK(round_bf16(1.0f) == 0x3f80 && round_bf16(-2.0f) == 0xc000);
  CHECK(round_bf16(from_bits(0x3f808000u)) == 0x3f80);  // a tie goes to the even bits
  CHECK(round_bf16(from_bits(0x3f818000u)) == 0x3f82);
  CHECK(round_bf16(from_bits(0x3f808001u)) == 0x3f81);
  CHECK(round_bf16(from_bits(0x7f7f8000u)) == 0x7f80);  // halfway past the largest finite: inf
  CHECK(round_f16(1.0f) == 0x3c00 && round_f16(65504.f) == 0x7bff && round_f16(65519.f) == 0x7bff);
  CHECK(round_f16(65520.f) == 0x7c00 && round_f16(-1e6f) == 0xfc00);
  CHECK(round_f16(1.0f + std::ldexp(1.f, -11)) == 0x3c00 && round_f16(1.0f + 3 * std::ldexp(1.f, -11)) == 0x3c02);
  CHECK(round_f16(std::ldexp(1.f, -24)) == 1 && round_f16(std::ldexp(1.f, -25)) == 0);  // subnormals, a tie to 0
  CHECK(round_f16(3 * std::ldexp(1.f, -26)) == 1 && round_f16(std::ldexp(1.f, -14)) == 0x0400);
  CHECK(encode(mid(6)) == 6 && encode(std::nextafter(mid(6), 1.f)) == 7 && encode(NAN) == 0);
}

TEST(quantize_matches_the_reference_on_both_paths) {
  int cases = 0;
  for (DType dt : kFloatTypes)
    for (int64_t bs : kBlocksizes)
      for (const auto& sh : kShapes)
        for (int64_t off : {0, 1}) {
          const int64_t n = sh[0] * sh[1];
          Buf w = make_weight(dt, n, bs, static_cast<uint32_t>(n * 7 + bs), off);
          const Quantized ref = ref_quantize(w, bs);
          Quantized got[2];
          on_both_paths([&](bool simd) { got[simd] = run_quantize(w, bs, off); });
          for (const Quantized& q : got) {
            const bool ok = q.packed == ref.packed && same_floats(q.absmax, ref.absmax);
            CHECK(ok);
            if (!ok) std::fprintf(stderr, "    dtype %s bs %lld n %lld off %lld\n", dtype_name(dt),
                                  (long long)bs, (long long)n, (long long)off);
          }
          ++cases;
        }
  CHECK(cases == 3 * 4 * 14 * 2);
}

TEST(quantize_ties_go_to_the_lower_code_on_both_paths) {
  // block max 1.0 (scale 1): the midpoints themselves, and the floats just above and below them
  for (int64_t n : {64, 95, 33}) {  // a whole vector block, and partial blocks (the portable loop)
    Buf w(DType::F32, n);
    std::vector<uint8_t> want(static_cast<size_t>(n), 7);
    for (int64_t i = 0; i < n; ++i) {
      if (i % 64 == 0) {  // each block's maximum
        w.set(i, 1.0f);
        want[i] = 15;
        continue;
      }
      const int j = static_cast<int>((i - 1) % 15), kind = static_cast<int>((i - 1) / 15 % 3);
      const float v = kind == 0 ? mid(j) : kind == 1 ? std::nextafter(mid(j), 2.f) : std::nextafter(mid(j), -2.f);
      w.set(i, v);
      want[i] = static_cast<uint8_t>(kind == 1 ? j + 1 : j);
    }
    on_both_paths([&](bool) {
      const Quantized q = run_quantize(w, 64, 0);
      for (int64_t i = 0; i < n; ++i) CHECK(((i & 1) ? q.packed[i / 2] & 15 : q.packed[i / 2] >> 4) == want[i]);
      if (n & 1) CHECK((q.packed.back() & 15) == 7);  // the pad nibble
    });
  }
}

TEST(quantize_refuses_nan_and_inf_naming_the_block_on_both_paths) {
  const float bad_values[] = {NAN, INFINITY, -INFINITY};
  const int64_t configs[][2] = {{256, 64}, {64 * 3 + 33, 64}, {300, 32}, {5, 64}};  // n, blocksize
  int thrown = 0;
  for (DType dt : kFloatTypes)
    for (const auto& c : configs) {
      const int64_t n = c[0], bs = c[1], nb = (n + bs - 1) / bs;
      for (int64_t b : {int64_t{0}, nb / 2, nb - 1})
        for (float bad : bad_values) {
          const int64_t s = b * bs, e = std::min(n, s + bs);
          for (int64_t pos : {s, (s + e) / 2, e - 1}) {
            Buf w = make_weight(dt, n, bs, 3, 1);
            w.set(pos, bad);
            if (b + 1 < nb) w.set(n - 1, NAN);  // a later bad block is not the one named
            const std::string msg = "argument `weight`: expected finite values, got NaN or inf in block " +
                                    std::to_string(b) + " (elements " + std::to_string(s) + ".." +
                                    std::to_string(e - 1) + ")";
            on_both_paths([&](bool) {
              CHECK_THROWS(run_quantize(w, bs, 0), msg.c_str());
              ++thrown;
            });
          }
        }
    }
  CHECK(thrown == 3 * 4 * 3 * 3 * 3 * 2);
}

TEST(quantize_names_the_first_bad_block_whatever_the_threads) {
  // (as the CUDA path does: its caller names the first non-finite absmax) The first bad block closes the first
  // thread's long chunk; the next chunk opens with another, which its thread reaches long before.
  const int old_threads = get_num_threads();
  const int64_t bs = 32, nb = 4096, n = nb * bs;
  Buf w(DType::F32, n);
  for (int64_t i = 0; i < n; ++i) w.set(i, static_cast<float>(i % 97) - 48.f);
  int wrong = 0;
  for (int threads : {2, 3}) {
    const int64_t chunk = (nb + threads - 1) / threads;  // parallel_for's chunks of blocks
    w.set((chunk - 1) * bs + 5, NAN);
    w.set(chunk * bs, INFINITY);
    const std::string msg = "in block " + std::to_string(chunk - 1) + " (";
    for (int rep = 0; rep < 3; ++rep)
      on_both_paths([&](bool) {
        set_num_threads(threads);
        try {
          run_quantize(w, bs, 0);
          ++wrong;
        } catch (const Error& e) {
          wrong += std::string(e.what()).find(msg) == std::string::npos;
        }
      });
    w.set((chunk - 1) * bs + 5, 1.f);
    w.set(chunk * bs, 1.f);
  }
  CHECK(wrong == 0);
  if (wrong) std::fprintf(stderr, "    %d of 12 named another block\n", wrong);
  set_num_threads(old_threads);
}

TEST(double_quant_matches_the_reference_on_both_paths) {
  const std::vector<float> code = dynamic_map(true);
  float mids[255];
  for (int j = 0; j < 255; ++j) mids[j] = (code[j] + code[j + 1]) * 0.5f;
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-3.f, 3.f);
  for (int64_t nb : {1, 7, 8, 9, 255, 256, 257, 600})
    for (int variant = 0; variant < 3; ++variant)  // random, all equal (nested scale 0), non-finite entries
      for (int64_t off : {0, 1}) {
        Buf a(DType::F32, nb, off);
        for (int64_t i = 0; i < nb; ++i) a.set(i, variant == 1 ? 0.5f : std::pow(10.f, u(rng)));
        if (variant == 2) {
          a.set(nb / 2, NAN);
          a.set(nb - 1, INFINITY);
        }
        float mean = 0.f;
        for (int64_t i = 0; i < nb; ++i) mean += a.get(i) / static_cast<float>(nb);
        if (variant == 2) mean = 1.0f;
        const int64_t nn = (nb + 255) / 256;
        std::vector<uint8_t> rq(static_cast<size_t>(nb));
        std::vector<float> rn(static_cast<size_t>(nn));
        for (int64_t c = 0; c < nn; ++c) {
          const int64_t s = c * 256, e = std::min(nb, s + 256);
          float amax = 0.f;
          for (int64_t i = s; i < e; ++i) amax = std::fabs(a.get(i) - mean) > amax ? std::fabs(a.get(i) - mean) : amax;
          rn[c] = amax;
          const float inv = amax > 0.f ? 1.0f / amax : 0.f;
          for (int64_t i = s; i < e; ++i) {
            const float x = (a.get(i) - mean) * inv;
            int q = 0;
            for (int j = 0; j < 255; ++j) q += x > mids[j] ? 1 : 0;
            rq[i] = static_cast<uint8_t>(q);
          }
        }
        Buf offset(DType::F32, 1, off), codeb(DType::F32, 256, off);
        offset.set(0, mean);
        std::memcpy(codeb.data(), code.data(), 256 * sizeof(float));
        on_both_paths([&](bool) {
          Buf q(DType::U8, nb, off), nested(DType::F32, nn, off);
          nf4_double_quant(a.view({nb}), offset.view({1}), codeb.view({256}), q.view({nb}), nested.view({nn}));
          CHECK(std::memcmp(q.data(), rq.data(), static_cast<size_t>(nb)) == 0);
          CHECK(std::memcmp(nested.data(), rn.data(), static_cast<size_t>(nn) * 4) == 0);
        });
      }
}

namespace {

// Dequantizes w into dt on both paths (the output one element off an aligned start when off = 1): the two
// give the same bytes and every value equals the reference's (decode in float32, one rounding to dt).
void check_dequantize(Weight& w, DType dt, int64_t off, const char* what) {
  Buf out[2];
  on_both_paths([&](bool simd) {
    out[simd] = Buf(dt, w.n(), off);
    nf4_dequantize(w.view(), out[simd].view({w.rows, w.cols}));
  });
  // (per block, the 16 possible values code * scale rounded to dt: the reference's decode, once per code)
  int64_t bad = 0;
  float table[16];
  for (int64_t i = 0; i < w.n(); ++i) {
    if (i == 0 || i % w.bs == 0)
      for (int q = 0; q < 16; ++q) table[q] = round_to(dt, kCode[q] * w.scale(i / w.bs));
    const uint8_t byte = w.packed.as<uint8_t>()[i / 2];
    bad += same_value(out[0].get(i), table[(i & 1) ? (byte & 15) : (byte >> 4)]) ? 0 : 1;
  }
  const bool same = out[0].same_bytes(out[1]);
  CHECK(bad == 0 && same);
  if (bad != 0 || !same)
    std::fprintf(stderr, "    %s: %lld x %lld bs %lld dq %d -> %s off %lld: %lld wrong values, paths %s\n", what,
                 (long long)w.rows, (long long)w.cols, (long long)w.bs, int(w.dq), dtype_name(dt), (long long)off,
                 (long long)bad, same ? "agree" : "differ");
}

}  // namespace

TEST(dequantize_matches_the_reference_on_both_paths) {
  for (int64_t bs : {32, 64, 128, 256, 4096})
    for (const auto& sh : kShapes)
      for (bool dq : {false, true})
        for (int64_t off : {0, 1}) {
          Weight w = random_weight(sh[0], sh[1], bs, dq, static_cast<uint32_t>(sh[0] * 131 + sh[1] + bs), off);
          for (DType dt : kFloatTypes) check_dequantize(w, dt, off, "random");
        }
}

TEST(dequantize_extreme_and_non_finite_scales_on_both_paths) {
  // block scales: zero, subnormal, tiny, around float16's overflow (some codes -> inf), huge, inf, NaN, negative
  const float scales[] = {0.f, 1e-40f, 1e-30f, 6.0e4f, 7.0e4f, 1e37f, 3e38f, INFINITY, NAN, -2.5f, -INFINITY};
  const int64_t ns = sizeof(scales) / sizeof(scales[0]);
  for (int64_t bs : {32, 64, 128})
    for (int64_t cols : {bs, bs + 1, 3 * bs - 7}) {
      Weight w = random_weight(ns, cols, bs, false, 9, 1);
      for (int64_t b = 0; b < w.nblocks(); ++b) w.absmax.as<float>()[b] = scales[b % ns];
      for (DType dt : kFloatTypes) check_dequantize(w, dt, 1, "scales");
    }
  // double quant: a NaN / inf nested scale spoils exactly the 256 blocks it covers
  Weight w = random_weight(40, 1024, 64, true, 11);  // 640 blocks: nested scales 0..2
  w.nested.as<float>()[1] = NAN;
  w.nested.as<float>()[2] = INFINITY;
  for (DType dt : kFloatTypes) {
    check_dequantize(w, dt, 0, "nested");
    Buf out(dt, w.n());
    nf4_dequantize(w.view(), out.view({w.rows, w.cols}));
    int64_t nan_outside = 0, finite_inside = 0;
    for (int64_t i = 0; i < w.n(); ++i) {
      const bool nested_bad = i / 64 >= 256;
      if (!nested_bad && !std::isfinite(out.get(i))) ++nan_outside;
      if (nested_bad && i / 64 < 512 && std::isfinite(out.get(i))) ++finite_inside;
    }
    CHECK(nan_outside == 0 && finite_inside == 0);
  }
}

TEST(zero_size_and_bad_arguments_are_refused_by_name) {
  std::vector<float> a(64, 1.f);
  std::vector<uint8_t> p(64);
  // quantize: documented as numel > 0
  CHECK_THROWS(nf4_quantize(TensorView(nullptr, DType::F32, {0, 64}), 64, TensorView(nullptr, DType::U8, {0}),
                            TensorView(nullptr, DType::F32, {0})),
               "argument `weight`: expected a non-empty tensor");
  for (int64_t bs : {0, 16, 48, 8192})
    CHECK_THROWS(nf4_quantize(TensorView(a.data(), DType::F32, {64}), bs, TensorView(p.data(), DType::U8, {32}),
                              TensorView(a.data(), DType::F32, {1})),
                 "argument `blocksize`: expected a power of two in [32, 4096]");
  CHECK_THROWS(nf4_quantize(TensorView(a.data(), DType::F32, {63}), 32, TensorView(p.data(), DType::U8, {31}),
                            TensorView(a.data(), DType::F32, {2})),
               "argument `packed`: expected 32 elements");
  CHECK_THROWS(nf4_quantize(TensorView(a.data(), DType::F32, {65}), 64, TensorView(p.data(), DType::U8, {33}),
                            TensorView(a.data(), DType::F32, {1})),
               "argument `absmax`: expected 2 elements");
  CHECK_THROWS(nf4_quantize(TensorView(p.data(), DType::U8, {64}), 64, TensorView(p.data(), DType::U8, {32}),
                            TensorView(a.data(), DType::F32, {1})),
               "argument `weight`: expected dtype float32|bfloat16|float16");
  // double quant of nothing
  CHECK_THROWS(nf4_double_quant(TensorView(nullptr, DType::F32, {0}), TensorView(a.data(), DType::F32, {1}),
                                TensorView(a.data(), DType::F32, {256}), TensorView(nullptr, DType::U8, {0}),
                                TensorView(nullptr, DType::F32, {0})),
               "argument `absmax`: expected a non-empty tensor");
  // dequantize: a weight with no rows or no columns, and a missing buffer
  Weight w = random_weight(2, 64, 64, false, 1);
  NF4View v = w.view();
  v.rows = 0;
  CHECK_THROWS(nf4_dequantize(v, TensorView(nullptr, DType::F32, {0, 64})), "expected rows > 0 and cols > 0");
  v = w.view();
  v.packed.data = nullptr;
  CHECK_THROWS(nf4_dequantize(v, TensorView(a.data(), DType::F32, {2, 64})), "argument `packed`: null data pointer");
  v = w.view();
  CHECK_THROWS(nf4_dequantize(v, TensorView(a.data(), DType::F32, {1, 64})), "argument `out`: expected 128 elements");
  // a lying shape: rows * cols past int64 (or past a byte count), refused before anything is computed from it
  for (int64_t rows : {int64_t{1} << 32, int64_t{1} << 62, int64_t{3037000500}}) {
    v = w.view();
    v.rows = rows;
    v.cols = rows == (int64_t{1} << 62) ? 4 : rows;
    CHECK_THROWS(nf4_dequantize(v, TensorView(a.data(), DType::F32, {2, 32})), "too many elements");
  }
  Weight wd = random_weight(2, 64, 64, true, 1);
  v = wd.view();
  v.nested_code = TensorView();
  CHECK_THROWS(nf4_dequantize(v, TensorView(a.data(), DType::F32, {2, 32})), "`nested_absmax`/`nested_code` are missing");
}

TEST_MAIN()
