// Dense and NF4 base layers loaded from safetensors, against hand-computed values.
#include <cmath>
#include <cstring>
#include <string>

#include "lorart/base_layer.h"
#include "lorart/json.h"
#include "testing.h"

using namespace lorart;

namespace {
const float kNF4[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                        -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                        0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
                        0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};
SafetensorsFile file_of(const std::vector<NamedView>& t) {
  std::string img = serialize_safetensors(t);
  return SafetensorsFile::from_bytes(img.data(), img.size(), "layer.st");
}
}  // namespace

TEST(dense_forward_known_values) {
  float w[6] = {1, 2, 3, -1, 0, 0.5f}, b[2] = {0.25f, -1};
  SafetensorsFile f = file_of({{"l.weight", TensorView(w, DType::F32, {2, 3})}, {"l.bias", TensorView(b, DType::F32, {2})}});
  BaseLinear l = BaseLinear::load(f, "l");
  CHECK(!l.is_nf4 && l.in_features() == 3 && l.out_features() == 2);
  float x[3] = {1, 1, 2}, y[2];
  l.forward(TensorView(x, DType::F32, {1, 3}), TensorView(y, DType::F32, {1, 2}));
  CHECK_NEAR(y[0], 1 + 2 + 6 + 0.25, 1e-6);
  CHECK_NEAR(y[1], -1 + 0 + 1 - 1, 1e-6);
  CHECK_THROWS(l.forward(TensorView(x, DType::F32, {3, 1}), TensorView(y, DType::F32, {3, 2})),
               "expected x of shape [n, 3], got [3, 1]");
  CHECK_THROWS(DenseLinear::load(f, "nope"), "no tensor named 'nope.weight'");
  float bb[3] = {0, 0, 0};
  SafetensorsFile g = file_of({{"l.weight", TensorView(w, DType::F32, {2, 3})}, {"l.bias", TensorView(bb, DType::F32, {3})}});
  CHECK_THROWS(DenseLinear::load(g, "l"), "'l.bias': expected shape [2]");
}

namespace {
// A [2, 5] NF4 layer (n = 10, odd rows cross the byte boundary) with blocksize 64 (one block).
const uint8_t kCodes[10] = {15, 0, 7, 8, 14, 1, 3, 12, 9, 6};
std::vector<uint8_t> pack() {
  std::vector<uint8_t> p(5);
  for (int i = 0; i < 10; i += 2) p[i / 2] = static_cast<uint8_t>((kCodes[i] << 4) | kCodes[i + 1]);
  return p;
}
std::string quant_state(bool dq) {
  std::string s = R"({"quant_type":"nf4","blocksize":64,"dtype":"bfloat16","shape":[2,5])";
  if (dq) s += R"(,"nested_blocksize":256,"nested_dtype":"float32","nested_offset":0.5)";
  return s + "}";
}
}  // namespace

TEST(nf4_plain_and_double_quant) {
  std::vector<uint8_t> packed = pack();
  float qmap[16];
  std::memcpy(qmap, kNF4, sizeof qmap);
  for (bool dq : {false, true}) {
    std::string qs = quant_state(dq);
    float absmax_f[1] = {2.0f};
    uint8_t absmax_q[1] = {3};
    float nested_absmax[1] = {0.5f};
    float nested_code[256];
    for (int i = 0; i < 256; ++i) nested_code[i] = i / 255.f;
    std::vector<NamedView> t = {
        {"p.weight", TensorView(packed.data(), DType::U8, {5, 1})},
        {"p.weight.quant_map", TensorView(qmap, DType::F32, {16})},
        {"p.weight.quant_state.bitsandbytes__nf4", TensorView(qs.data(), DType::U8, {(int64_t)qs.size()})}};
    if (dq) {
      t.push_back({"p.weight.absmax", TensorView(absmax_q, DType::U8, {1})});
      t.push_back({"p.weight.nested_absmax", TensorView(nested_absmax, DType::F32, {1})});
      t.push_back({"p.weight.nested_quant_map", TensorView(nested_code, DType::F32, {256})});
    } else {
      t.push_back({"p.weight.absmax", TensorView(absmax_f, DType::F32, {1})});
    }
    SafetensorsFile f = file_of(t);
    BaseLinear l = BaseLinear::load(f, "p");
    CHECK(l.is_nf4 && l.nf4.double_quant() == dq && l.nf4.rows == 2 && l.nf4.cols == 5);
    CHECK(l.nf4.dtype == DType::BF16);
    const float am = dq ? (3 / 255.f) * 0.5f + 0.5f : 2.0f;
    Tensor w = l.nf4.dequantize();
    for (int i = 0; i < 10; ++i) CHECK_NEAR(w.ptr<float>()[i], kNF4[kCodes[i]] * am, 1e-7);
    float x[5] = {1, -1, 2, 0.5f, 3}, y[2];
    l.forward(TensorView(x, DType::F32, {1, 5}), TensorView(y, DType::F32, {1, 2}));
    for (int o = 0; o < 2; ++o) {
      double r = 0;
      for (int c = 0; c < 5; ++c) r += x[c] * kNF4[kCodes[o * 5 + c]] * am;
      CHECK_NEAR(y[o], r, 1e-5);
    }
  }
}

TEST(nf4_errors) {
  std::vector<uint8_t> packed = pack();
  float qmap[16];
  std::memcpy(qmap, kNF4, sizeof qmap);
  float absmax[1] = {2.f};
  auto build = [&](const std::string& qs, int64_t packed_n, bool fp4_map) {
    static std::string keep;
    keep = qs;
    float m[16];
    std::memcpy(m, qmap, sizeof m);
    if (fp4_map) m[3] = 0.123f;
    std::vector<NamedView> t = {
        {"p.weight", TensorView(packed.data(), DType::U8, {packed_n, 1})},
        {"p.weight.quant_map", TensorView(m, DType::F32, {16})},
        {"p.weight.absmax", TensorView(absmax, DType::F32, {1})},
        {"p.weight.quant_state.bitsandbytes__nf4", TensorView(keep.data(), DType::U8, {(int64_t)keep.size()})}};
    return file_of(t);
  };
  CHECK_THROWS(NF4Linear::load(build(quant_state(false), 4, false), "p"), "'p.weight': expected 5 bytes");
  CHECK_THROWS(NF4Linear::load(build(quant_state(false), 5, true), "p"), "not the NF4 table");
  CHECK_THROWS(NF4Linear::load(build(R"({"quant_type":"fp4","blocksize":64,"dtype":"float32","shape":[2,5]})", 5, false), "p"),
               "quant_type \"fp4\"");
  CHECK_THROWS(NF4Linear::load(build(R"({"quant_type":"nf4","blocksize":48,"dtype":"float32","shape":[2,5]})", 5, false), "p"),
               "power of two");
  CHECK_THROWS(NF4Linear::load(build(R"({"quant_type":"nf4","blocksize":64,"dtype":"float32"})", 5, false), "p"),
               "field \"shape\" missing");
  CHECK_THROWS(NF4Linear::load(build("{bad", 5, false), "p"), "bad JSON");
  CHECK_THROWS(NF4Linear::load(build(quant_state(true), 5, false), "p"), "expected dtype U8, got F32");
  CHECK_THROWS(NF4Linear::load(build(quant_state(false), 5, false), "q"), "'q.weight.quant_state.bitsandbytes__nf4': missing");
}

TEST_MAIN()
