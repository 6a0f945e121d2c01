// PEFT adapter folders -> lorart::Adapter, and the thread-safe AdapterStore.
#include <sys/stat.h>

#include <cmath>
#include <fstream>
#include <mutex>
#include <sstream>

#include "common/check.h"
#include "lorart/adapter_store.h"
#include "lorart/json.h"
#include "lorart/safetensors.h"
#include "store/apply.h"

namespace lorart {

namespace {
bool file_exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  LORART_CHECK(f.good(), "cannot read '", path, "'");
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

const std::string kPrefix = "base_model.model.";
const std::string kA = ".lora_A.weight", kB = ".lora_B.weight";

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

// A folder written by lorart also holds lorart_method.json: a known format that agrees with the PEFT config.
void check_method_file(const std::string& name, const std::string& folder, const AdapterConfig& cfg) {
  const std::string path = folder + "/lorart_method.json";
  if (!file_exists(path)) return;
  const std::string w = detail::cat("adapter '", name, "': '", path, "'");
  json::Value v;
  try {
    v = json::parse(read_text(path));
  } catch (const Error& e) {
    LORART_CHECK(false, w, ": ", e.what());
  }
  LORART_CHECK(v.is_object(), w, ": expected a JSON object, got ", v.type_name());
  const json::Value* fv = v.find("format_version");
  LORART_CHECK(fv && fv->is_integer(), w, ": field \"format_version\": expected the integer 1, got ",
               fv ? fv->type_name() : "nothing");
  LORART_CHECK(fv->as_int() == 1, w, ": field \"format_version\": ", fv->as_int(),
               " is not a version this lorart reads (it reads 1)");
  const json::Value* m = v.find("method");
  LORART_CHECK(m && m->is_string(), w, ": field \"method\": expected a string");
  if (const json::Value* b = v.find("base_model"); b && !b->is_null()) {
    for (const auto& kv : b->as_object((w + ": field \"base_model\"").c_str())) {
      std::string f = w + ": field \"base_model." + kv.first + "\"";
      LORART_CHECK(kv.second.as_int(f.c_str()) >= 0, f, ": expected an integer >= 0");
    }
  }
  if (const json::Value* b = v.find("base_model_name_or_path"); b && !b->is_null())
    b->as_string((w + ": field \"base_model_name_or_path\"").c_str());
  LORART_CHECK(m->as_string() == "lora" || m->as_string() == "qlora", w, ": field \"method\": a '", m->as_string(),
               "' artifact, not a LoRA adapter");
  const json::Value* c = v.find("config");
  if (!c || c->is_null()) return;
  LORART_CHECK(c->is_object(), w, ": field \"config\": expected an object, got ", c->type_name());
  // typed as lorart's LoRAConfig / QLoRAConfig (null reads as absent)
  static const char* kKeys[] = {"targets", "r", "alpha", "dropout", "rslora", "blocksize", "double_quant"};
  for (const auto& kv : c->as_object()) {
    bool known = false;
    for (const char* k : kKeys) known = known || kv.first == k;
    LORART_CHECK(known, w, ": field \"config.", kv.first, "\": not an option of a LoRA method");
    if (kv.second.is_null()) continue;
    std::string f = w + ": field \"config." + kv.first + "\"";
    if (kv.first == "targets" && !kv.second.is_string()) {
      for (const auto& t : kv.second.as_array(f.c_str())) t.as_string(f.c_str());
    } else if (kv.first == "dropout") {
      double d = kv.second.as_double(f.c_str());
      LORART_CHECK(d >= 0.0 && d <= 1.0, f, ": expected a number in [0, 1], got ", d);
    } else if (kv.first == "blocksize") {
      LORART_CHECK(kv.second.as_int(f.c_str()) >= 1, f, ": expected an integer >= 1");
    } else if (kv.first == "double_quant") {
      kv.second.as_bool(f.c_str());
    }
  }
  if (const json::Value* r = c->find("r"); r && !r->is_null()) {
    int64_t k = r->as_int((w + ": field \"config.r\"").c_str());
    LORART_CHECK(k == cfg.r, w, ": field \"config.r\" is ", k, " but adapter_config.json says ", cfg.r,
                 ": the two files disagree");
  }
  if (const json::Value* a = c->find("alpha"); a && !a->is_null()) {
    double x = a->as_double((w + ": field \"config.alpha\"").c_str());
    LORART_CHECK(x == cfg.lora_alpha, w, ": field \"config.alpha\" is ", x, " but adapter_config.json says ",
                 cfg.lora_alpha, ": the two files disagree");
  }
  if (const json::Value* b = c->find("rslora"); b && !b->is_null()) {
    bool x = b->as_bool((w + ": field \"config.rslora\"").c_str());
    LORART_CHECK(x == cfg.use_rslora, w, ": field \"config.rslora\" is ", x ? "true" : "false",
                 " but adapter_config.json says ", cfg.use_rslora ? "true" : "false", ": the two files disagree");
  }
}

// Every value of a float tensor is finite.
void check_finite(const Tensor& t, const std::string& what) {
  Tensor f = t.dtype() == DType::F32 ? t : t.to(DType::F32);
  const float* p = f.ptr<float>();
  int64_t bad = 0, n = f.numel();
  for (int64_t i = 0; i < n; ++i) bad += std::isfinite(p[i]) ? 0 : 1;
  LORART_CHECK(bad == 0, what, ": ", bad, " of ", n, " values are not finite (NaN or infinity)");
}

bool targeted(const AdapterConfig& c, const std::string& module) {
  if (c.target_modules.empty() && !c.target_modules_regex.empty()) return true;  // regex form: not checked
  for (const auto& t : c.target_modules)
    if (module == t || ends_with(module, "." + t)) return true;
  return c.target_modules.empty() && c.target_modules_regex.empty();  // null: nothing to check
}
}  // namespace

const LoraPair* Adapter::find(const std::string& module) const {
  auto it = modules.find(module);
  return it == modules.end() ? nullptr : &it->second;
}

size_t Adapter::nbytes() const {
  size_t n = 0;
  for (const auto& m : modules) n += m.second.A.nbytes() + m.second.B.nbytes();
  return n;
}

std::shared_ptr<const Adapter> load_peft_adapter(const std::string& name, const std::string& folder,
                                                 const AdapterLoadOptions& opts) {
  LORART_CHECK(!name.empty(), "load_peft_adapter: the adapter name must not be empty");
  const std::string cfg_path = folder + "/adapter_config.json";
  const std::string st_path = folder + "/adapter_model.safetensors";
  LORART_CHECK(file_exists(cfg_path), "adapter '", name, "': '", cfg_path, "' not found (expected a PEFT adapter folder)");
  if (!file_exists(st_path)) {
    LORART_CHECK(!file_exists(folder + "/adapter_model.bin"), "adapter '", name, "': '", folder,
                 "/adapter_model.bin' is a pickle file and is refused (it can run code when loaded); save the "
                 "adapter with safetensors (PEFT: save_pretrained(..., safe_serialization=True))");
    LORART_CHECK(false, "adapter '", name, "': '", st_path, "' not found");
  }
  auto a = std::make_shared<Adapter>();
  a->name = name;
  a->folder = folder;
  a->config = AdapterConfig::parse(read_text(cfg_path), cfg_path);
  a->scaling = static_cast<float>(a->config.scaling());
  check_method_file(name, folder, a->config);

  SafetensorsFile f = SafetensorsFile::open(st_path);
  for (const auto& e : f.entries()) {
    const std::string& key = e.name;
    bool is_a = ends_with(key, kA), is_b = ends_with(key, kB);
    LORART_CHECK(key.rfind(kPrefix, 0) == 0 && (is_a || is_b), "adapter '", name, "': file '", st_path,
                 "': unexpected tensor '", key, "' (expected only base_model.model.<module>.lora_A.weight / "
                 ".lora_B.weight keys of a LoRA adapter)");
    std::string module = key.substr(kPrefix.size(), key.size() - kPrefix.size() - kA.size());
    LORART_CHECK(!module.empty(), "adapter '", name, "': file '", st_path, "': empty module path in '", key, "'");
    std::string other = kPrefix + module + (is_a ? kB : kA);
    LORART_CHECK(f.contains(other), "adapter '", name, "': file '", st_path, "': key '", other,
                 "' is missing (its pair '", key, "' is present)");
    if (!is_a) continue;  // each module once, from its A
    const SafetensorsEntry& ea = e;
    const SafetensorsEntry& eb = f.entry(other);
    for (const SafetensorsEntry* x : {&ea, &eb}) {
      LORART_CHECK_TYPE(x->has_dtype && (x->dtype == DType::F32 || x->dtype == DType::BF16 || x->dtype == DType::F16),
                        "adapter '", name, "': file '", st_path, "': tensor '", x->name,
                        "': expected dtype F32|BF16|F16, got ", x->dtype_name);
      LORART_CHECK(x->shape.size() == 2, "adapter '", name, "': file '", st_path, "': tensor '", x->name,
                   "': expected a 2-d tensor, got ", x->shape.size(), " dimensions");
      LORART_CHECK(x->shape[0] > 0 && x->shape[1] > 0, "adapter '", name, "': file '", st_path, "': tensor '",
                   x->name, "': expected a non-empty 2-d tensor, got shape [", x->shape[0], ", ", x->shape[1], "]");
    }
    LORART_CHECK(targeted(a->config, module), "adapter '", name, "': adapter config '", cfg_path,
                 "': field \"target_modules\" does not list module '", module, "', which has weights in the file");
    const int64_t r = a->config.rank_for(module);
    LORART_CHECK(ea.shape[0] == r, "adapter '", name, "': file '", st_path, "': tensor '", ea.name, "' has shape [",
                 ea.shape[0], ", ", ea.shape[1], "] but adapter_config.json says r = ", r, " (r / rank_pattern; expected [", r, ", in])");
    LORART_CHECK(eb.shape[1] == r, "adapter '", name, "': file '", st_path, "': tensor '", eb.name, "' has shape [",
                 eb.shape[0], ", ", eb.shape[1], "] but r = ", r, " (expected [out, ", r, "])");
    LoraPair p;
    p.A = f.tensor(ea.name);
    p.B = f.tensor(eb.name);
    check_finite(p.A, detail::cat("adapter '", name, "': file '", st_path, "': tensor '", ea.name, "'"));
    check_finite(p.B, detail::cat("adapter '", name, "': file '", st_path, "': tensor '", eb.name, "'"));
    p.scaling = static_cast<float>(a->config.scaling_for(module));
    if (!opts.keep_dtype) {
      if (p.A.dtype() != DType::F32) p.A = p.A.to(DType::F32);
      if (p.B.dtype() != DType::F32) p.B = p.B.to(DType::F32);
    }
    a->modules.emplace(module, std::move(p));
  }
  LORART_CHECK(!a->modules.empty(), "adapter '", name, "': file '", st_path, "' holds no LoRA tensors");
  return a;
}

std::shared_ptr<const Adapter> AdapterStore::load(const std::string& name, const std::string& folder,
                                                  const AdapterLoadOptions& opts) {
  if (!opts.replace)
    LORART_CHECK(!contains(name), "adapter '", name, "' is already loaded (unload it first, or set replace)");
  std::shared_ptr<const Adapter> a = load_peft_adapter(name, folder, opts);  // outside the lock
  add(a, opts.replace);
  return a;
}

void AdapterStore::add(std::shared_ptr<const Adapter> adapter, bool replace) {
  LORART_CHECK(adapter && !adapter->name.empty(), "AdapterStore::add: expected a named adapter");
  std::unique_lock<std::shared_mutex> lk(mu_);
  auto it = adapters_.find(adapter->name);
  LORART_CHECK(replace || it == adapters_.end(), "adapter '", adapter->name,
               "' is already loaded (unload it first, or set replace)");
  adapters_[adapter->name] = std::move(adapter);
}

bool AdapterStore::unload(const std::string& name) {
  std::shared_ptr<const Adapter> gone;  // released after the lock
  std::unique_lock<std::shared_mutex> lk(mu_);
  auto it = adapters_.find(name);
  if (it == adapters_.end()) return false;
  gone = std::move(it->second);
  adapters_.erase(it);
  return true;
}

bool AdapterStore::contains(const std::string& name) const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  return adapters_.count(name) != 0;
}

std::vector<std::string> AdapterStore::names() const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  std::vector<std::string> out;
  for (const auto& kv : adapters_) out.push_back(kv.first);
  return out;
}

size_t AdapterStore::size() const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  return adapters_.size();
}

std::shared_ptr<const Adapter> AdapterStore::get(const std::string& name) const {
  std::shared_lock<std::shared_mutex> lk(mu_);
  auto it = adapters_.find(name);
  if (it != adapters_.end()) return it->second;
  std::string loaded;
  for (const auto& kv : adapters_) loaded += (loaded.empty() ? "" : ", ") + kv.first;
  detail::fail(ErrorKind::Value,
               detail::cat("unknown adapter '", name, "' (loaded: ", loaded.empty() ? "none" : loaded, ")"));
}

void AdapterStore::apply(const std::string& adapter, const std::string& module, const TensorView& x,
                         const TensorView& y) const {
  std::shared_ptr<const Adapter> a = get(adapter);
  std::string what = detail::cat("adapter '", adapter, "', module '", module, "'");
  detail::check_apply_args(x, y, what.c_str());
  const LoraPair* p = a->find(module);
  if (!p) return;
  detail::apply_rows(*a, module, *p, x, y, std::vector<int64_t>(static_cast<size_t>(x.shape[0]), 0), what.c_str());
}

void AdapterStore::apply_mixed(const std::vector<std::string>& row_adapters, const std::string& module,
                               const TensorView& x, const TensorView& y) const {
  detail::check_apply_args(x, y, "apply_mixed");
  LORART_CHECK(static_cast<int64_t>(row_adapters.size()) == x.shape[0],
               "apply_mixed: expected one adapter name per row of x (", x.shape[0], " rows), got ",
               row_adapters.size());
  std::map<std::string, std::vector<int64_t>> groups;  // name -> idx (0 = its rows, -1 = others)
  for (size_t i = 0; i < row_adapters.size(); ++i) {
    if (row_adapters[i].empty()) continue;
    auto& idx = groups[row_adapters[i]];
    if (idx.empty()) idx.assign(row_adapters.size(), -1);
    idx[i] = 0;
  }
  std::vector<std::pair<std::shared_ptr<const Adapter>, const std::vector<int64_t>*>> resolved;
  for (const auto& g : groups) resolved.emplace_back(get(g.first), &g.second);  // all names checked first
  for (const auto& g : resolved) {
    const LoraPair* p = g.first->find(module);
    if (!p) continue;
    std::string what = detail::cat("adapter '", g.first->name, "', module '", module, "'");
    detail::apply_rows(*g.first, module, *p, x, y, *g.second, what.c_str());
  }
}

}  // namespace lorart
