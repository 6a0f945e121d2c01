// AdamW step: argument checks, device dispatch and the CPU kernel.
#include <algorithm>
#include <vector>

#include "common/check.h"
#include "common/cpu_loop.h"
#include "common/half.h"
#include "common/parallel.h"
#include "lorart/detail/optim_math.h"
#include "lorart/optim.h"
#include "optim/optim_checks.h"
#ifdef LORART_WITH_CUDA
#include "common/cuda_api.h"
#include "optim/optim_launch.h"
#endif

namespace lorart {
namespace {

constexpr int64_t kCpuTile = 1 << 15;  // elements per parallel work item

// The inner loop over one contiguous run, written so that the compiler vectorises it
// (no aliasing; this file is built with -fno-math-errno, see CMakeLists.txt). On x86-64
// with GCC an AVX-512 or AVX2+FMA clone is picked at load time by CPU feature level (common/cpu_loop.h).
template <class T>
LORART_CPU_CLONES
void cpu_adamw_run(T* __restrict__ p, const T* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
                   int64_t n, detail::AdamWScalars s) {
  for (int64_t i = 0; i < n; ++i) {
    float pf = detail::to_f32(p[i]);
    float mf = m[i], vf = v[i];
    detail::adamw_update(pf, detail::to_f32(g[i]), mf, vf, s);
    p[i] = detail::from_f32<T>(pf);
    m[i] = mf;
    v[i] = vf;
  }
}

struct Tile {
  int tensor;
  int64_t begin, end;
};

template <class T>
void cpu_run_tile(const TensorView& p, const TensorView& g, const TensorView& m, const TensorView& v,
                  const Tile& t, const detail::AdamWScalars& s) {
  cpu_adamw_run<T>(p.ptr<T>() + t.begin, g.ptr<const T>() + t.begin, m.ptr<float>() + t.begin,
                   v.ptr<float>() + t.begin, t.end - t.begin, s);
}

void cpu_adamw_step(const std::vector<TensorView>& params, const std::vector<TensorView>& grads,
                    const std::vector<TensorView>& exp_avgs, const std::vector<TensorView>& exp_avg_sqs,
                    const std::vector<detail::AdamWScalars>& scalars) {
  std::vector<Tile> tiles;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    for (int64_t b = 0; b < n; b += kCpuTile) tiles.push_back({static_cast<int>(i), b, std::min(n, b + kCpuTile)});
  }
  detail::parallel_for(static_cast<int64_t>(tiles.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Tile& t = tiles[k];
      const size_t i = static_cast<size_t>(t.tensor);
      detail::dispatch_float<false>(params[i].dtype, [&](auto tag) {
        cpu_run_tile<decltype(tag)>(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], t, scalars[i]);
      });
    }
  });
}

}  // namespace

void adamw_step(const std::vector<TensorView>& params, const std::vector<TensorView>& grads,
                const std::vector<TensorView>& exp_avgs, const std::vector<TensorView>& exp_avg_sqs,
                const std::vector<int64_t>& steps, const AdamWOptions& options, Stream stream) {
  detail::check_adamw_options(options);
  const size_t n = params.size();
  LORART_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
               "adamw_step: expected params, grads, exp_avgs, exp_avg_sqs and steps of one length, got ", n, ", ",
               grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ", steps.size());
  if (n == 0) return;
  std::vector<detail::AdamWScalars> scalars(n);
  for (size_t i = 0; i < n; ++i) {
    scalars[i] = detail::check_param_grad_step(params, grads, steps, i, options);
    const std::string as = detail::cat("as params[", i, "]");
    detail::check_state(exp_avgs[i], detail::nth("exp_avgs", i), {DType::F32}, params[i].numel(), as, params[0]);
    detail::check_state(exp_avg_sqs[i], detail::nth("exp_avg_sqs", i), {DType::F32}, params[i].numel(), as, params[0]);
  }
  detail::check_device_supported(params[0], "params[0]");
  if (params[0].is_cuda()) {
#ifdef LORART_WITH_CUDA
    cuda::set_device(params[0].device.index);
    for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
      std::vector<cuda::AdamWTensor> ts;
      for (size_t i = 0; i < n; ++i) {
        if (params[i].dtype != dt || params[i].numel() == 0) continue;
        ts.push_back({params[i].data, grads[i].data, exp_avgs[i].ptr<float>(), exp_avg_sqs[i].ptr<float>(),
                      params[i].numel(), scalars[i]});
      }
      if (!ts.empty()) cuda::adamw_step(ts, dt, stream);
    }
#endif
  } else {
    cpu_adamw_step(params, grads, exp_avgs, exp_avg_sqs, scalars);
  }
}

}  // namespace lorart
