// lora_fused_linear_nf4 (lorart/lora.h), the NF4 GEMV with a LoRA term added before its one rounding, under the
// sanitizers in CI: M = 1..16, ranks 1, 3, 8, K a multiple of 64 (the vector GEMV) and not, double quant, buffers
// one element off an aligned start, on both CPU paths (lorart::set_cpu_simd), against a double-precision
// reference (nf4_testing.h); a zero scale leaves nf4_gemv's values; bad arguments are refused by name.
#include <cmath>
#include <random>
#include <vector>

#include "lorart/lora.h"
#include "lorart/nf4.h"
#include "nf4_testing.h"
#include "testing.h"

using namespace lorart;
using namespace nf4t;

namespace {

Buf random_buf(DType dt, int64_t n, uint32_t seed, float scale, int64_t off = 0) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  Buf b(dt, n, off);
  for (int64_t i = 0; i < n; ++i) b.set(i, nd(rng) * scale);
  return b;
}

}  // namespace

TEST(lora_fused_linear_nf4_matches_the_double_reference_on_both_paths) {
  const int64_t shapes[][4] = {{17, 128, 64, 0}, {5, 100, 32, 1}, {3, 192, 64, 1}, {16, 640, 128, 0}, {2, 33, 64, 0}};
  int cases = 0;
  for (const auto& sh : shapes)
    for (DType dt : kFloatTypes) {
      Weight w = random_weight(sh[0], sh[1], sh[2], sh[3] != 0, 17, 1);
      const int64_t rows = w.rows, k = w.cols;
      const std::vector<double> wt = [&] {
        std::vector<double> v(static_cast<size_t>(w.n()));
        for (int64_t i = 0; i < w.n(); ++i) v[i] = round_to(dt, w.decode(i));
        return v;
      }();
      for (int64_t m : {1, 2, 3, 5, 15, 16})
        for (int64_t R : {1, 3, 8}) {
          const int64_t off = (m + R) & 1;
          Buf x = random_buf(dt, m * k, static_cast<uint32_t>(m + R), 0.0625f, off);
          Buf xa = random_buf(DType::F32, m * R, 5, 1.f, off), B = random_buf(dt, rows * R, 6, 0.5f, off);
          Buf bias = random_buf(dt, rows, 7, 1.f, off);
          const bool with_bias = R != 3;
          const double scale = 0.75;
          const Reference ref = reference(x, m, w, wt, with_bias ? &bias : nullptr, LoraTerm{&xa, &B, R, scale});
          on_both_paths([&](bool simd) {
            Buf y(dt, m * rows, off);
            lora_fused_linear_nf4(x.view({m, k}), w.view(), with_bias ? bias.view({rows}) : TensorView(),
                                  xa.view({m, R}), B.view({rows, R}), scale, y.view({m, rows}));
            const int64_t miss = misses(y, ref, dt);
            CHECK(miss == 0);
            if (miss)
              std::fprintf(stderr, "    %lld x %lld %s M %lld R %lld %s\n", (long long)rows, (long long)k,
                           dtype_name(dt), (long long)m, (long long)R, simd ? "vector" : "portable");
            // scale 0: nf4_gemv's values
            Buf y0(dt, m * rows), g(dt, m * rows);
            lora_fused_linear_nf4(x.view({m, k}), w.view(), TensorView(), xa.view({m, R}), B.view({rows, R}), 0.0,
                                  y0.view({m, rows}));
            nf4_gemv(x.view({m, k}), w.view(), TensorView(), g.view({m, rows}));
            int64_t differ = 0;
            for (int64_t i = 0; i < m * rows; ++i) differ += same_value(y0.get(i), g.get(i)) ? 0 : 1;
            CHECK(differ == 0);
          });
          ++cases;
        }
    }
  CHECK(cases == 5 * 3 * 6 * 3);
}

TEST(lora_fused_linear_nf4_refuses_bad_arguments_by_name) {
  Weight w = random_weight(3, 64, 64, false, 1);
  const int64_t R = 2;
  Buf x(DType::F32, 17 * 64), xa(DType::F32, 17 * R), B(DType::F32, 3 * R), y(DType::F32, 17 * 3);
  // M = 0: nothing to do, null data pointers fine
  on_both_paths([&](bool) {
    lora_fused_linear_nf4(TensorView(nullptr, DType::F32, {0, 64}), w.view(), TensorView(),
                          TensorView(nullptr, DType::F32, {0, R}), B.view({3, R}), 1.0, TensorView(nullptr, DType::F32, {0, 3}));
  });
  CHECK_THROWS(lora_fused_linear_nf4(x.view({17, 64}), w.view(), TensorView(), xa.view({17, R}), B.view({3, R}), 1.0,
                                     y.view({17, 3})),
               "argument `x`: the fused small-M path takes at most 16 rows, got 17");
  CHECK_THROWS(lora_fused_linear_nf4(x.view({2, 64}), w.view(), TensorView(), TensorView(nullptr, DType::F32, {2, R}),
                                     B.view({3, R}), 1.0, y.view({2, 3})),
               "argument `xa`: null data pointer");
  CHECK_THROWS(lora_fused_linear_nf4(x.view({2, 64}), w.view(), TensorView(), xa.view({2, R}),
                                     TensorView(nullptr, DType::F32, {3, R}), 1.0, y.view({2, 3})),
               "argument `B`: null data pointer");
  CHECK_THROWS(lora_fused_linear_nf4(x.view({2, 64}), w.view(), TensorView(), xa.view({2, R}), B.view({3, R}), 1.0,
                                     TensorView(nullptr, DType::F32, {2, 3})),
               "argument `y`: null data pointer");
  CHECK_THROWS(lora_fused_linear_nf4(x.view({2, 64}), w.view(), TensorView(), xa.view({2, R}), B.view({2, R}), 1.0,
                                     y.view({2, 3})),
               "argument `B`");
}

TEST_MAIN()
