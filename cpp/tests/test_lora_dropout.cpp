// The CPU dropout row (AVX2 when the CPU has it) against the scalar definition lora_dropout_keep, element by
// element: every storage type, row lengths around the 8-lane width, unaligned pointers, in place, and 64-bit
// element indices whose low word wraps inside a vector (once per 2^32 elements: the high word changes there).
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/cpu_loop.h"
#include "common/half.h"
#include "lora/lora_cpu.h"
#include "lorart/detail/lora_math.h"
#include "testing.h"

using namespace lorart;
using namespace lorart::detail;

namespace {

template <class T>
bool same_bits(const T& a, const T& b) { return std::memcmp(&a, &b, sizeof(T)) == 0; }

template <class T>
int check_row(int64_t K, uint64_t base, double p, uint64_t seed, int offset) {
  const LoraDropoutKey key = lora_dropout_key(seed, p);
  const auto scale = static_cast<typename Compute<T>::type>(1.0 / (1.0 - p));
  std::vector<T> x(K + offset), out(K + offset), inplace;
  for (int64_t k = 0; k < K + offset; ++k) {
    const float v = static_cast<float>((k * 7919) % 113) * 0.37f - 20.f;
    if constexpr (std::is_same_v<T, double>) x[k] = v; else x[k] = from_f32<T>(v);
  }
  inplace = x;
  cpu_lora_dropout_row<T>(x.data() + offset, out.data() + offset, K, base, key, scale);
  cpu_lora_dropout_row<T>(inplace.data() + offset, inplace.data() + offset, K, base, key, scale);
  int bad = 0;
  for (int64_t k = 0; k < K; ++k) {
    const bool keep = lora_dropout_keep(key, base + static_cast<uint64_t>(k));
    typename Compute<T>::type v = keep ? load(x[offset + k]) * scale : typename Compute<T>::type(0);
    T want;
    if constexpr (std::is_same_v<T, double>) want = v; else want = from_f32<T>(v);
    bad += !same_bits(out[offset + k], want) || !same_bits(inplace[offset + k], want);
  }
  return bad;
}

template <class T>
void check_all() {
  const uint64_t bases[] = {0, 1, 12345, (1ull << 32) - 8, (1ull << 32) - 5, (1ull << 32) - 1, (1ull << 32),
                            (7ull << 32) - 3, ~0ull - 100};
  for (int64_t K : {1, 7, 8, 9, 16, 17, 63, 64, 577})
    for (uint64_t base : bases)
      for (double p : {0.0, 0.05, 0.5, 0.97})
        for (int offset : {0, 1, 3}) CHECK(check_row<T>(K, base, p, 0x123456789abcdefull + K, offset) == 0);
}

}  // namespace

TEST(dropout_row_float) { check_all<float>(); }
TEST(dropout_row_bf16) { check_all<bf16>(); }
TEST(dropout_row_f16) { check_all<f16>(); }
TEST(dropout_row_double) { check_all<double>(); }

TEST_MAIN()
