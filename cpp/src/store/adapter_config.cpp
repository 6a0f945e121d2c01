// adapter_config.json (PEFT LoRA) parsing and validation.
#include <cmath>

#include "common/check.h"
#include "lorart/adapter_store.h"
#include "lorart/json.h"

namespace lorart {

double AdapterConfig::scaling() const {
  return use_rslora ? lora_alpha / std::sqrt(static_cast<double>(r)) : lora_alpha / static_cast<double>(r);
}

AdapterConfig AdapterConfig::parse(const std::string& text, const std::string& path) {
  json::Value v;
  try {
    v = json::parse(text);
  } catch (const Error& e) {
    LORART_CHECK(false, "adapter config '", path, "': ", e.what());
  }
  LORART_CHECK(v.is_object(), "adapter config '", path, "': expected a JSON object, got ", v.type_name());
  auto field = [&](const char* key) { return v.find(key); };
  auto where = [&](const char* key) { return detail::cat("adapter config '", path, "': field \"", key, "\""); };
  AdapterConfig c;

  if (const json::Value* p = field("peft_type"); p && !p->is_null()) {
    const std::string& t = p->as_string(where("peft_type").c_str());
    LORART_CHECK(t == "LORA", where("peft_type"), ": expected \"LORA\", got \"", t, "\"");
  }
  const json::Value* r = field("r");
  LORART_CHECK(r, where("r"), " is missing");
  c.r = r->as_int(where("r").c_str());
  LORART_CHECK(c.r > 0, where("r"), ": expected a positive integer, got ", c.r);
  const json::Value* alpha = field("lora_alpha");
  LORART_CHECK(alpha, where("lora_alpha"), " is missing");
  c.lora_alpha = alpha->as_double(where("lora_alpha").c_str());
  LORART_CHECK(std::isfinite(c.lora_alpha), where("lora_alpha"), ": not finite");
  if (const json::Value* p = field("use_rslora"); p && !p->is_null())
    c.use_rslora = p->as_bool(where("use_rslora").c_str());
  if (const json::Value* p = field("target_modules"); p && !p->is_null()) {
    if (p->is_string()) {
      c.target_modules_regex = p->as_string();
    } else {
      for (const auto& m : p->as_array(where("target_modules").c_str()))
        c.target_modules.push_back(m.as_string(where("target_modules").c_str()));
    }
  }
  if (const json::Value* p = field("base_model_name_or_path"); p && p->is_string())
    c.base_model_name_or_path = p->as_string();

  // Options that change the math: refuse rather than apply them wrongly.
  auto refuse_true = [&](const char* key, const char* why) {
    const json::Value* p = field(key);
    LORART_CHECK(!(p && p->is_bool() && p->as_bool()), where(key), " is true: ", why);
  };
  refuse_true("use_dora", "DoRA adapters are not supported");
  refuse_true("fan_in_fan_out", "transposed (Conv1D) LoRA weights are not supported");
  auto refuse_nonempty = [&](const char* key, const char* why) {
    const json::Value* p = field(key);
    if (!p || p->is_null()) return;
    bool empty = (p->is_object() && p->as_object().empty()) || (p->is_array() && p->as_array().empty());
    LORART_CHECK(empty, where(key), " is not empty: ", why);
  };
  refuse_nonempty("rank_pattern", "per-module ranks are not supported");
  refuse_nonempty("alpha_pattern", "per-module alphas are not supported");
  refuse_nonempty("modules_to_save", "adapters with fully trained modules are not supported");
  if (const json::Value* p = field("bias"); p && p->is_string())
    LORART_CHECK(p->as_string() == "none", where("bias"), ": expected \"none\", got \"", p->as_string(),
                 "\" (trained biases are not supported)");
  return c;
}

}  // namespace lorart
