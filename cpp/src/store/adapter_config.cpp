// adapter_config.json (PEFT LoRA) parsing and validation: the rules listed in lorart/adapter_store.h.
#include <cmath>
#include <regex>

#include "common/check.h"
#include "lorart/adapter_store.h"
#include "lorart/json.h"

namespace lorart {

namespace {

// PEFT's get_pattern_key: the module path fully matches `(.*\.)?(KEY)`.
bool pattern_matches(const std::string& key, const std::string& module) {
  return std::regex_match(module, std::regex("(.*\\.)?(?:" + key + ")", std::regex::ECMAScript));
}

// Options of a PEFT LoRA config that change the math lorart would apply: refused when set.
const std::pair<const char*, const char*> kMathChanging[] = {
    {"use_dora", "DoRA adapters are not supported"},
    {"fan_in_fan_out", "transposed (Conv1D) bases are not supported"},
    {"lora_bias", "LoRA biases (lora_B with a bias) are not supported"},
    {"use_qalora", "QA-LoRA is not supported"},
    {"use_bdlora", "block-diagonal LoRA is not supported"},
    {"layer_replication", "layer replication is not supported"},
    {"target_parameters", "LoRA on parameters (not modules) is not supported"},
    {"trainable_token_indices", "trainable tokens are not supported"},
    {"alora_invocation_tokens", "activated LoRA is not supported"},
    {"modules_to_save", "adapters with fully trained modules are not supported"},
    {"arrow_config", "Arrow routing is not supported"},
    {"kasa_config", "KaSA is not supported"},
    {"monteclora_config", "MonteCLoRA is not supported"},
    {"velora_config", "VeLoRA is not supported"},
};

bool is_set(const json::Value& v) {
  if (v.is_null()) return false;
  if (v.is_bool()) return v.as_bool();
  if (v.is_array()) return !v.as_array().empty();
  if (v.is_object()) return !v.as_object().empty();
  if (v.is_string()) return !v.as_string().empty();
  return true;
}

}  // namespace

double AdapterConfig::scaling() const {
  return use_rslora ? lora_alpha / std::sqrt(static_cast<double>(r)) : lora_alpha / static_cast<double>(r);
}

int64_t AdapterConfig::rank_for(const std::string& module) const {
  for (const auto& kv : rank_pattern)
    if (pattern_matches(kv.first, module)) return kv.second;
  return r;
}

double AdapterConfig::alpha_for(const std::string& module) const {
  for (const auto& kv : alpha_pattern)
    if (pattern_matches(kv.first, module)) return kv.second;
  return lora_alpha;
}

double AdapterConfig::scaling_for(const std::string& module) const {
  const double rk = static_cast<double>(rank_for(module)), a = alpha_for(module);
  return use_rslora ? a / std::sqrt(rk) : a / rk;
}

AdapterConfig AdapterConfig::parse(const std::string& text, const std::string& path) {
  json::Value v;
  try {
    v = json::parse(text);
  } catch (const Error& e) {
    LORART_CHECK(false, "adapter config '", path, "': ", e.what());
  }
  LORART_CHECK(v.is_object(), "adapter config '", path, "': expected a JSON object, got ", v.type_name());
  auto field = [&](const char* key) -> const json::Value* {
    const json::Value* p = v.find(key);
    return p && !p->is_null() ? p : nullptr;  // null reads as absent
  };
  auto where = [&](const std::string& key) { return detail::cat("adapter config '", path, "': field \"", key, "\""); };
  AdapterConfig c;

  if (const json::Value* p = field("peft_type")) {
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
  if (const json::Value* p = field("use_rslora")) c.use_rslora = p->as_bool(where("use_rslora").c_str());
  if (const json::Value* p = field("lora_dropout")) {
    c.lora_dropout = p->as_double(where("lora_dropout").c_str());
    LORART_CHECK(c.lora_dropout >= 0.0 && c.lora_dropout <= 1.0, where("lora_dropout"),
                 ": expected a number in [0, 1], got ", c.lora_dropout);
  }
  if (const json::Value* p = field("target_modules")) {
    if (p->is_string()) {
      c.target_modules_regex = p->as_string();
    } else {
      for (const auto& m : p->as_array(where("target_modules").c_str()))
        c.target_modules.push_back(m.as_string(where("target_modules").c_str()));
    }
  }
  if (const json::Value* p = field("base_model_name_or_path"))
    c.base_model_name_or_path = p->as_string(where("base_model_name_or_path").c_str());
  for (const auto& kv : kMathChanging) {
    const json::Value* p = field(kv.first);
    LORART_CHECK(!(p && is_set(*p)), where(kv.first), ": ", kv.second);
  }
  if (const json::Value* p = field("bias")) {
    const std::string& b = p->as_string(where("bias").c_str());
    LORART_CHECK(b == "none", where("bias"), ": expected \"none\", got \"", b, "\" (trained biases are not supported)");
  }
  auto check_regex = [&](const std::string& key, const std::string& what) {
    try {
      std::regex rx("(.*\\.)?(?:" + key + ")", std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      LORART_CHECK(false, where(what + "." + key), ": not a valid regular expression (", e.what(), ")");
    }
  };
  if (const json::Value* p = field("rank_pattern")) {
    for (const auto& kv : p->as_object(where("rank_pattern").c_str())) {
      std::string w = where("rank_pattern." + kv.first);
      int64_t k = kv.second.as_int(w.c_str());
      LORART_CHECK(k > 0, w, ": expected a positive integer, got ", k);
      check_regex(kv.first, "rank_pattern");
      c.rank_pattern.emplace_back(kv.first, k);
    }
  }
  if (const json::Value* p = field("alpha_pattern")) {
    for (const auto& kv : p->as_object(where("alpha_pattern").c_str())) {
      std::string w = where("alpha_pattern." + kv.first);
      double a = kv.second.as_double(w.c_str());
      check_regex(kv.first, "alpha_pattern");
      c.alpha_pattern.emplace_back(kv.first, a);
    }
  }
  return c;
}

}  // namespace lorart
