// Elementwise math of the fused DNI ops, shared by the CPU (C++) and CUDA backends: activations, their
// derivatives, the layer's delta, the SG error and the optimizer updates. The formulae are those of fastdni/reference (activations.py,
// optim.py), which follow torch.optim operation for operation so that results agree to rounding.
#pragma once

#include <cmath>

#ifdef __CUDACC__
#define FASTDNI_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTDNI_HOST_DEVICE inline
#endif

namespace fastdni {

// The op contract's activations and their codes (fastdni/contract.py: ACTIVATIONS, ACTIVATION_CODES).
enum class Activation : int { kIdentity = 0, kRelu = 1, kTanh = 2, kGelu = 3, kLeakyRelu = 4 };

// leaky_relu's negative slope (fastdni/contract.py: LEAKY_RELU_SLOPE).
constexpr double kLeakyReluSlope = 0.01;

constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;

template <typename T>
FASTDNI_HOST_DEVICE T activate(Activation act, T pre) {
  switch (act) {
    case Activation::kRelu: return pre < T(0) ? T(0) : pre;  // NaN stays NaN, as torch.relu
    case Activation::kTanh: return std::tanh(pre);
    case Activation::kGelu: return pre * T(0.5) * (T(1) + std::erf(pre * T(kInvSqrt2)));
    case Activation::kLeakyRelu: return pre < T(0) ? pre * T(kLeakyReluSlope) : pre;  // NaN stays NaN
    default: return pre;
  }
}

// act'(pre), from the output h where it suffices (identity, relu, tanh, leaky_relu) and from pre for gelu
// (needs_pre, op_args.h): the forward keeps only what this needs.
template <typename T>
FASTDNI_HOST_DEVICE T activation_derivative(Activation act, T h, T pre) {
  switch (act) {
    case Activation::kRelu: return h > T(0) ? T(1) : T(0);
    case Activation::kTanh: return T(1) - h * h;
    case Activation::kGelu: {
      T cdf = T(0.5) * (T(1) + std::erf(pre * T(kInvSqrt2)));
      T pdf = std::exp(T(-0.5) * pre * pre) * T(kInvSqrt2Pi);
      return cdf + pre * pdf;
    }
    case Activation::kLeakyRelu: return h > T(0) ? T(1) : T(kLeakyReluSlope);
    default: return T(1);
  }
}

// The layer's delta = prediction * act'(h, pre) / scale: the synthetic gradient pushed through the activation.
template <typename T>
FASTDNI_HOST_DEVICE T delta_value(Activation act, T prediction, T h, T pre, T scale) {
  return prediction * activation_derivative(act, h, pre) / scale;
}

// The SG regression error e = prediction - scale * target (its gradient is factor * e, its loss term e^2).
template <typename T>
FASTDNI_HOST_DEVICE T sg_error_value(T prediction, T target, T scale) {
  return prediction - scale * target;
}

enum class OptimizerKind : int { kSgd = 0, kAdam = 1 };

// One optimizer step's scalars. Differences such as 1 - beta2 are formed on the host in double and only
// then rounded to T, as torch.optim does with its Python-float scalars (1 - 0.999f is off by 1e-5).
template <typename T>
struct OptimizerStep {
  OptimizerKind kind;
  T lr, weight_decay;
  // Adam
  T beta2, eps, step_size, bias_correction2_sqrt;
  T lerp_weight;         // 1 - beta1
  T one_minus_beta2;     // 1 - beta2
  T decoupled_factor;    // 1 - lr * weight_decay
  bool decoupled_weight_decay;
  // SGD
  T momentum, one_minus_dampening;
  bool nesterov, first_step;
};

// torch.optim.Adam / AdamW (single-tensor path): lerp for the first moment, as torch does.
template <typename T>
FASTDNI_HOST_DEVICE void adam_update(T& param, T& exp_avg, T& exp_avg_sq, T grad, const OptimizerStep<T>& o) {
  if (o.weight_decay != T(0)) {
    if (o.decoupled_weight_decay) {
      param = param * o.decoupled_factor;
    } else {
      grad = grad + o.weight_decay * param;
    }
  }
  const T weight = o.lerp_weight;
  exp_avg = weight < T(0.5) ? exp_avg + weight * (grad - exp_avg) : grad - (grad - exp_avg) * (T(1) - weight);
  exp_avg_sq = exp_avg_sq * o.beta2 + o.one_minus_beta2 * grad * grad;
  const T denom = std::sqrt(exp_avg_sq) / o.bias_correction2_sqrt + o.eps;
  param = param - o.step_size * (exp_avg / denom);
}

// torch.optim.SGD; `buffer` is null when momentum == 0.
template <typename T>
FASTDNI_HOST_DEVICE void sgd_update(T& param, T* buffer, T grad, const OptimizerStep<T>& o) {
  if (o.weight_decay != T(0)) grad = grad + o.weight_decay * param;
  if (buffer != nullptr) {
    T buf = o.first_step ? grad : *buffer * o.momentum + o.one_minus_dampening * grad;
    *buffer = buf;
    grad = o.nesterov ? grad + o.momentum * buf : buf;
  }
  param = param - o.lr * grad;
}

// param, its state (Adam: exp_avg, exp_avg_sq; SGD: momentum buffer or none) and its gradient, at one index.
template <typename T>
FASTDNI_HOST_DEVICE void optimizer_update(T& param, T* state0, T* state1, T grad, const OptimizerStep<T>& o) {
  if (o.kind == OptimizerKind::kAdam) {
    adam_update(param, *state0, *state1, grad, o);
  } else {
    sgd_update(param, state0, grad, o);
  }
}

}  // namespace fastdni
