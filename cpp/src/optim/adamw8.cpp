// AdamW step with 8-bit blockwise states: argument checks, device dispatch, the CPU kernel,
// the dynamic maps and the standalone (CPU) blockwise quantisation.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/check.h"
#include "common/cpu_loop.h"
#include "common/half.h"
#include "common/parallel.h"
#include "lorart/detail/optim8_math.h"
#include "lorart/optim.h"
#include "optim/dynamic_tables.h"
#include "optim/optim_checks.h"
#ifdef LORART_WITH_CUDA
#include "common/cuda_api.h"
#include "optim/optim_launch.h"
#endif

namespace lorart {
namespace detail {

const DynamicTables& dynamic_tables() {
  // on the heap (132 KB), built once; never freed (used until exit)
  static const DynamicTables* tables = [] {
    auto* t = new DynamicTables;
    for (int s = 0; s < 2; ++s) {
      for (int i = 0; i < kCodeSize; ++i) t->code[s][i] = dynamic_code(s == 0, i);
      for (int i = 0; i < kCodeSize; ++i) t->mid[s][i] = dynamic_mid(t->code[s], i);
      for (uint32_t k = 0; k < (1u << 16); ++k) {
        // the smallest float of the bucket: the lowest bit pattern when positive, the highest when negative
        const uint32_t bits = (k << 16) | ((k & 0x8000u) ? 0xffffu : 0u);
        float lo;
        std::memcpy(&lo, &bits, 4);
        t->lut[s][k] = lo == lo ? static_cast<uint8_t>(dynamic_quantize(t->mid[s], lo)) : 0;
      }
    }
    return t;
  }();
  return *tables;
}

}  // namespace detail

namespace {

constexpr int kB = detail::kQuantBlock;
constexpr int64_t kBlocksPerTile = 128;  // 32K elements per parallel work item
constexpr int kLanes = 16;               // independent accumulators of the absmax reduction

// absmax_combine over a block, written to vectorise: lane-wise max ignoring NaN, plus a NaN flag.
LORART_OPTIM_HD float block_absmax(const float* __restrict__ x) {
  float mx[kLanes] = {};
  uint32_t nan[kLanes] = {};
  for (int j0 = 0; j0 < kB; j0 += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const float a = std::fabs(x[j0 + k]);
      mx[k] = mx[k] < a ? a : mx[k];
      nan[k] |= a != a ? 1u : 0u;
    }
  }
  float r = 0.0f;
  uint32_t any_nan = 0;
  for (int k = 0; k < kLanes; ++k) {
    r = mx[k] > r ? mx[k] : r;
    any_nan |= nan[k];
  }
  return any_nan ? NAN : r;
}

// One run of whole 256-element blocks of one tensor (the last one may be partial). The first
// and last loops vectorise (gathers of the code table, the AdamW math); the clones are picked
// at load time by x86-64 feature level (common/cpu_loop.h).
template <class T>
LORART_CPU_CLONES
void cpu_adamw8_run(T* __restrict__ p, const T* __restrict__ g, uint8_t* __restrict__ q1, uint8_t* __restrict__ q2,
                    float* __restrict__ a1, float* __restrict__ a2, int64_t n, detail::AdamWScalars s,
                    const detail::DynamicTables* __restrict__ tab) {
  alignas(64) float m[kB], v[kB];
  alignas(64) uint32_t k1[kB], k2[kB];
  const float* __restrict__ code1 = tab->code[0];
  const float* __restrict__ code2 = tab->code[1];
  const float* __restrict__ mid1 = tab->mid[0];
  const float* __restrict__ mid2 = tab->mid[1];
  const uint8_t* __restrict__ lut1 = tab->lut[0];
  const uint8_t* __restrict__ lut2 = tab->lut[1];
  for (int64_t b0 = 0, blk = 0; b0 < n; b0 += kB, ++blk) {
    const int len = static_cast<int>(std::min<int64_t>(kB, n - b0));
    T* __restrict__ pb = p + b0;
    const T* __restrict__ gb = g + b0;
    uint8_t* __restrict__ q1b = q1 + b0;
    uint8_t* __restrict__ q2b = q2 + b0;
    const float am1 = a1[blk], am2 = a2[blk];
    for (int j = 0; j < len; ++j) {
      float pf = detail::to_f32(pb[j]);
      float mf = code1[q1b[j]] * am1;
      float vf = code2[q2b[j]] * am2;
      detail::adamw_update(pf, detail::to_f32(gb[j]), mf, vf, s);
      pb[j] = detail::from_f32<T>(pf);
      m[j] = mf;
      v[j] = vf;
    }
    for (int j = len; j < kB; ++j) m[j] = v[j] = 0.0f;  // |0| never raises the max
    const float n1 = block_absmax(m), n2 = block_absmax(v);
    // normalise (vectorised), then two table loads per value (the lookup of dynamic_quantize_lut)
    for (int j = 0; j < kB; ++j) {
      m[j] = m[j] / n1;
      v[j] = v[j] / n2;
      k1[j] = detail::dynamic_lut_key(m[j]);
      k2[j] = detail::dynamic_lut_key(v[j]);
    }
    for (int j = 0; j < len; ++j) {
      q1b[j] = static_cast<uint8_t>(detail::dynamic_lut_finish(lut1, mid1, k1[j], m[j]));
      q2b[j] = static_cast<uint8_t>(detail::dynamic_lut_finish(lut2, mid2, k2[j], v[j]));
    }
    a1[blk] = n1;
    a2[blk] = n2;
  }
}

struct Tile {
  int tensor;
  int64_t block_begin, block_end;
};

template <class T>
void cpu_run_tile(const TensorView& p, const TensorView& g, const TensorView& q1, const TensorView& q2,
                  const TensorView& a1, const TensorView& a2, const Tile& t, const detail::AdamWScalars& s,
                  const detail::DynamicTables* tab) {
  const int64_t e0 = t.block_begin * kB, e1 = std::min(p.numel(), t.block_end * kB);
  cpu_adamw8_run<T>(p.ptr<T>() + e0, g.ptr<const T>() + e0, q1.ptr<uint8_t>() + e0, q2.ptr<uint8_t>() + e0,
                    a1.ptr<float>() + t.block_begin, a2.ptr<float>() + t.block_begin, e1 - e0, s, tab);
}

int64_t num_blocks(int64_t n) { return (n + kB - 1) / kB; }

}  // namespace

void adamw8_step(const std::vector<TensorView>& params, const std::vector<TensorView>& grads,
                 const std::vector<TensorView>& q_exp_avgs, const std::vector<TensorView>& q_exp_avg_sqs,
                 const std::vector<TensorView>& absmax_exp_avgs, const std::vector<TensorView>& absmax_exp_avg_sqs,
                 const std::vector<int64_t>& steps, const AdamWOptions& options, Stream stream) {
  detail::check_adamw_options(options);
  const size_t n = params.size();
  LORART_CHECK(grads.size() == n && q_exp_avgs.size() == n && q_exp_avg_sqs.size() == n &&
                   absmax_exp_avgs.size() == n && absmax_exp_avg_sqs.size() == n && steps.size() == n,
               "adamw8_step: expected params, grads, q_exp_avgs, q_exp_avg_sqs, absmax_exp_avgs, absmax_exp_avg_sqs "
               "and steps of one length, got ", n, ", ", grads.size(), ", ", q_exp_avgs.size(), ", ",
               q_exp_avg_sqs.size(), ", ", absmax_exp_avgs.size(), ", ", absmax_exp_avg_sqs.size(), ", ", steps.size());
  if (n == 0) return;
  std::vector<detail::AdamWScalars> scalars(n);
  for (size_t i = 0; i < n; ++i) {
    scalars[i] = detail::check_param_grad_step(params, grads, steps, i, options);
    const int64_t numel = params[i].numel();
    const std::string as = detail::cat("as params[", i, "]");
    const std::string nb = detail::cat("ceil(params[", i, "].numel / 256)");
    detail::check_state(q_exp_avgs[i], detail::nth("q_exp_avgs", i), {DType::U8}, numel, as, params[0]);
    detail::check_state(q_exp_avg_sqs[i], detail::nth("q_exp_avg_sqs", i), {DType::U8}, numel, as, params[0]);
    detail::check_state(absmax_exp_avgs[i], detail::nth("absmax_exp_avgs", i), {DType::F32}, num_blocks(numel), nb,
                        params[0]);
    detail::check_state(absmax_exp_avg_sqs[i], detail::nth("absmax_exp_avg_sqs", i), {DType::F32},
                        num_blocks(numel), nb, params[0]);
  }
  detail::check_device_supported(params[0], "params[0]");
  if (params[0].is_cuda()) {
#ifdef LORART_WITH_CUDA
    cuda::set_device(params[0].device.index);
    for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
      std::vector<cuda::AdamW8Tensor> ts;
      for (size_t i = 0; i < n; ++i) {
        if (params[i].dtype != dt || params[i].numel() == 0) continue;
        ts.push_back({params[i].data, grads[i].data, q_exp_avgs[i].ptr<uint8_t>(), q_exp_avg_sqs[i].ptr<uint8_t>(),
                      absmax_exp_avgs[i].ptr<float>(), absmax_exp_avg_sqs[i].ptr<float>(), params[i].numel(),
                      scalars[i]});
      }
      if (!ts.empty()) cuda::adamw8_step(ts, dt, stream);
    }
#endif
    return;
  }
  const detail::DynamicTables* tab = &detail::dynamic_tables();
  std::vector<Tile> tiles;
  for (size_t i = 0; i < n; ++i) {
    const int64_t nb = num_blocks(params[i].numel());
    for (int64_t b = 0; b < nb; b += kBlocksPerTile)
      tiles.push_back({static_cast<int>(i), b, std::min(nb, b + kBlocksPerTile)});
  }
  detail::parallel_for(static_cast<int64_t>(tiles.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Tile& t = tiles[k];
      const size_t i = static_cast<size_t>(t.tensor);
      const TensorView *p = &params[i], *g = &grads[i], *q1 = &q_exp_avgs[i], *q2 = &q_exp_avg_sqs[i];
      const TensorView *a1 = &absmax_exp_avgs[i], *a2 = &absmax_exp_avg_sqs[i];
      detail::dispatch_float<false>(p->dtype, [&](auto tag) {
        cpu_run_tile<decltype(tag)>(*p, *g, *q1, *q2, *a1, *a2, t, scalars[i], tab);
      });
    }
  });
}

std::vector<float> dynamic_map(bool is_signed) {
  const float* c = detail::dynamic_tables().code[is_signed ? 0 : 1];
  return std::vector<float>(c, c + detail::kCodeSize);
}

namespace {

void check_cpu_blockwise(const TensorView& q, const TensorView& absmax, const TensorView& x, const char* fn,
                         const char* xname) {
  LORART_CHECK(!x.is_cuda() && !q.is_cuda() && !absmax.is_cuda(), fn,
               ": expected CPU tensors (the optimizer converts states on the host), got ", device_name(x.device), ", ",
               device_name(q.device), ", ", device_name(absmax.device));
  detail::check_dtype(x, xname, {DType::F32});
  detail::check_dtype(q, "q", {DType::U8});
  detail::check_dtype(absmax, "absmax", {DType::F32});
  const TensorView* all[3] = {&x, &q, &absmax};
  const char* names[3] = {xname, "q", "absmax"};
  for (int k = 0; k < 3; ++k) {
    detail::check_contiguous(*all[k], names[k]);
    if (all[k]->numel() > 0) detail::check_not_null(*all[k], names[k]);
  }
  LORART_CHECK(q.numel() == x.numel(), "argument `q`: expected ", x.numel(), " elements (as ", xname, "), got ",
               q.numel());
  LORART_CHECK(absmax.numel() == num_blocks(x.numel()), "argument `absmax`: expected ", num_blocks(x.numel()),
               " elements (ceil(", xname, ".numel / 256)), got ", absmax.numel());
}

}  // namespace

void quantize_blockwise8(const TensorView& x, bool is_signed, const TensorView& q, const TensorView& absmax) {
  check_cpu_blockwise(q, absmax, x, "quantize_blockwise8", "x");
  const detail::DynamicTables& t = detail::dynamic_tables();
  const int s = is_signed ? 0 : 1;
  const float* xp = x.ptr<const float>();
  uint8_t* qp = q.ptr<uint8_t>();
  float* ap = absmax.ptr<float>();
  const int64_t nb = num_blocks(x.numel());
  detail::parallel_for(nb, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t e0 = b * kB, e1 = std::min(x.numel(), e0 + kB);
      float a = 0.0f;
      for (int64_t j = e0; j < e1; ++j) a = detail::absmax_combine(a, xp[j]);
      for (int64_t j = e0; j < e1; ++j)
        qp[j] = static_cast<uint8_t>(detail::dynamic_quantize_lut(t.lut[s], t.mid[s], xp[j] / a));
      ap[b] = a;
    }
  });
}

void dequantize_blockwise8(const TensorView& q, const TensorView& absmax, bool is_signed, const TensorView& out) {
  check_cpu_blockwise(q, absmax, out, "dequantize_blockwise8", "out");
  const float* code = detail::dynamic_tables().code[is_signed ? 0 : 1];
  const uint8_t* qp = q.ptr<const uint8_t>();
  const float* ap = absmax.ptr<const float>();
  float* op = out.ptr<float>();
  detail::parallel_for(num_blocks(out.numel()), 64, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo * kB, e = std::min(out.numel(), hi * kB); j < e; ++j) op[j] = code[qp[j]] * ap[j / kB];
  });
}

}  // namespace lorart
