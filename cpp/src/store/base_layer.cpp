// Frozen base linear layers (dense and bitsandbytes NF4) from safetensors.
#include "lorart/base_layer.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "common/check.h"
#include "common/half.h"
#include "common/parallel.h"
#include "lorart/json.h"
#include "lorart/detail/nf4_math.h"
#include "lorart/nf4.h"

namespace lorart {

namespace {
std::string key(const std::string& prefix, const char* suffix) {
  return prefix.empty() ? std::string(suffix) : prefix + "." + suffix;
}

inline float ld(const void* p, DType d, int64_t i) {
  switch (d) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::BF16: return detail::bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return detail::f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}
inline void st(void* p, DType d, int64_t i, float v) {
  switch (d) {
    case DType::F32: static_cast<float*>(p)[i] = v; break;
    case DType::BF16: static_cast<uint16_t*>(p)[i] = detail::f32_to_bf16(v); break;
    default: static_cast<uint16_t*>(p)[i] = detail::f32_to_f16(v); break;
  }
}

// y = x @ W.T + b, float32 accumulation.
void linear_cpu(const TensorView& x, const TensorView& w, const Tensor& bias, const TensorView& y,
                const char* what) {
  const std::initializer_list<DType> floats = {DType::F32, DType::BF16, DType::F16};
  detail::check_dtype(x, "x", floats);
  detail::check_dtype(y, "y", floats);
  for (const auto& t : {std::make_pair(&x, "x"), std::make_pair(&y, "y")}) {
    LORART_CHECK(!t.first->is_cuda(), what, ": argument `", t.second, "` is on ", device_name(t.first->device),
                 "; base layers compute on the CPU");
    detail::check_contiguous(*t.first, t.second);
    detail::check_ndim(*t.first, t.second, 2);
  }
  const int64_t n = x.shape[0], in = w.shape[1], out = w.shape[0];
  LORART_CHECK(x.shape[1] == in, what, ": expected x of shape [n, ", in, "], got ", x.shape_str());
  LORART_CHECK(y.shape[0] == n && y.shape[1] == out, what, ": expected y of shape [", n, ", ", out, "], got ",
               y.shape_str());
  if (n == 0 || out == 0) return;
  detail::check_not_null(x, "x");
  detail::check_not_null(y, "y");
  // x as float32 once (small), then float32 dot products with 8 independent partial sums
  // (vectorisable without reassociation flags); a bf16/f16 weight (keep_dtype) is read per element.
  Tensor xf;
  const float* xp;
  if (x.dtype == DType::F32) {
    xp = x.ptr<float>();
  } else {
    xf = Tensor(DType::F32, {n, in});
    for (int64_t i = 0; i < n * in; ++i) xf.ptr<float>()[i] = ld(x.data, x.dtype, i);
    xp = xf.ptr<float>();
  }
  detail::parallel_for(n * out, std::max<int64_t>(1, 16384 / std::max<int64_t>(in, 1)), [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const int64_t i = k / out, o = k % out;
      const float* xr = xp + i * in;
      float acc = 0.f;
      if (w.dtype == DType::F32) {
        const float* wr = w.ptr<float>() + o * in;
        float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t c = 0;
        for (; c + 8 <= in; c += 8)
          for (int j = 0; j < 8; ++j) part[j] += xr[c + j] * wr[c + j];
        for (; c < in; ++c) part[c & 7] += xr[c] * wr[c];
        acc = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
      } else {
        for (int64_t c = 0; c < in; ++c) acc += xr[c] * ld(w.data, w.dtype, o * in + c);
      }
      if (bias.defined()) acc += ld(bias.data(), bias.dtype(), o);
      st(y.data, y.dtype, k, acc);
    }
  });
}

Tensor load_bias(const SafetensorsFile& f, const std::string& prefix, int64_t out, bool keep_dtype) {
  const std::string bk = key(prefix, "bias");
  if (!f.contains(bk)) return Tensor();
  const SafetensorsEntry& e = f.entry(bk);
  LORART_CHECK_TYPE(e.has_dtype && (e.dtype == DType::F32 || e.dtype == DType::BF16 || e.dtype == DType::F16),
                    "safetensors file '", f.path(), "', tensor '", bk, "': expected dtype F32|BF16|F16, got ",
                    e.dtype_name);
  LORART_CHECK(e.shape.size() == 1 && e.shape[0] == out, "safetensors file '", f.path(), "', tensor '", bk,
               "': expected shape [", out, "], got ", e.shape.size(), "-d");
  Tensor b = f.tensor(bk);
  return keep_dtype || b.dtype() == DType::F32 ? b : b.to(DType::F32);
}
}  // namespace

DenseLinear DenseLinear::load(const SafetensorsFile& f, const std::string& prefix, bool keep_dtype) {
  const std::string wk = key(prefix, "weight");
  const SafetensorsEntry& e = f.entry(wk);
  LORART_CHECK_TYPE(e.has_dtype && (e.dtype == DType::F32 || e.dtype == DType::BF16 || e.dtype == DType::F16),
                    "safetensors file '", f.path(), "', tensor '", wk, "': expected dtype F32|BF16|F16, got ",
                    e.dtype_name, e.dtype_name == "U8" ? " (a bitsandbytes 4-bit weight? its quant_state is missing)" : "");
  LORART_CHECK(e.shape.size() == 2, "safetensors file '", f.path(), "', tensor '", wk,
               "': expected a 2-d [out, in] weight, got ", e.shape.size(), " dimensions");
  DenseLinear l;
  l.weight = f.tensor(wk);
  if (!keep_dtype && l.weight.dtype() != DType::F32) l.weight = l.weight.to(DType::F32);
  l.bias = load_bias(f, prefix, e.shape[0], keep_dtype);
  return l;
}

void DenseLinear::forward(const TensorView& x, const TensorView& y) const {
  LORART_CHECK(weight.defined(), "DenseLinear::forward: the layer is empty (not loaded)");
  linear_cpu(x, weight.view(), bias, y, "DenseLinear::forward");
}

bool NF4Linear::present(const SafetensorsFile& f, const std::string& prefix) {
  return f.contains(key(prefix, "weight.quant_state.bitsandbytes__nf4"));
}

NF4Linear NF4Linear::load(const SafetensorsFile& f, const std::string& prefix) {
  const std::string qs_key = key(prefix, "weight.quant_state.bitsandbytes__nf4");
  auto where = [&](const std::string& k) { return detail::cat("safetensors file '", f.path(), "', tensor '", k, "'"); };
  if (!f.contains(qs_key)) {
    LORART_CHECK(!f.contains(key(prefix, "weight.quant_state.bitsandbytes__fp4")), where(qs_key),
                 ": missing; the checkpoint is FP4, only NF4 is supported");
    LORART_CHECK(false, where(qs_key), ": missing (not a bitsandbytes NF4 layer)");
  }
  auto get = [&](const char* suffix, DType dt, bool required) -> Tensor {
    const std::string k = key(prefix, suffix);
    if (!f.contains(k)) {
      LORART_CHECK(!required, where(k), ": missing");
      return Tensor();
    }
    const SafetensorsEntry& e = f.entry(k);
    LORART_CHECK_TYPE(e.has_dtype && e.dtype == dt, where(k), ": expected dtype ", safetensors_dtype_name(dt),
                      ", got ", e.dtype_name);
    return f.tensor(k);
  };
  Tensor qs = get("weight.quant_state.bitsandbytes__nf4", DType::U8, true);
  json::Value q;
  try {
    q = json::parse(std::string_view(qs.ptr<char>(), qs.nbytes()));
  } catch (const Error& e) {
    LORART_CHECK(false, where(qs_key), ": bad JSON: ", e.what());
  }
  LORART_CHECK(q.is_object(), where(qs_key), ": expected a JSON object");
  auto field = [&](const char* k) -> const json::Value& {
    const json::Value* v = q.find(k);
    LORART_CHECK(v, where(qs_key), ": field \"", k, "\" missing");
    return *v;
  };
  const std::string qt = field("quant_type").as_string("quant_type");
  LORART_CHECK(qt == "nf4", where(qs_key), ": quant_type \"", qt, "\" (only nf4 is supported)");
  NF4Linear l;
  l.blocksize = field("blocksize").as_int("blocksize");
  LORART_CHECK(l.blocksize >= 32 && l.blocksize <= 4096 && (l.blocksize & (l.blocksize - 1)) == 0, where(qs_key),
               ": blocksize must be a power of two in [32, 4096], got ", l.blocksize);
  const auto& shape = field("shape").as_array("shape");
  LORART_CHECK(shape.size() == 2, where(qs_key), ": expected a 2-d shape [out, in], got ", shape.size(), "-d");
  l.rows = shape[0].as_int("shape[0]");
  l.cols = shape[1].as_int("shape[1]");
  LORART_CHECK(l.rows > 0 && l.cols > 0 && l.rows <= (int64_t(1) << 31) && l.cols <= (int64_t(1) << 31),
               where(qs_key), ": bad shape [", l.rows, ", ", l.cols, "]");
  const std::string dt = field("dtype").as_string("dtype");
  l.dtype = dt == "bfloat16" ? DType::BF16 : dt == "float16" ? DType::F16 : DType::F32;
  LORART_CHECK(dt == "bfloat16" || dt == "float16" || dt == "float32", where(qs_key), ": dtype \"", dt,
               "\" (expected bfloat16, float16 or float32)");

  const int64_t n = l.rows * l.cols, nblocks = (n + l.blocksize - 1) / l.blocksize;
  l.packed = get("weight", DType::U8, true);
  LORART_CHECK(l.packed.numel() == (n + 1) / 2, where(key(prefix, "weight")), ": expected ", (n + 1) / 2,
               " bytes for a [", l.rows, ", ", l.cols, "] NF4 weight, got ", l.packed.numel());
  l.quant_map = get("weight.quant_map", DType::F32, true);
  LORART_CHECK(l.quant_map.numel() == 16, where(key(prefix, "weight.quant_map")), ": expected 16 values, got ",
               l.quant_map.numel());
  for (int i = 0; i < 16; ++i)
    LORART_CHECK(std::fabs(l.quant_map.ptr<float>()[i] - detail::nf4_code(i)) < 1e-6f,
                 where(key(prefix, "weight.quant_map")), ": value ", i, " is ", l.quant_map.ptr<float>()[i],
                 ", not the NF4 table's ", detail::nf4_code(i), " (an FP4 checkpoint?)");
  const bool dq = q.find("nested_blocksize") != nullptr;
  l.absmax = get("weight.absmax", dq ? DType::U8 : DType::F32, true);
  LORART_CHECK(l.absmax.numel() == nblocks, where(key(prefix, "weight.absmax")), ": expected ", nblocks,
               " values, got ", l.absmax.numel());
  if (dq) {
    LORART_CHECK(field("nested_blocksize").as_int("nested_blocksize") == 256, where(qs_key),
                 ": nested_blocksize must be 256");
    l.offset = static_cast<float>(field("nested_offset").as_double("nested_offset"));
    l.nested_absmax = get("weight.nested_absmax", DType::F32, true);
    l.nested_code = get("weight.nested_quant_map", DType::F32, true);
    LORART_CHECK(l.nested_absmax.numel() == (nblocks + 255) / 256, where(key(prefix, "weight.nested_absmax")),
                 ": expected ", (nblocks + 255) / 256, " values, got ", l.nested_absmax.numel());
    LORART_CHECK(l.nested_code.numel() == 256, where(key(prefix, "weight.nested_quant_map")),
                 ": expected 256 values, got ", l.nested_code.numel());
  }
  l.bias = load_bias(f, prefix, l.rows, false);
  return l;
}

NF4View NF4Linear::view() const {
  LORART_CHECK(packed.defined(), "NF4Linear: the layer is empty (not loaded)");
  NF4View v;
  v.packed = packed.view();
  v.absmax = absmax.view();
  if (double_quant()) {
    v.nested_absmax = nested_absmax.view();
    v.nested_code = nested_code.view();
  }
  v.offset = offset;
  v.blocksize = blocksize;
  v.rows = rows;
  v.cols = cols;
  return v;
}

Tensor NF4Linear::dequantize() const {
  NF4View v = view();
  Tensor w(DType::F32, {rows, cols});
  nf4_dequantize(v, w.view());
  return w;
}

void NF4Linear::forward(const TensorView& x, const TensorView& y) const {
  NF4View v = view();
  detail::check_dtype(x, "x", {DType::F32, DType::BF16, DType::F16});
  detail::check_ndim(x, "x", 2);
  detail::check_ndim(y, "y", 2);
  LORART_CHECK(x.shape[1] == cols, "NF4Linear::forward: expected x of shape [n, ", cols, "], got ", x.shape_str());
  LORART_CHECK(y.shape[0] == x.shape[0] && y.shape[1] == rows, "NF4Linear::forward: expected y of shape [",
               x.shape[0], ", ", rows, "], got ", y.shape_str());
  LORART_CHECK(y.dtype == x.dtype, "NF4Linear::forward: argument `y`: expected dtype ", dtype_name(x.dtype),
               " (x's), got ", dtype_name(y.dtype));
  Tensor b;
  if (bias.defined()) b = bias.dtype() == x.dtype ? bias : bias.to(x.dtype);
  nf4_gemv(x, v, b.defined() ? b.view() : TensorView(), y);
}

BaseLinear BaseLinear::load(const SafetensorsFile& f, const std::string& prefix) {
  BaseLinear b;
  b.is_nf4 = NF4Linear::present(f, prefix);
  if (b.is_nf4) b.nf4 = NF4Linear::load(f, prefix);
  else b.dense = DenseLinear::load(f, prefix);
  return b;
}

}  // namespace lorart
