// The per-element math of the CUDA backend's fused weight-gradient step, shared with its CPU twin
// (tests/cuda_twin.cpp, which runs it on the host so CI checks it against the reference without a GPU):
// how the gradient operand G is formed as it is loaded, how the input operand X is read (a dense tensor
// or cDNI's one-hot labels), and the optimizer step on a parameter stored as fp32, bf16 or fp16 with its
// math in fp32 (loaded, updated, rounded once at the store).
#pragma once

#include <cstdint>

#include "common/dni_math.h"

namespace fastdni {

enum class GradKind : int { kStored = 0, kDelta = 1, kError = 2, kReluMasked = 3 };

// The gradient operand G [batch, features] (row-major) of a weight-gradient GEMM. Formed on the fly from
// tensors the step already has, so that delta and the SG error need not be written to memory. G = scale * raw,
// with `scale` a multiplier and `target_scale` the error's t, as fastdni/kernels/prologue.py's GradSource:
//   stored:      raw = first
//   delta:       raw = first * act'(second)       (first = prediction, second = h, or pre for gelu; scale = 1 / grad_scale)
//   error:       raw = first - target_scale * second          (first = prediction, second = target)
//   relu-masked: raw = first * 1[second > 0]   (the gradient through a hidden SG layer, second = its output)
template <typename T>
struct GradSource {
  GradKind kind;
  const T* first;
  const T* second;
  Activation act;
  float scale;
  float target_scale;

  FASTDNI_HOST_DEVICE float at(int64_t i) const {
    const float a = static_cast<float>(first[i]);
    switch (kind) {
      case GradKind::kDelta: {
        const float b = static_cast<float>(second[i]);  // act' needs h (identity, relu, tanh, leaky_relu) or pre (gelu)
        return a * activation_derivative(act, b, b) * scale;
      }
      case GradKind::kError: return error(i) * scale;
      case GradKind::kReluMasked: return static_cast<float>(second[i]) > 0.f ? a * scale : 0.f;
      default: return a * scale;
    }
  }

  // An error source's raw e = prediction - target_scale * target, before its scale (the SG loss sums e^2).
  FASTDNI_HOST_DEVICE float error(int64_t i) const {
    return sg_error_value(static_cast<float>(first[i]), static_cast<float>(second[i]), target_scale);
  }
};

// The input operand X [batch, cols] of a weight-gradient GEMM: a dense row-major tensor, or onehot(labels)
// (cDNI's label context: dU = G^T onehot(y) without the one-hot matrix ever existing).
template <typename T>
struct InputSource {
  const T* dense;
  const int64_t* labels;

  FASTDNI_HOST_DEVICE float at(int64_t row, int64_t col, int64_t cols) const {
    if (labels != nullptr) return labels[row] == col ? 1.f : 0.f;
    return static_cast<float>(dense[row * cols + col]);
  }
};

// A parameter and its optimizer state (null where the optimizer keeps none), all of one storage type.
template <typename T>
struct ParamSlot {
  T* param;
  T* state0;
  T* state1;
};

// Steps element i of a parameter on its fp32 gradient: the state is read and written in fp32 math and
// rounded once to T at the store, as the Triton backend does.
template <typename T>
FASTDNI_HOST_DEVICE void optimizer_update_stored(const ParamSlot<T>& slot, int64_t i, float grad, const OptimizerStep<float>& o) {
  // One call per case with no pointer chosen at run time: a conditional address of a local would put the
  // state on the GPU thread's stack (local memory) instead of in registers.
  float p = static_cast<float>(slot.param[i]);
  if (o.kind == OptimizerKind::kAdam) {
    float m = static_cast<float>(slot.state0[i]), v = static_cast<float>(slot.state1[i]);
    adam_update(p, m, v, grad, o);
    slot.state0[i] = static_cast<T>(m);
    slot.state1[i] = static_cast<T>(v);
  } else if (slot.state0 != nullptr) {
    float buffer = static_cast<float>(slot.state0[i]);
    sgd_update(p, &buffer, grad, o);
    slot.state0[i] = static_cast<T>(buffer);
  } else {
    sgd_update(p, static_cast<float*>(nullptr), grad, o);
  }
  slot.param[i] = static_cast<T>(p);
}

}  // namespace fastdni
