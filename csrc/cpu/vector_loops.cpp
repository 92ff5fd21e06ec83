#include "cpu/vector_loops.h"

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

}  // namespace

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
