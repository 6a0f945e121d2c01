// The CPU NF4 GEMV / small-M linear (lorart::nf4_gemv) under the sanitizers in CI: M = 1, 2, 3, 4, 5, 15, 16, 17
// (and more), row counts odd and even (the vector path takes weight rows in pairs, a chunk's last one alone),
// K a multiple of 64 (the vector path) and not (33, 65, 100: the portable loop), every blocksize kind, double
// quant, bias or none, x/bias/out one element off an aligned start, NaN/inf in x and in block scales, zero rows;
// on the x86 vector path and the portable loops (lorart::set_cpu_simd). Each is checked against a
// double-precision product of the weights as nf4_dequantize stores them (an error bound of float32 sums), one-hot
// rows pick single weights exactly, and the properties the kernels promise are checked bit for bit.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "lorart/nf4.h"
#include "nf4_testing.h"
#include "testing.h"

using namespace lorart;
using namespace nf4t;

namespace {

const int64_t kRowCounts[] = {1, 2, 3, 4, 5, 15, 16, 17};
// rows x cols x blocksize: K % 64 == 0 with blocksize >= 64 (the vector GEMV) and everything else
const int64_t kShapes[][3] = {{1, 64, 64},   {2, 128, 128}, {3, 192, 64},  {17, 64, 64}, {33, 640, 128},
                              {5, 100, 32},  {4, 33, 64},   {3, 65, 32},   {16, 96, 32}, {1, 1, 64},
                              {2, 1, 32},    {7, 256, 256}, {3, 4096, 4096}, {5, 192, 128}, {9, 64, 256},
                              {40, 512, 64}};  // (a block over 1.5 rows; over 4 rows; 320 blocks: 2 nested scales)

Buf random_x(DType dt, int64_t n, uint32_t seed, int64_t off) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  Buf x(dt, n, off);
  for (int64_t i = 0; i < n; ++i) x.set(i, nd(rng) * 0.0625f);
  return x;
}

// The weights as nf4_dequantize stores them in dt (decoded in float32, rounded once), as doubles.
std::vector<double> stored_weights(const Weight& w, DType dt) {
  std::vector<double> wt(static_cast<size_t>(w.n()));
  for (int64_t i = 0; i < w.n(); ++i) wt[i] = round_to(dt, w.decode(i));
  return wt;
}

Buf run_gemv(Buf& x, int64_t m, Weight& w, Buf* bias, DType dt, int64_t off) {
  Buf out(dt, m * w.rows, off);
  nf4_gemv(x.view({m, w.cols}), w.view(), bias ? bias->view({w.rows}) : TensorView(), out.view({m, w.rows}));
  return out;
}

}  // namespace

TEST(gemv_matches_the_double_reference_on_both_paths) {
  const int old_threads = get_num_threads();
  int64_t outputs = 0, differing = 0, cases = 0;
  for (const auto& sh : kShapes)
    for (DType dt : kFloatTypes)
      for (bool dq : {false, true}) {
        const int64_t rows = sh[0], k = sh[1], bs = sh[2];
        Weight w = random_weight(rows, k, bs, dq, static_cast<uint32_t>(rows * 1000 + k + dq), dq ? 1 : 0);
        const std::vector<double> wt = stored_weights(w, dt);
        for (int64_t m : kRowCounts) {
          const int64_t off = (m + dq) & 1;
          const bool with_bias = m % 3 != 0;
          set_num_threads(1 + static_cast<int>(cases++ % 3));  // 1, 2, 3 threads: odd and even row chunks
          Buf x = random_x(dt, m * k, static_cast<uint32_t>(m * 31 + k), off), bias = random_x(dt, rows, 77, off);
          for (int64_t i = 0; i < rows; ++i) bias.set(i, bias.get(i) * 16.f);
          const Reference ref = reference(x, m, w, wt, with_bias ? &bias : nullptr);
          Buf out[2];
          on_both_paths([&](bool simd) {
            out[simd] = run_gemv(x, m, w, with_bias ? &bias : nullptr, dt, off);
            const int64_t miss = misses(out[simd], ref, dt);
            CHECK(miss == 0);
            if (miss)
              std::fprintf(stderr, "    %lld x %lld bs %lld dq %d %s M %lld %s: %lld misses\n", (long long)rows,
                           (long long)k, (long long)bs, int(dq), dtype_name(dt), (long long)m,
                           simd ? "vector" : "portable", (long long)miss);
          });
          // The vector GEMV (K % 64 == 0, blocksize >= 64) sums in another order than the portable loop: the same
          // within rounding, not the same bits (counted and reported). Elsewhere both paths run the portable sums
          // over weights decoded to the same bits: the same bits.
          int64_t diff = 0;
          for (int64_t i = 0; i < m * rows; ++i)
            diff += std::memcmp(out[0].as<unsigned char>() + i * dtype_size(dt),
                                out[1].as<unsigned char>() + i * dtype_size(dt), dtype_size(dt)) != 0;
          if (k % 64 == 0 && bs >= 64) {
            outputs += m * rows;
            differing += diff;
          } else {
            CHECK(diff == 0);
          }
        }
      }
  set_num_threads(old_threads);
  std::printf("  gemv: %lld of %lld outputs of the vector GEMV differ in their bits from the portable loop's\n",
              (long long)differing, (long long)outputs);
}

TEST(gemv_one_hot_rows_pick_the_stored_weights_exactly) {
  // x = e_j: out = W[:, j] as nf4_dequantize stores it, for every column (the vector path's permuted order, its
  // bfloat16 byte tables, a partial tail), with one x row (decode and dot fused) and with 16 (a decoded row shared)
  const int64_t shapes[][4] = {{5, 192, 64, 0}, {3, 256, 128, 0}, {4, 100, 32, 0}, {3, 128, 64, 1}, {17, 64, 64, 1}};
  for (const auto& sh : shapes)
    for (DType dt : kFloatTypes) {
      Weight w = random_weight(sh[0], sh[1], sh[2], sh[3] != 0, 21);
      const std::vector<double> wt = stored_weights(w, dt);
      const int64_t k = w.cols;
      on_both_paths([&](bool) {
        int64_t bad = 0;
        for (int64_t m : {1, 16})
          for (int64_t j0 = 0; j0 < k; j0 += m) {
            Buf x(dt, m * k);
            for (int64_t i = 0; i < m && j0 + i < k; ++i) x.set(i * k + j0 + i, 1.f);
            Buf out = run_gemv(x, m, w, nullptr, dt, 0);
            for (int64_t i = 0; i < m && j0 + i < k; ++i)
              for (int64_t r = 0; r < w.rows; ++r) bad += same_value(out.get(i * w.rows + r), wt[r * k + j0 + i]) ? 0 : 1;
          }
        CHECK(bad == 0);
      });
    }
}

TEST(gemv_row_pairs_and_single_rows_give_the_same_bits) {
  // The vector path decodes two weight rows per pass (dot_rows2) and a chunk's odd row alone (dot_rows), promising
  // the same sums in the same order: every row of a many-row weight equals the same row given as a one-row weight.
  for (DType dt : kFloatTypes)
    for (int64_t k : {64, 192, 640})
      for (int64_t rows : {3, 17}) {
        Weight w = random_weight(rows, k, 64, false, static_cast<uint32_t>(k + rows));
        for (int64_t m : {1, 2, 3, 5, 16, 17}) {
          Buf x = random_x(dt, m * k, static_cast<uint32_t>(m), 0);
          on_both_paths([&](bool) {
            Buf full = run_gemv(x, m, w, nullptr, dt, 0);
            int64_t bad = 0;
            for (int64_t r = 0; r < rows; ++r) {
              NF4View v = w.view();
              v.packed = TensorView(w.packed.as<uint8_t>() + r * k / 2, DType::U8, {k / 2});
              v.absmax = TensorView(w.absmax.as<float>() + r * k / 64, DType::F32, {k / 64});
              v.rows = 1;
              Buf one(dt, m);
              nf4_gemv(x.view({m, k}), v, TensorView(), one.view({m, 1}));
              for (int64_t i = 0; i < m; ++i)
                bad += std::memcmp(one.as<unsigned char>() + i * dtype_size(dt),
                                   full.as<unsigned char>() + (i * rows + r) * dtype_size(dt), dtype_size(dt)) != 0;
            }
            CHECK(bad == 0);
          });
        }
      }
}

TEST(gemv_portable_path_does_not_depend_on_m) {
  // Each x row's sums are its own on the portable loops: row i of an M-row call has the bits of a one-row call.
  set_cpu_simd(false);
  for (const auto& sh : kShapes)
    for (DType dt : kFloatTypes) {
      Weight w = random_weight(sh[0], sh[1], sh[2], true, 3);
      const int64_t m = 17, k = w.cols;
      Buf x = random_x(dt, m * k, 8, 0), bias = random_x(dt, w.rows, 9, 0);
      Buf full = run_gemv(x, m, w, &bias, dt, 0);
      int64_t bad = 0;
      for (int64_t i = 0; i < m; ++i) {
        Buf xi(dt, k);
        std::memcpy(xi.data(), x.as<unsigned char>() + i * k * dtype_size(dt), xi.nbytes());
        Buf one = run_gemv(xi, 1, w, &bias, dt, 0);
        bad += std::memcmp(one.data(), full.as<unsigned char>() + i * w.rows * dtype_size(dt), one.nbytes()) != 0;
      }
      CHECK(bad == 0);
    }
  set_cpu_simd(true);
}

TEST(gemv_non_finite_inputs_stay_in_their_rows_and_columns) {
  // NaN / inf in one x row spoil that output row only (the vector path shares weight loads across four x rows);
  // a NaN or inf block scale spoils the output columns whose weight rows it covers, for every x row.
  for (DType dt : kFloatTypes)
    for (const auto& sh : {std::vector<int64_t>{6, 128, 64}, std::vector<int64_t>{6, 100, 32}})
      for (int64_t m : {1, 3, 5, 16}) {
        Weight w = random_weight(sh[0], sh[1], sh[2], false, 13);
        const int64_t k = w.cols;
        w.absmax.as<float>()[(2 * k) / sh[2]] = NAN;      // the block holding W[2, 0]
        w.absmax.as<float>()[(4 * k + k - 1) / sh[2]] = INFINITY;  // the block holding W[4, k - 1]
        const std::vector<double> wt = stored_weights(w, dt);
        std::vector<char> spoilt_col(static_cast<size_t>(w.rows), 0);  // weight rows touching a non-finite scale
        for (int64_t i = 0; i < w.n(); ++i) spoilt_col[i / k] |= !std::isfinite(w.scale(i / w.bs));
        Buf x = random_x(dt, m * k, 4, 1);
        x.set(0 * k + k / 2, NAN);
        if (m > 1) x.set(1 * k + 3, INFINITY);
        if (m > 2) x.set((m - 1) * k + k - 1, -INFINITY);
        const Reference ref = reference(x, m, w, wt, nullptr);
        on_both_paths([&](bool simd) {
          Buf out = run_gemv(x, m, w, nullptr, dt, 1);
          CHECK(misses(out, ref, dt) == 0);
          int64_t leaks = 0;
          for (int64_t i = 0; i < m; ++i)
            for (int64_t r = 0; r < w.rows; ++r) {
              const bool spoilt_row = i == 0 || (m > 1 && i == 1) || (m > 2 && i == m - 1);
              if (!spoilt_row && !spoilt_col[r] && !std::isfinite(out.get(i * w.rows + r))) ++leaks;
            }
          CHECK(leaks == 0);
          (void)simd;
        });
      }
}

TEST(gemv_zero_rows_and_bad_arguments) {
  Weight w = random_weight(3, 64, 64, true, 2);
  std::vector<float> b(3);
  // M = 0: nothing to do, null data pointers fine, nothing written
  on_both_paths([&](bool) {
    nf4_gemv(TensorView(nullptr, DType::F32, {0, 64}), w.view(), TensorView(b.data(), DType::F32, {3}),
             TensorView(nullptr, DType::F32, {0, 3}));
  });
  std::vector<float> x(2 * 64), out(2 * 3);
  CHECK_THROWS(nf4_gemv(TensorView(x.data(), DType::F32, {2, 63}), w.view(), TensorView(), TensorView(out.data(), DType::F32, {2, 3})),
               "argument `x`: expected 64 columns");
  CHECK_THROWS(nf4_gemv(TensorView(x.data(), DType::F32, {128}), w.view(), TensorView(), TensorView(out.data(), DType::F32, {2, 3})),
               "argument `x`: expected a 2-d tensor");
  CHECK_THROWS(nf4_gemv(TensorView(x.data(), DType::F32, {2, 64}), w.view(), TensorView(), TensorView(out.data(), DType::BF16, {2, 3})),
               "argument `out`: expected dtype float32");
  CHECK_THROWS(nf4_gemv(TensorView(x.data(), DType::F32, {2, 64}), w.view(), TensorView(b.data(), DType::F32, {2}),
                        TensorView(out.data(), DType::F32, {2, 3})),
               "argument `bias`: expected 3 elements");
  CHECK_THROWS(nf4_gemv(TensorView(nullptr, DType::F32, {2, 64}), w.view(), TensorView(), TensorView(out.data(), DType::F32, {2, 3})),
               "argument `x`: null data pointer");
}

TEST_MAIN()
