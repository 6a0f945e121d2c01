// lorart::AdapterStore: many PEFT LoRA adapters held by name, applied per request.
//
// A PEFT adapter folder holds `adapter_config.json` (r, lora_alpha, use_rslora,
// target_modules, ...) and `adapter_model.safetensors` with, for each adapted linear
// layer at module path P (e.g. "model.layers.0.self_attn.q_proj"):
//   base_model.model.P.lora_A.weight  [r, in_features]
//   base_model.model.P.lora_B.weight  [out_features, r]
// Applying adapter `a` at module P to a base layer's output y (PEFT's formula):
//   y += s * (x @ A.T) @ B.T,   s = lora_alpha / r   (lora_alpha / sqrt(r) with use_rslora)
//
// Thread safety: every const member may be called concurrently; load/unload take an
// exclusive lock only to swap the map entry (files are read outside the lock). An
// adapter being applied while another thread unloads it stays alive until the apply
// returns (shared_ptr).
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <shared_mutex>
#include <string>
#include <vector>

#include "lorart/common.h"
#include "lorart/tensor.h"

namespace lorart {

// The rules of a PEFT LoRA folder, the same as lorart's Python loader (lorart.adapters.read_lora_folder),
// so that one folder is accepted or refused the same way by every entry point:
// - adapter_config.json is strict JSON (lorart/json.h). Types are exact: `r` a JSON integer >= 1 (not 16.0,
//   not "16"), `lora_alpha` a finite number, `use_rslora` true/false/null, `lora_dropout` a number in [0, 1]
//   or null, `peft_type` "LORA" or absent, `bias` "none" or absent, `target_modules` a string (regex), a list
//   of strings or null, `rank_pattern` an object of integers >= 1, `alpha_pattern` an object of finite
//   numbers (keys: regexes, matched as PEFT does: the first key K, in file order, for which the module path
//   fully matches `(.*\.)?(K)`), `base_model_name_or_path` a string or null.
// - Options that change the math are refused when set (not false/null/empty): use_dora, fan_in_fan_out,
//   lora_bias, use_qalora, use_bdlora, layer_replication, target_parameters, trainable_token_indices,
//   alora_invocation_tokens, modules_to_save, arrow_config, kasa_config, monteclora_config, velora_config.
// - adapter_model.safetensors holds only base_model.model.<module>.lora_A.weight [r, in] / .lora_B.weight
//   [out, r] pairs (both halves), float32/bfloat16/float16, non-empty, every value finite, r = the module's
//   rank (rank_pattern, else `r`); a list-form target_modules names every module (PEFT's suffix rule).
// - lorart_method.json, when present (a folder written by lorart): strict JSON, `format_version` the integer
//   1, `method` "lora" or "qlora", and its config's r / alpha / rslora equal to the PEFT config's.
struct AdapterConfig {
  int64_t r = 0;
  double lora_alpha = 0.0;
  bool use_rslora = false;
  double lora_dropout = 0.0;
  std::vector<std::string> target_modules;  // list form
  std::string target_modules_regex;         // string form (a regex in PEFT)
  std::vector<std::pair<std::string, int64_t>> rank_pattern;   // in file order
  std::vector<std::pair<std::string, double>> alpha_pattern;   // in file order
  std::string base_model_name_or_path;
  double scaling() const;  // lora_alpha / r, or lora_alpha / sqrt(r)
  // Per module (rank_pattern / alpha_pattern applied):
  int64_t rank_for(const std::string& module) const;
  double alpha_for(const std::string& module) const;
  double scaling_for(const std::string& module) const;

  // Parses and validates adapter_config.json text (the rules above); `path` names it in errors.
  static AdapterConfig parse(const std::string& json_text, const std::string& path);
};

struct LoraPair {
  Tensor A;  // [r, in_features]
  Tensor B;  // [out_features, r]
  // alpha / r of this module (rank_pattern / alpha_pattern applied); unset: the adapter's `scaling`
  std::optional<float> scaling;
  int64_t in_features() const { return A.size(1); }
  int64_t out_features() const { return B.size(0); }
  int64_t rank() const { return A.size(0); }
};

struct Adapter {
  std::string name;
  std::string folder;
  AdapterConfig config;
  float scaling = 0.f;  // the config's default; each LoraPair has its own
  std::map<std::string, LoraPair> modules;  // by module path ("model.layers.0.self_attn.q_proj")
  // nullptr when this adapter does not adapt `module`.
  const LoraPair* find(const std::string& module) const;
  size_t nbytes() const;
};

struct AdapterLoadOptions {
  // false: A and B are converted to float32; true: kept as stored (float32/bfloat16/float16).
  bool keep_dtype = false;
  // false: loading a name that is already loaded is an error; true: replaces it atomically.
  bool replace = false;
};

// Reads one PEFT adapter folder (no store involved). Errors name the file and key.
std::shared_ptr<const Adapter> load_peft_adapter(const std::string& name, const std::string& folder,
                                                 const AdapterLoadOptions& opts = {});

class AdapterStore {
 public:
  // Loads `folder` under `name` and returns it. Throws lorart::Error on any problem (the
  // store is then unchanged).
  std::shared_ptr<const Adapter> load(const std::string& name, const std::string& folder,
                                      const AdapterLoadOptions& opts = {});
  // Adds an adapter built in memory (e.g. by a trainer).
  void add(std::shared_ptr<const Adapter> adapter, bool replace = false);
  // Removes `name`; false if it was not loaded.
  bool unload(const std::string& name);
  bool contains(const std::string& name) const;
  std::vector<std::string> names() const;  // sorted
  size_t size() const;
  // Throws "unknown adapter 'x' (loaded: a, b)".
  std::shared_ptr<const Adapter> get(const std::string& name) const;

  // y[n, out] += s * (x[n, in] @ A.T) @ B.T for adapter `adapter` at `module` (CPU views;
  // x and y float32/bfloat16/float16 of one dtype, contiguous), through the shared LoRA
  // kernel lorart::lora_grouped_add (lorart/lora.h). A and B are used as stored when their
  // dtype is x's, else converted per call (load with keep_dtype to match bf16 activations).
  // An adapter that does not adapt `module` leaves y unchanged. Shape mismatches name the
  // adapter and module.
  void apply(const std::string& adapter, const std::string& module, const TensorView& x,
             const TensorView& y) const;
  // Per-row mix: row i uses adapter row_adapters[i] ("" = base only, nothing added). All
  // names are resolved first (an unknown one throws before y is touched).
  void apply_mixed(const std::vector<std::string>& row_adapters, const std::string& module, const TensorView& x,
                   const TensorView& y) const;

 private:
  mutable std::shared_mutex mu_;
  std::map<std::string, std::shared_ptr<const Adapter>> adapters_;
};

}  // namespace lorart
