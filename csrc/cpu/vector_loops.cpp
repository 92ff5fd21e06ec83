#include "cpu/vector_loops.h"

#include <cmath>

namespace fastdni::cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTDNI_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTDNI_VECTOR_CLONES
#endif
#define FASTDNI_INLINE __attribute__((always_inline)) inline

// Branches on run-time constants (optimizer kind, activation) sit outside the loops so the loops vectorise.
template <typename T>
FASTDNI_INLINE void optimizer_body(T* __restrict param, T* __restrict state0, T* __restrict state1, const T* __restrict grad,
                                   int64_t n, const OptimizerStep<T>& step) {
  const OptimizerStep<T> o = step;
  if (o.kind == OptimizerKind::kAdam) {
    for (int64_t i = 0; i < n; ++i) adam_update(param[i], state0[i], state1[i], grad[i], o);
  } else if (state0 != nullptr) {
    for (int64_t i = 0; i < n; ++i) sgd_update(param[i], state0 + i, grad[i], o);
  } else {
    for (int64_t i = 0; i < n; ++i) sgd_update<T>(param[i], nullptr, grad[i], o);
  }
}

template <Activation kAct, typename T>
FASTDNI_INLINE void delta_for(const T* __restrict prediction, const T* __restrict h, const T* __restrict pre, T* __restrict delta,
                              int64_t n, T scale) {
  for (int64_t i = 0; i < n; ++i) delta[i] = delta_value(kAct, prediction[i], h[i], pre[i], scale);
}

template <typename T>
FASTDNI_INLINE void delta_body(const T* prediction, const T* h, const T* pre, T* delta, int64_t n, Activation act, T scale) {
  switch (act) {
    case Activation::kRelu: return delta_for<Activation::kRelu>(prediction, h, h, delta, n, scale);
    case Activation::kTanh: return delta_for<Activation::kTanh>(prediction, h, h, delta, n, scale);
    case Activation::kGelu: return delta_for<Activation::kGelu>(prediction, h, pre, delta, n, scale);
    case Activation::kLeakyRelu: return delta_for<Activation::kLeakyRelu>(prediction, h, h, delta, n, scale);
    default: return delta_for<Activation::kIdentity>(prediction, h, h, delta, n, scale);
  }
}

template <typename T>
FASTDNI_INLINE double error_body(const T* __restrict prediction, const T* __restrict target, T* __restrict grad, int64_t n, T scale,
                                 T factor) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T e = sg_error_value(prediction[i], target[i], scale);
    grad[i] = e * factor;
    sum += static_cast<double>(e) * static_cast<double>(e);
  }
  return sum;
}

// The activation as a template argument, picked by a switch over always-inlined instances (as delta_body): the loops
// vectorise.
template <Activation kAct, typename T>
FASTDNI_INLINE void normalise_for(const T* __restrict pre, T* __restrict xhat, T* __restrict h, const T* __restrict gamma,
                                  const T* __restrict beta, const T* __restrict mean, const T* __restrict invstd, int64_t rows,
                                  int64_t stride, int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * stride;
    for (int64_t j = 0; j < width; ++j) {
      const T x = (pre[o + j] - mean[j]) * invstd[j];
      xhat[o + j] = x;
      h[o + j] = activate(kAct, gamma[j] * x + beta[j]);
    }
  }
}

template <Activation kAct, typename T>
FASTDNI_INLINE void dy_sums_for(const T* __restrict h, const T* __restrict xhat, const T* __restrict prediction,
                                const T* __restrict gamma, const T* __restrict beta, T* __restrict dy, T* __restrict sum_dyx,
                                T* __restrict sum_dy, int64_t rows, int64_t stride, int64_t width, T scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * stride;
    for (int64_t j = 0; j < width; ++j) {
      const T x = xhat[o + j];
      // gelu's act' needs y = gamma xhat + beta: formed again here rather than kept by the forward
      const T y = kAct == Activation::kGelu ? gamma[j] * x + beta[j] : T(0);
      const T d = delta_value(kAct, prediction[o + j], h[o + j], y, scale);
      dy[o + j] = d;
      sum_dy[j] += d;
      sum_dyx[j] += d * x;
    }
  }
}

#define FASTDNI_ACTIVATION_SWITCH(act, fn, ...)                                 \
  switch (act) {                                                                \
    case Activation::kRelu: return fn<Activation::kRelu>(__VA_ARGS__);          \
    case Activation::kTanh: return fn<Activation::kTanh>(__VA_ARGS__);          \
    case Activation::kGelu: return fn<Activation::kGelu>(__VA_ARGS__);          \
    case Activation::kLeakyRelu: return fn<Activation::kLeakyRelu>(__VA_ARGS__);\
    default: return fn<Activation::kIdentity>(__VA_ARGS__);                     \
  }

// Rows outer, the strip's columns inner: every loop runs along a contiguous row, the per-column sums in registers
// or L1. Two passes for the moments (the mean, then the centred squares: no cancellation as in E[x^2] - E[x]^2).
template <typename T>
FASTDNI_INLINE void batch_norm_body(const T* __restrict pre, T* __restrict xhat, T* __restrict h, const T* __restrict gamma,
                                    const T* __restrict beta, T* __restrict mean, T* __restrict var, T* __restrict invstd,
                                    int64_t rows, int64_t stride, int64_t width, T eps, Activation act) {
  for (int64_t j = 0; j < width; ++j) mean[j] = var[j] = T(0);
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = pre + r * stride;
    for (int64_t j = 0; j < width; ++j) mean[j] += row[j];
  }
  for (int64_t j = 0; j < width; ++j) mean[j] /= T(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = pre + r * stride;
    for (int64_t j = 0; j < width; ++j) {
      const T d = row[j] - mean[j];
      var[j] += d * d;
    }
  }
  for (int64_t j = 0; j < width; ++j) {
    var[j] /= T(rows);  // biased: what normalises; the caller forms the running statistics' unbiased one
    invstd[j] = T(1) / std::sqrt(var[j] + eps);
  }
  FASTDNI_ACTIVATION_SWITCH(act, normalise_for, pre, xhat, h, gamma, beta, mean, invstd, rows, stride, width)
}

template <typename T>
FASTDNI_INLINE void dy_sums(const T* h, const T* xhat, const T* prediction, const T* gamma, const T* beta, T* dy, T* sum_dyx,
                            T* sum_dy, int64_t rows, int64_t stride, int64_t width, Activation act, T scale) {
  FASTDNI_ACTIVATION_SWITCH(act, dy_sums_for, h, xhat, prediction, gamma, beta, dy, sum_dyx, sum_dy, rows, stride, width, scale)
}

template <typename T>
FASTDNI_INLINE void normalise_grad(const T* __restrict xhat, const T* __restrict gamma, const T* __restrict invstd,
                                   T* __restrict grad_pre, const T* __restrict grad_gamma, const T* __restrict grad_beta,
                                   int64_t rows, int64_t stride, int64_t width) {
  const T inv_rows = T(1) / T(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * stride;
    for (int64_t j = 0; j < width; ++j) {
      const T k = gamma[j] * invstd[j];  // the pre-update gamma: the optimizer steps it after this
      grad_pre[o + j] = k * (grad_pre[o + j] - grad_beta[j] * inv_rows - xhat[o + j] * (grad_gamma[j] * inv_rows));
    }
  }
}

// dy = prediction / scale * act'(y) stored in grad_pre and summed (dbeta) and summed times xhat (dgamma) in one pass;
// then dpre = gamma invstd (dy - dbeta / B - xhat dgamma / B) in place.
template <typename T>
FASTDNI_INLINE void batch_norm_backward_body(const T* __restrict h, const T* __restrict xhat, const T* __restrict prediction,
                                             const T* __restrict gamma, const T* __restrict beta, const T* __restrict invstd,
                                             T* __restrict grad_pre, T* __restrict grad_gamma, T* __restrict grad_beta,
                                             int64_t rows, int64_t stride, int64_t width, Activation act, T scale) {
  for (int64_t j = 0; j < width; ++j) grad_gamma[j] = grad_beta[j] = T(0);
  dy_sums(h, xhat, prediction, gamma, beta, grad_pre, grad_gamma, grad_beta, rows, stride, width, act, scale);
  normalise_grad(xhat, gamma, invstd, grad_pre, grad_gamma, grad_beta, rows, stride, width);
}

}  // namespace

FASTDNI_VECTOR_CLONES void batch_norm_loop(const float* pre, float* xhat, float* h, const float* gamma, const float* beta, float* mean,
                                           float* var, float* invstd, int64_t rows, int64_t stride, int64_t width, float eps,
                                           Activation act) {
  batch_norm_body(pre, xhat, h, gamma, beta, mean, var, invstd, rows, stride, width, eps, act);
}
FASTDNI_VECTOR_CLONES void batch_norm_loop(const double* pre, double* xhat, double* h, const double* gamma, const double* beta,
                                           double* mean, double* var, double* invstd, int64_t rows, int64_t stride, int64_t width,
                                           double eps, Activation act) {
  batch_norm_body(pre, xhat, h, gamma, beta, mean, var, invstd, rows, stride, width, eps, act);
}
FASTDNI_VECTOR_CLONES void batch_norm_backward_loop(const float* h, const float* xhat, const float* prediction, const float* gamma,
                                                    const float* beta, const float* invstd, float* grad_pre, float* grad_gamma,
                                                    float* grad_beta, int64_t rows, int64_t stride, int64_t width, Activation act,
                                                    float scale) {
  batch_norm_backward_body(h, xhat, prediction, gamma, beta, invstd, grad_pre, grad_gamma, grad_beta, rows, stride, width, act, scale);
}
FASTDNI_VECTOR_CLONES void batch_norm_backward_loop(const double* h, const double* xhat, const double* prediction, const double* gamma,
                                                    const double* beta, const double* invstd, double* grad_pre, double* grad_gamma,
                                                    double* grad_beta, int64_t rows, int64_t stride, int64_t width, Activation act,
                                                    double scale) {
  batch_norm_backward_body(h, xhat, prediction, gamma, beta, invstd, grad_pre, grad_gamma, grad_beta, rows, stride, width, act, scale);
}

FASTDNI_VECTOR_CLONES void optimizer_loop(float* p, float* s0, float* s1, const float* g, int64_t n, const OptimizerStep<float>& o) {
  optimizer_body(p, s0, s1, g, n, o);
}
FASTDNI_VECTOR_CLONES void optimizer_loop(double* p, double* s0, double* s1, const double* g, int64_t n, const OptimizerStep<double>& o) {
  optimizer_body(p, s0, s1, g, n, o);
}
FASTDNI_VECTOR_CLONES void delta_loop(const float* g, const float* h, const float* pre, float* d, int64_t n, Activation act, float s) {
  delta_body(g, h, pre, d, n, act, s);
}
FASTDNI_VECTOR_CLONES void delta_loop(const double* g, const double* h, const double* pre, double* d, int64_t n, Activation act, double s) {
  delta_body(g, h, pre, d, n, act, s);
}
FASTDNI_VECTOR_CLONES double error_loop(const float* p, const float* t, float* g, int64_t n, float s, float f) {
  return error_body(p, t, g, n, s, f);
}
FASTDNI_VECTOR_CLONES double error_loop(const double* p, const double* t, double* g, int64_t n, double s, double f) {
  return error_body(p, t, g, n, s, f);
}

}  // namespace fastdni::cpu
