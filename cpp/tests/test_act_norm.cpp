// The torch-free SwiGLU and RMSNorm entry points on the CPU: against plain double-precision
// formulas written here, over odd sizes (vector tails) and float32 / float64 buffers, plus their
// argument checks. Runs under AddressSanitizer/UBSan in CI.
#include <cmath>
#include <random>
#include <vector>

#include "lorart/act.h"
#include "lorart/norm.h"
#include "testing.h"

using namespace lorart;

namespace {

template <class T>
TensorView view(std::vector<T>& v, std::initializer_list<int64_t> shape) {
  return TensorView(v.data(), sizeof(T) == 8 ? DType::F64 : DType::F32, shape);
}

std::vector<float> randn(size_t n, unsigned seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

double silu(double g) { return g / (1.0 + std::exp(-g)); }

}  // namespace

TEST(swiglu_forward_and_backward_match_double_formulas) {
  for (int64_t n : {1, 7, 8, 31, 1000, 40000}) {
    auto g = randn(n, 1, 4.0f), u = randn(n, 2), dout = randn(n, 3);
    std::vector<float> out(n), dg(n), du(n);
    swiglu(view(g, {n}), view(u, {n}), view(out, {n}));
    swiglu_backward(view(g, {n}), view(u, {n}), view(dout, {n}), view(dg, {n}), view(du, {n}));
    double worst = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double s = 1.0 / (1.0 + std::exp(-double(g[i])));
      const double ref = silu(g[i]) * u[i];
      const double rdu = double(dout[i]) * silu(g[i]);
      const double rdg = double(dout[i]) * u[i] * s * (1.0 + g[i] * (1.0 - s));
      auto rel = [](double a, double b) { return std::fabs(a - b) / (std::fabs(b) + 1e-30); };
      // dg = dout * u * s * (1 + g * (1 - s)) cancels near g = -1.28: measure it against its terms' size
      const double dg_scale = std::fabs(double(dout[i]) * u[i] * s) * (1.0 + std::fabs(g[i]));
      worst = std::max({worst, rel(out[i], ref), rel(du[i], rdu), std::fabs(dg[i] - rdg) / (dg_scale + 1e-30)});
    }
    CHECK(worst < 4e-6);
  }
}

TEST(swiglu_float64_and_checks) {
  std::vector<double> g = {-3.0, 0.0, 2.5}, u = {1.0, 2.0, -1.0}, out(3);
  swiglu(view(g, {3}), view(u, {3}), view(out, {3}));
  for (int i = 0; i < 3; ++i) CHECK_NEAR(out[i], silu(g[i]) * u[i], 1e-15);
  std::vector<float> f(3), f2(2);
  CHECK_THROWS(swiglu(view(g, {3}), view(f, {3}), view(out, {3})), "argument `up`: expected dtype float64");
  CHECK_THROWS(swiglu(view(f, {3}), view(f2, {2}), view(f, {3})), "argument `up`: expected 3 elements");
  std::vector<float> a(3), b(3), c(3);
  CHECK_THROWS(swiglu_backward(view(a, {3}), view(b, {3}), view(c, {3}), view(a, {3}), view(a, {3})),
               "distinct from `grad_gate`");
}

TEST(rms_norm_forward_and_backward_match_double_formulas) {
  const double eps = 1e-6;
  for (int64_t h : {1, 5, 8, 33, 576}) {
    const int64_t rows = 7;
    auto x = randn(rows * h, 4, 3.0f), w = randn(h, 5), dy = randn(rows * h, 6);
    std::vector<float> y(rows * h), rstd(rows), dx(rows * h), dw(h);
    rms_norm(view(x, {rows, h}), view(w, {h}), eps, view(y, {rows, h}), view(rstd, {rows}));
    rms_norm_backward(view(x, {rows, h}), view(w, {h}), view(rstd, {rows}), view(dy, {rows, h}), view(dx, {rows, h}),
                      view(dw, {h}));
    std::vector<double> rdw(h, 0.0);
    for (int64_t i = 0; i < rows; ++i) {
      double ss = 0;
      for (int64_t j = 0; j < h; ++j) ss += double(x[i * h + j]) * x[i * h + j];
      const double r = 1.0 / std::sqrt(ss / h + eps);
      CHECK_NEAR(rstd[i], r, 1e-6 * r);
      double c = 0;
      for (int64_t j = 0; j < h; ++j) c += double(dy[i * h + j]) * w[j] * x[i * h + j] * r;
      c /= h;
      for (int64_t j = 0; j < h; ++j) {
        const double n = x[i * h + j] * r;
        CHECK_NEAR(y[i * h + j], w[j] * n, 1e-5 * (std::fabs(w[j] * n) + 1e-3));
        CHECK_NEAR(dx[i * h + j], r * (dy[i * h + j] * w[j] - n * c), 1e-4 * (r + 1.0));
        rdw[j] += double(dy[i * h + j]) * n;
      }
    }
    for (int64_t j = 0; j < h; ++j) CHECK_NEAR(dw[j], rdw[j], 1e-4 * (std::fabs(rdw[j]) + 1.0));
  }
}

TEST(rms_norm_without_weight_grad_no_rows_and_checks) {
  const int64_t rows = 3, h = 4;
  auto x = randn(rows * h, 7), w = randn(h, 8), dy = randn(rows * h, 9);
  std::vector<float> y(rows * h), rstd(rows), dx(rows * h), dx2(rows * h), dw(h, 123.0f);
  rms_norm(view(x, {rows, h}), view(w, {h}), 1e-6, view(y, {rows, h}), view(rstd, {rows}));
  rms_norm_backward(view(x, {rows, h}), view(w, {h}), view(rstd, {rows}), view(dy, {rows, h}), view(dx, {rows, h}),
                    TensorView());
  rms_norm_backward(view(x, {rows, h}), view(w, {h}), view(rstd, {rows}), view(dy, {rows, h}), view(dx2, {rows, h}),
                    view(dw, {h}));
  for (int64_t i = 0; i < rows * h; ++i) CHECK(dx[i] == dx2[i]);
  std::vector<float> none;  // no rows: the weight gradient is written as zeros
  rms_norm_backward(TensorView(none.data(), DType::F32, {0, h}), view(w, {h}), TensorView(none.data(), DType::F32, {0}),
                    TensorView(none.data(), DType::F32, {0, h}), TensorView(none.data(), DType::F32, {0, h}),
                    view(dw, {h}));
  for (float v : dw) CHECK(v == 0.0f);
  std::vector<float> w3(3), r2(2);
  CHECK_THROWS(rms_norm(view(x, {rows, h}), view(w3, {3}), 1e-6, view(y, {rows, h}), view(rstd, {rows})),
               "argument `weight`: expected shape");
  CHECK_THROWS(rms_norm(view(x, {rows, h}), view(w, {h}), 1e-6, view(y, {rows, h}), view(r2, {2})),
               "argument `rstd`: expected shape");
  CHECK_THROWS(rms_norm(view(x, {rows, h}), view(w, {h}), -1.0, view(y, {rows, h}), view(rstd, {rows})),
               "argument `eps`");
  CHECK_THROWS(rms_norm(view(x, {rows * h}), view(w, {h}), 1e-6, view(y, {rows, h}), view(rstd, {rows})),
               "argument `x`");
}

TEST_MAIN()
