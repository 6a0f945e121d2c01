// AdapterStore: PEFT folders in, y += s * (x @ A.T) @ B.T out; errors; concurrency.
#include <sys/stat.h>

#include <atomic>
#include <cmath>
#include <fstream>
#include <thread>

#include "common/half.h"
#include "lorart/adapter_store.h"
#include "lorart/safetensors.h"
#include "testing.h"

using namespace lorart;

namespace {
std::string tmpdir() {
  static std::string d = [] {
    char tmpl[] = "/tmp/lorart_store_XXXXXX";
    char* p = mkdtemp(tmpl);
    return std::string(p ? p : "/tmp");
  }();
  return d;
}

// Module "m.q" with in=3, out=2, r=2: A = [[1,0,2],[0,1,-1]], B = [[1,2],[0.5,-1]] (+ c * 0.5 per adapter).
std::string make_adapter(const std::string& name, float c, const std::string& config, DType dt = DType::F32,
                         bool drop_b = false) {
  std::string dir = tmpdir() + "/" + name;
  ::mkdir(dir.c_str(), 0755);
  std::ofstream(dir + "/adapter_config.json") << config;
  float a[6] = {1, 0, 2, 0, 1, -1};
  float b[4] = {1 + c, 2, 0.5f, -1};
  uint16_t ah[6], bh[4];
  for (int i = 0; i < 6; ++i) ah[i] = detail::f32_to_bf16(a[i]);
  for (int i = 0; i < 4; ++i) bh[i] = detail::f32_to_bf16(b[i]);
  bool half = dt == DType::BF16;
  std::vector<NamedView> t = {
      {"base_model.model.m.q.lora_A.weight", TensorView(half ? (void*)ah : (void*)a, dt, {2, 3})}};
  if (!drop_b) t.push_back({"base_model.model.m.q.lora_B.weight", TensorView(half ? (void*)bh : (void*)b, dt, {2, 2})});
  save_safetensors(dir + "/adapter_model.safetensors", t);
  return dir;
}

const char* kCfg = R"({"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q"],"use_rslora":false,"bias":"none"})";

// Reference: y += s * (x @ A.T) @ B.T with the values of make_adapter.
void reference(const float* x, float c, float s, float* y, int n) {
  float a[6] = {1, 0, 2, 0, 1, -1}, b[4] = {1 + c, 2, 0.5f, -1};
  for (int i = 0; i < n; ++i) {
    float h0 = x[i * 3] * a[0] + x[i * 3 + 1] * a[1] + x[i * 3 + 2] * a[2];
    float h1 = x[i * 3] * a[3] + x[i * 3 + 1] * a[4] + x[i * 3 + 2] * a[5];
    y[i * 2] += s * (h0 * b[0] + h1 * b[1]);
    y[i * 2 + 1] += s * (h0 * b[2] + h1 * b[3]);
  }
}
}  // namespace

TEST(config_parsing) {
  AdapterConfig c = AdapterConfig::parse(kCfg, "cfg");
  CHECK(c.r == 2 && c.lora_alpha == 4.0 && !c.use_rslora && c.target_modules.size() == 1);
  CHECK_NEAR(c.scaling(), 2.0, 0);
  AdapterConfig rs = AdapterConfig::parse(R"({"r":16,"lora_alpha":8,"use_rslora":true,"target_modules":"q|v"})", "cfg");
  CHECK_NEAR(rs.scaling(), 2.0, 1e-12);
  CHECK(rs.target_modules_regex == "q|v");
  CHECK_THROWS(AdapterConfig::parse(R"({"lora_alpha":8})", "cfg.json"), "adapter config 'cfg.json': field \"r\" is missing");
  CHECK_THROWS(AdapterConfig::parse(R"({"r":"8","lora_alpha":8})", "c"), "field \"r\": expected a JSON integer, got string");
  CHECK_THROWS(AdapterConfig::parse(R"({"r":0,"lora_alpha":8})", "c"), "positive integer");
  CHECK_THROWS(AdapterConfig::parse(R"({"r":8,"lora_alpha":8,"use_dora":true})", "c"), "DoRA");
  CHECK_THROWS(AdapterConfig::parse(R"({"r":8,"lora_alpha":8,"peft_type":"IA3"})", "c"), "expected \"LORA\"");
  CHECK_THROWS(AdapterConfig::parse(R"({"r":8,"lora_alpha":8,"modules_to_save":["lm_head"]})", "c"), "modules_to_save");
  // types are exact, numbers finite (the rules shared with lorart's Python loader)
  CHECK_THROWS(AdapterConfig::parse(R"({"r":16.0,"lora_alpha":8})", "c"), "field \"r\": expected a JSON integer");
  CHECK_THROWS(AdapterConfig::parse(R"({"r":16.5,"lora_alpha":8})", "c"), "field \"r\": expected a JSON integer");
  CHECK_THROWS(AdapterConfig::parse(R"({"r":true,"lora_alpha":8})", "c"), "field \"r\": expected a JSON integer");
  CHECK_THROWS(AdapterConfig::parse(R"({"r":8,"lora_alpha":8,"use_rslora":"false"})", "c"),
               "field \"use_rslora\": expected a JSON boolean, got string");
  CHECK_THROWS(AdapterConfig::parse(R"({"r":8,"lora_alpha":NaN})", "c"), "json: at byte");
  CHECK_THROWS(AdapterConfig::parse(R"({"r":8,"lora_alpha":1e309})", "c"), "number out of range");
  CHECK_THROWS(AdapterConfig::parse(R"({"r":8,"lora_alpha":"8"})", "c"), "field \"lora_alpha\": expected a JSON number");
  CHECK_THROWS(AdapterConfig::parse(R"({"r":8,"lora_alpha":8,"use_dora":"true"})", "c"), "DoRA");
  CHECK_THROWS(AdapterConfig::parse(R"({"r":8,"lora_alpha":8,"lora_dropout":2})", "c"), "lora_dropout");
  CHECK_THROWS(AdapterConfig::parse(R"({"r":8,"lora_alpha":8,"rank_pattern":["q"]})", "c"),
               "field \"rank_pattern\": expected a JSON object");
  CHECK_THROWS(AdapterConfig::parse(R"({"r":8,"lora_alpha":8,"rank_pattern":{"q":"4"}})", "c"), "rank_pattern.q");
  CHECK_THROWS(AdapterConfig::parse(R"({"r":8,"lora_alpha":8,"rank_pattern":{"q(":4}})", "c"), "regular expression");
  // rank_pattern / alpha_pattern as PEFT reads them: first key (in file order) whose regex ends the path
  AdapterConfig pat = AdapterConfig::parse(
      R"({"r":8,"lora_alpha":16,"rank_pattern":{"v_proj":4,"layers.1.q_proj":2},"alpha_pattern":{"q_.roj":4}})", "c");
  CHECK(pat.rank_for("model.layers.0.self_attn.v_proj") == 4 && pat.rank_for("model.layers.1.q_proj") == 2);
  CHECK(pat.rank_for("model.layers.0.q_proj") == 8 && pat.rank_for("xv_proj") == 8);
  CHECK_NEAR(pat.scaling_for("model.layers.0.q_proj"), 0.5, 0);
  CHECK_NEAR(pat.scaling_for("model.layers.1.q_proj"), 2.0, 0);
  CHECK_NEAR(pat.scaling_for("model.layers.0.k_proj"), 2.0, 0);
  CHECK_THROWS(AdapterConfig::parse(R"({"r":8,"lora_alpha":8,"bias":"all"})", "c"), "bias");
  CHECK_THROWS(AdapterConfig::parse("{r:8}", "c"), "json: at byte 1");
}

TEST(load_apply_unload) {
  AdapterStore store;
  store.load("a1", make_adapter("a1", 0.f, kCfg));
  store.load("a2", make_adapter("a2", 1.f, R"({"r":2,"lora_alpha":2,"target_modules":["q"]})", DType::BF16));
  CHECK(store.names() == (std::vector<std::string>{"a1", "a2"}));
  auto a1 = store.get("a1");
  CHECK(a1->modules.size() == 1 && a1->find("m.q") && a1->find("m.k") == nullptr);
  CHECK(a1->find("m.q")->A.dtype() == DType::F32 && a1->find("m.q")->rank() == 2);
  CHECK(store.get("a2")->find("m.q")->B.dtype() == DType::F32);  // bf16 converted to fp32 by default

  float x[6] = {0.5f, -1.f, 2.f, 1.f, 0.25f, -0.5f};
  float y[4] = {1, 2, 3, 4}, ref[4] = {1, 2, 3, 4};
  store.apply("a1", "m.q", TensorView(x, DType::F32, {2, 3}), TensorView(y, DType::F32, {2, 2}));
  reference(x, 0.f, 2.f, ref, 2);
  for (int i = 0; i < 4; ++i) CHECK_NEAR(y[i], ref[i], 1e-5);
  // explicit known value: row 0: h = [4.5, -3], y0 = 1 + 2 * (4.5*1 + -3*2) = -2
  CHECK_NEAR(y[0], -2.0, 1e-6);
  // module not adapted: unchanged
  float y2[4] = {1, 2, 3, 4};
  store.apply("a1", "m.k", TensorView(x, DType::F32, {2, 3}), TensorView(y2, DType::F32, {2, 2}));
  CHECK(y2[0] == 1 && y2[3] == 4);
  // per-row mix: row 0 -> a2, row 1 -> base
  float y3[4] = {0, 0, 0, 0}, r3[4] = {0, 0, 0, 0};
  store.apply_mixed({"a2", ""}, "m.q", TensorView(x, DType::F32, {2, 3}), TensorView(y3, DType::F32, {2, 2}));
  reference(x, 1.f, 1.f, r3, 1);
  for (int i = 0; i < 4; ++i) CHECK_NEAR(y3[i], r3[i], 1e-5);
  CHECK(y3[2] == 0 && y3[3] == 0);
  // bf16 activations
  uint16_t xb[6], yb[4];
  for (int i = 0; i < 6; ++i) xb[i] = detail::f32_to_bf16(x[i]);
  for (int i = 0; i < 4; ++i) yb[i] = 0;
  store.apply("a1", "m.q", TensorView(xb, DType::BF16, {2, 3}), TensorView(yb, DType::BF16, {2, 2}));
  float r4[4] = {0, 0, 0, 0};
  reference(x, 0.f, 2.f, r4, 2);
  for (int i = 0; i < 4; ++i) CHECK_NEAR(detail::bf16_to_f32(yb[i]), r4[i], 0.02 * std::fabs(r4[i]) + 1e-3);

  CHECK(store.unload("a1"));
  CHECK(!store.unload("a1"));
  CHECK(a1->find("m.q") != nullptr);  // a held shared_ptr stays valid after unload
  CHECK_THROWS(store.apply("a1", "m.q", TensorView(x, DType::F32, {2, 3}), TensorView(y, DType::F32, {2, 2})),
               "unknown adapter 'a1' (loaded: a2)");
  CHECK_THROWS(store.apply_mixed({"a2", "zz"}, "m.q", TensorView(x, DType::F32, {2, 3}), TensorView(y, DType::F32, {2, 2})),
               "unknown adapter 'zz'");
  CHECK_THROWS(store.apply_mixed({"a2"}, "m.q", TensorView(x, DType::F32, {2, 3}), TensorView(y, DType::F32, {2, 2})),
               "one adapter name per row");
}

TEST(strict_files) {
  AdapterStore store;
  // NaN / infinite weights are refused
  std::string dn = make_adapter("nan", 0.f, kCfg);
  {
    float a[6] = {1, 0, std::nanf(""), 0, 1, -1}, b[4] = {1, 2, 0.5f, -1};
    save_safetensors(dn + "/adapter_model.safetensors",
                     {{"base_model.model.m.q.lora_A.weight", TensorView(a, DType::F32, {2, 3})},
                      {"base_model.model.m.q.lora_B.weight", TensorView(b, DType::F32, {2, 2})}});
  }
  CHECK_THROWS(store.load("x", dn), "lora_A.weight': 1 of 6 values are not finite");
  // target_modules must name the modules in the file
  CHECK_THROWS(store.load("x", make_adapter("tg", 0.f, R"({"r":2,"lora_alpha":4,"target_modules":["k"]})")),
               "does not list module 'm.q'");
  // lorart_method.json: a known version that agrees with adapter_config.json
  std::string dm = make_adapter("meta", 0.f, kCfg);
  std::ofstream(dm + "/lorart_method.json") << R"({"format_version":99,"method":"lora","config":{"r":2}})";
  CHECK_THROWS(store.load("x", dm), "\"format_version\": 99 is not a version");
  std::ofstream(dm + "/lorart_method.json") << R"({"format_version":1,"method":"lora","config":{"r":2,"alpha":8.0}})";
  CHECK_THROWS(store.load("x", dm), "\"config.alpha\" is 8 but adapter_config.json says 4");
  std::ofstream(dm + "/lorart_method.json") << R"({"format_version":1,"method":"adapter","config":{}})";
  CHECK_THROWS(store.load("x", dm), "not a LoRA adapter");
  std::ofstream(dm + "/lorart_method.json") << R"({"format_version":1,"method":"qlora","config":{"r":2,"alpha":4}})";
  store.load("meta", dm);
  // per-module alpha: scaling 8 / 2 = 4 instead of the default 2
  store.load("ap", make_adapter("ap", 0.f, R"({"r":2,"lora_alpha":4,"alpha_pattern":{"q":8}})"));
  float x[3] = {0.5f, -1.f, 2.f}, y[2] = {0, 0}, r[2] = {0, 0};
  store.apply("ap", "m.q", TensorView(x, DType::F32, {1, 3}), TensorView(y, DType::F32, {1, 2}));
  reference(x, 0.f, 4.f, r, 1);
  CHECK_NEAR(y[0], r[0], 1e-5);
  CHECK_NEAR(y[1], r[1], 1e-5);
  CHECK(store.names() == (std::vector<std::string>{"ap", "meta"}));
}

TEST(keep_dtype) {
  AdapterStore store;
  AdapterLoadOptions o;
  o.keep_dtype = true;
  store.load("b", make_adapter("kb", 0.f, kCfg, DType::BF16), o);
  CHECK(store.get("b")->find("m.q")->A.dtype() == DType::BF16);
  float x[3] = {0.5f, -1.f, 2.f}, y[2] = {0, 0}, r[2] = {0, 0};
  store.apply("b", "m.q", TensorView(x, DType::F32, {1, 3}), TensorView(y, DType::F32, {1, 2}));
  reference(x, 0.f, 2.f, r, 1);
  CHECK_NEAR(y[0], r[0], 1e-5);
  CHECK_NEAR(y[1], r[1], 1e-5);
}

TEST(errors) {
  AdapterStore store;
  std::string d = make_adapter("e1", 0.f, kCfg);
  store.load("e1", d);
  CHECK_THROWS(store.load("e1", d), "already loaded");
  AdapterLoadOptions rep;
  rep.replace = true;
  store.load("e1", d, rep);
  float x[4] = {0, 0, 0, 0}, y[4] = {0, 0, 0, 0};
  CHECK_THROWS(store.apply("e1", "m.q", TensorView(x, DType::F32, {1, 4}), TensorView(y, DType::F32, {1, 2})),
               "adapter 'e1', module 'm.q': x has 4 features but lora_A is [2, 3]");
  CHECK_THROWS(store.apply("e1", "m.q", TensorView(x, DType::F32, {1, 3}), TensorView(y, DType::F32, {1, 3})),
               "adapter 'e1', module 'm.q': expected y of shape [1, 2] (lora_B is [2, 2]), got [1, 3]");
  CHECK_THROWS(store.apply("e1", "m.q", TensorView(x, DType::I32, {1, 3}), TensorView(y, DType::F32, {1, 2})),
               "argument `x`: expected dtype");
  CHECK_THROWS(store.load("x", make_adapter("e2", 0.f, kCfg, DType::F32, true)),
               "key 'base_model.model.m.q.lora_B.weight' is missing");
  CHECK_THROWS(store.load("x", make_adapter("e3", 0.f, R"({"r":4,"lora_alpha":4})")), "r = 4");
  CHECK_THROWS(store.load("x", tmpdir() + "/nowhere"), "adapter_config.json' not found");
  std::string bin = tmpdir() + "/binonly";
  ::mkdir(bin.c_str(), 0755);
  std::ofstream(bin + "/adapter_config.json") << kCfg;
  std::ofstream(bin + "/adapter_model.bin") << "PK";
  CHECK_THROWS(store.load("x", bin), "pickle file and is refused");
  std::string extra = tmpdir() + "/extra";
  ::mkdir(extra.c_str(), 0755);
  std::ofstream(extra + "/adapter_config.json") << kCfg;
  float e[1] = {0};
  save_safetensors(extra + "/adapter_model.safetensors", {{"base_model.model.lm_head.weight", TensorView(e, DType::F32, {1})}});
  CHECK_THROWS(store.load("x", extra), "unexpected tensor 'base_model.model.lm_head.weight'");
  CHECK(store.names() == (std::vector<std::string>{"e1"}));  // failed loads leave the store unchanged
}

TEST(concurrent_reads_with_load_unload) {
  AdapterStore store;
  std::string d1 = make_adapter("c1", 0.f, kCfg), d2 = make_adapter("c2", 1.f, kCfg);
  store.load("c1", d1);
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0}, applied{0};
  std::vector<std::thread> readers;
  for (int t = 0; t < 3; ++t)
    readers.emplace_back([&] {
      float x[3] = {0.5f, -1.f, 2.f}, r[2] = {0, 0};
      reference(x, 0.f, 2.f, r, 1);
      while (!stop) {
        float y[2] = {0, 0};
        store.apply("c1", "m.q", TensorView(x, DType::F32, {1, 3}), TensorView(y, DType::F32, {1, 2}));
        if (std::fabs(y[0] - r[0]) > 1e-5 || std::fabs(y[1] - r[1]) > 1e-5) ++bad;
        try {
          store.apply("c2", "m.q", TensorView(x, DType::F32, {1, 3}), TensorView(y, DType::F32, {1, 2}));
        } catch (const Error&) {  // c2 comes and goes
        }
        ++applied;
      }
    });
  for (int i = 0; i < 20 || (applied < 300 && i < 100000); ++i) {  // until the readers have run a while
    store.load("c2", d2);
    store.unload("c2");
  }
  stop = true;
  for (auto& t : readers) t.join();
  CHECK(bad == 0);
  CHECK(applied > 0);
}

TEST_MAIN()
