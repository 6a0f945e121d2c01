// The 8-bit optimizer's quantisation on the host: the CPU lookup table gives the binary
// search's byte for every bucket (its ends and the floats around every decision point),
// the maps are sorted, and adamw8_step checks its arguments.
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "lorart/detail/optim8_math.h"
#include "lorart/optim.h"
#include "optim/dynamic_tables.h"
#include "testing.h"

using namespace lorart;
using detail::dynamic_quantize;
using detail::dynamic_quantize_lut;

namespace {

float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
uint32_t to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

int mismatches(int s, float x) {
  const auto& t = detail::dynamic_tables();
  return dynamic_quantize(t.mid[s], x) != dynamic_quantize_lut(t.lut[s], t.mid[s], x) ? 1 : 0;
}

}  // namespace

TEST(maps_sorted_with_expected_ends) {
  for (bool is_signed : {true, false}) {
    std::vector<float> c = dynamic_map(is_signed);
    CHECK(c.size() == 256);
    for (int i = 1; i < 256; ++i) CHECK(c[i - 1] < c[i]);
    CHECK(c[255] == 1.0f);
    CHECK(c[is_signed ? 127 : 0] == 0.0f);
  }
  CHECK(dynamic_map(true)[128] == static_cast<float>(1e-6) * 0.55f);
}

TEST(lut_matches_binary_search_in_every_bucket) {
  int bad = 0;
  std::mt19937 rng(1);
  auto r16 = [&rng] { return static_cast<uint32_t>(rng() & 0xffffu); };
  for (int s = 0; s < 2; ++s) {
    for (uint32_t k = 0; k < (1u << 16); ++k) {
      const uint32_t lo = k << 16, hi = lo | 0xffffu;
      for (uint32_t b : {lo, lo + 1, hi - 1, hi, lo + r16(), lo + r16()}) {
        const float x = from_bits(b);
        if (x == x) bad += mismatches(s, x);
      }
    }
  }
  CHECK(bad == 0);
}

TEST(lut_matches_binary_search_around_every_decision_point) {
  const auto& t = detail::dynamic_tables();
  int bad = 0;
  for (int s = 0; s < 2; ++s) {
    for (int i = 0; i < 255; ++i) {
      const uint32_t b = to_bits(t.mid[s][i]);
      for (int d = -3; d <= 3; ++d) bad += mismatches(s, from_bits(b + d));
      // the decision point itself goes to the lower code (ties to the lower index)
      CHECK(dynamic_quantize(t.mid[s], t.mid[s][i]) == static_cast<uint32_t>(i));
      CHECK(dynamic_quantize(t.mid[s], std::nextafter(t.mid[s][i], 2.0f)) == static_cast<uint32_t>(i + 1));
    }
  }
  CHECK(bad == 0);
}

TEST(nearest_code_and_special_values) {
  const auto& t = detail::dynamic_tables();
  for (int s = 0; s < 2; ++s) {
    for (int i = 0; i < 256; ++i) {  // every code maps to itself
      CHECK(dynamic_quantize(t.mid[s], t.code[s][i]) == static_cast<uint32_t>(i));
      CHECK(dynamic_quantize_lut(t.lut[s], t.mid[s], t.code[s][i]) == static_cast<uint32_t>(i));
    }
    const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
    CHECK(dynamic_quantize(t.mid[s], nan) == 0 && dynamic_quantize_lut(t.lut[s], t.mid[s], nan) == 0);
    CHECK(dynamic_quantize(t.mid[s], inf) == 255 && dynamic_quantize_lut(t.lut[s], t.mid[s], inf) == 255);
    CHECK(dynamic_quantize(t.mid[s], -inf) == 0 && dynamic_quantize_lut(t.lut[s], t.mid[s], -inf) == 0);
  }
  CHECK(detail::absmax_combine(detail::absmax_combine(0.0f, -2.0f), 1.0f) == 2.0f);
  CHECK(std::isnan(detail::absmax_combine(std::numeric_limits<float>::quiet_NaN(), 3.0f)));
  CHECK(std::isnan(detail::absmax_combine(3.0f, std::numeric_limits<float>::quiet_NaN())));
}

TEST(adamw8_step_checks_arguments) {
  std::vector<float> p(300, 1.0f), g(300, 0.5f), a1(2, 0.0f), a2(2, 0.0f), bad_a(1, 0.0f);
  std::vector<uint8_t> q1(300, 0), q2(300, 0);
  TensorView P(p.data(), DType::F32, {300}), G(g.data(), DType::F32, {300});
  TensorView Q1(q1.data(), DType::U8, {300}), Q2(q2.data(), DType::U8, {300});
  TensorView A1(a1.data(), DType::F32, {2}), A2(a2.data(), DType::F32, {2}), BA(bad_a.data(), DType::F32, {1});
  AdamWOptions o;
  adamw8_step({P}, {G}, {Q1}, {Q2}, {A1}, {A2}, {1}, o);
  CHECK(p[0] < 1.0f && a1[0] > 0.0f && a2[1] > 0.0f);
  using V = std::vector<TensorView>;
  auto step = [&](const TensorView& q1v, const TensorView& a1v, std::vector<int64_t> steps) {
    adamw8_step(V{P}, V{G}, V{q1v}, V{Q2}, V{a1v}, V{A2}, steps, o);
  };
  CHECK_THROWS(step(Q1, BA, {1}), "absmax_exp_avgs[0]`: expected 2 elements (ceil(params[0].numel / 256)), got 1");
  CHECK_THROWS(step(P, A1, {1}), "q_exp_avgs[0]`: expected dtype uint8");
  CHECK_THROWS(step(Q1, A1, {0}), "steps[0]");
  CHECK_THROWS(step(Q1, A1, {1, 2}), "of one length");
}

TEST_MAIN()
