// lorart_service: one frozen base layer + many LoRA adapters, answering JSON-lines requests.
//
//   lorart_service --base BASE.safetensors [--prefix P] [--module M] [--adapter NAME=FOLDER]...
//
// Loads the base linear layer stored at `P` in BASE (dense `P.weight` [+ `P.bias`], or
// bitsandbytes NF4 keys `P.weight.*`, chosen by what the file holds) and each PEFT adapter
// folder under its NAME. Adapters are applied at module path M (default: P).
//
// Protocol: one JSON object per stdin line, one JSON object per stdout line, in order.
//   {"adapter": "a1", "x": [x0, ..., x_{in-1}]}        -> {"y": [y0, ..., y_{out-1}]}
//   {"adapter": null, "x": [...]}                      -> the base layer alone
//   {"adapter": ["a1", null], "x": [[...], [...]]}     -> several rows, one adapter each
//   {"adapter": "a1", "x": [[...], [...]]}             -> several rows, one adapter
//   {"id": ..., ...}                                   -> "id" is echoed back
//   {"cmd": "list"}                                    -> {"adapters": [...], "in": K, "out": N}
//   {"cmd": "unload", "adapter": "a1"}                 -> {"unloaded": true|false}
//   {"cmd": "load", "adapter": "a3", "path": "DIR"}   -> {"loaded": "a3"}
// Any error answers {"error": "..."} on that line and the service goes on; every line is strict JSON (an
// input or output outside float32's finite range is an error, never "nan"/"inf").
// y = base(x) + s * (x @ A.T) @ B.T (PEFT's formula), computed in float32; numbers are
// printed with 9 significant digits (exact float32 round trip).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "lorart/lorart.h"

namespace json = lorart::json;

namespace {

struct Service {
  lorart::BaseLinear base;
  lorart::AdapterStore store;
  std::string module;

  json::Value handle(const json::Value& req) {
    json::Value out;
    if (const json::Value* id = req.find("id")) out.set("id", *id);
    if (const json::Value* cmd = req.find("cmd")) {
      const std::string& c = cmd->as_string("\"cmd\"");
      if (c == "list") {
        json::Value::Array names;
        for (const auto& n : store.names()) names.emplace_back(n);
        out.set("adapters", json::Value(names));
        out.set("in", json::Value(base.in_features()));
        out.set("out", json::Value(base.out_features()));
      } else if (c == "unload") {
        out.set("unloaded", store.unload(field(req, "adapter").as_string("\"adapter\"")));
      } else if (c == "load") {
        const std::string& name = field(req, "adapter").as_string("\"adapter\"");
        store.load(name, field(req, "path").as_string("\"path\""));
        out.set("loaded", name);
      } else {
        throw lorart::Error("unknown \"cmd\" \"" + c + "\" (expected list, load or unload)");
      }
      return out;
    }
    const json::Value& xv = field(req, "x");
    const json::Value::Array& xa = xv.as_array("\"x\"");
    const bool batched = !xa.empty() && xa[0].is_array();
    const int64_t K = base.in_features(), N = base.out_features();
    const int64_t M = batched ? static_cast<int64_t>(xa.size()) : 1;
    lorart::Tensor x(lorart::DType::F32, {M, K}), y(lorart::DType::F32, {M, N});
    for (int64_t m = 0; m < M; ++m) {
      const json::Value::Array& row = batched ? xa[m].as_array("\"x\" row") : xa;
      if (static_cast<int64_t>(row.size()) != K)
        throw lorart::Error("\"x\"" + std::string(batched ? " row " + std::to_string(m) : "") + ": expected " +
                            std::to_string(K) + " numbers (in_features), got " + std::to_string(row.size()));
      for (int64_t k = 0; k < K; ++k) {
        float v = static_cast<float>(row[k].as_double("\"x\" value"));
        if (!std::isfinite(v))
          throw lorart::Error("\"x\"" + std::string(batched ? " row " + std::to_string(m) : "") + " value " +
                              std::to_string(k) + ": out of float32 range");
        x.ptr<float>()[m * K + k] = v;
      }
    }
    std::vector<std::string> names(static_cast<size_t>(M));
    const json::Value* ad = req.find("adapter");
    if (ad && ad->is_array()) {
      const auto& list = ad->as_array();
      if (static_cast<int64_t>(list.size()) != M)
        throw lorart::Error("\"adapter\": expected one name (or null) per row of \"x\" (" + std::to_string(M) +
                            "), got " + std::to_string(list.size()));
      for (int64_t m = 0; m < M; ++m) names[m] = list[m].is_null() ? "" : list[m].as_string("\"adapter\" entry");
    } else if (ad && !ad->is_null()) {
      const std::string& n = ad->as_string("\"adapter\"");
      for (auto& s : names) s = n;
    }
    base.forward(x.view(), y.view());
    store.apply_mixed(names, module, x.view(), y.view());
    for (int64_t i = 0; i < M * N; ++i)  // JSON has no NaN / Infinity: say so instead of printing "-nan"
      if (!std::isfinite(y.ptr<float>()[i]))
        throw lorart::Error("the output row " + std::to_string(i / N) + " is not finite (float32 overflow)");
    auto row_of = [&](int64_t m) {
      json::Value::Array r;
      for (int64_t n = 0; n < N; ++n) r.emplace_back(static_cast<double>(y.ptr<float>()[m * N + n]));
      return json::Value(r);
    };
    if (batched) {
      json::Value::Array rows;
      for (int64_t m = 0; m < M; ++m) rows.push_back(row_of(m));
      out.set("y", json::Value(rows));
    } else {
      out.set("y", row_of(0));
    }
    return out;
  }

  static const json::Value& field(const json::Value& req, const char* k) {
    const json::Value* v = req.find(k);
    if (!v) throw lorart::Error(std::string("request: field \"") + k + "\" is missing");
    return *v;
  }
};

// Floats as float32 with 9 significant digits (json::dump writes doubles' shortest form,
// which for float32 values may print 17 digits).
std::string dump_f32(const json::Value& v) {
  if (v.is_number() && !v.is_integer()) {
    if (!std::isfinite(v.as_double())) throw lorart::Error("a non-finite number cannot be written as JSON");
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.9g", v.as_double());
    return std::strpbrk(buf, ".eE") ? std::string(buf) : std::string(buf) + ".0";
  }
  if (v.is_array()) {
    std::string s = "[";
    for (size_t i = 0; i < v.as_array().size(); ++i) s += (i ? "," : "") + dump_f32(v.as_array()[i]);
    return s + "]";
  }
  if (v.is_object()) {
    std::string s = "{";
    bool first = true;
    for (const auto& kv : v.as_object()) {
      if (!first) s += ",";
      first = false;
      json::dump_string(s, kv.first);
      s += ":" + dump_f32(kv.second);
    }
    return s + "}";
  }
  return json::dump(v);
}

int usage(const char* argv0) {
  std::fprintf(stderr, "usage: %s --base BASE.safetensors [--prefix P] [--module M] [--adapter NAME=FOLDER]...\n",
               argv0);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string base_path, prefix, module;
  std::vector<std::pair<std::string, std::string>> adapters;
  bool module_set = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (i + 1 >= argc) return usage(argv[0]);
    std::string v = argv[++i];
    if (a == "--base") base_path = v;
    else if (a == "--prefix") prefix = v;
    else if (a == "--module") { module = v; module_set = true; }
    else if (a == "--adapter") {
      size_t eq = v.find('=');
      if (eq == std::string::npos || eq == 0) return usage(argv[0]);
      adapters.emplace_back(v.substr(0, eq), v.substr(eq + 1));
    } else {
      return usage(argv[0]);
    }
  }
  if (base_path.empty()) return usage(argv[0]);
  Service svc;
  try {
    lorart::SafetensorsFile f = lorart::SafetensorsFile::open(base_path);
    svc.base = lorart::BaseLinear::load(f, prefix);
    svc.module = module_set ? module : prefix;
    for (const auto& a : adapters) svc.store.load(a.first, a.second);
  } catch (const lorart::Error& e) {
    std::fprintf(stderr, "lorart_service: %s\n", e.what());
    return 1;
  }
  std::fprintf(stderr, "lorart_service: %s base [%lld, %lld], %zu adapter(s); reading requests on stdin\n",
               svc.base.is_nf4 ? "NF4" : "dense", static_cast<long long>(svc.base.out_features()),
               static_cast<long long>(svc.base.in_features()), svc.store.size());
  std::string line;
  while (std::getline(std::cin, line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    std::string reply;
    try {
      reply = dump_f32(svc.handle(json::parse(line)));
    } catch (const std::exception& e) {
      json::Value err;
      err.set("error", std::string(e.what()));
      reply = json::dump(err);
    }
    std::fwrite(reply.data(), 1, reply.size(), stdout);
    std::fputc('\n', stdout);
    std::fflush(stdout);
  }
  return 0;
}
