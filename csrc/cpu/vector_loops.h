// The elementwise passes of the CPU ops over raw arrays: the optimizer step, delta = g * act' / s, and the
// regression error. Each is compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (GCC
// function multiversioning), so the extension stays portable and runs at the vector width the CPU has.
// Callers split the range across threads.
#pragma once

#include <cstdint>

#include "common/dni_math.h"

namespace fastdni::cpu {

// param[i], state0[i], state1[i] stepped on grad[i] (state pointers null where the optimizer has none).
void optimizer_loop(float* param, float* state0, float* state1, const float* grad, int64_t n, const OptimizerStep<float>& o);
void optimizer_loop(double* param, double* state0, double* state1, const double* grad, int64_t n, const OptimizerStep<double>& o);

// delta[i] = prediction[i] * act'(h[i], pre[i]) / scale; `pre` is read for gelu only.
void delta_loop(const float* prediction, const float* h, const float* pre, float* delta, int64_t n, Activation act, float scale);
void delta_loop(const double* prediction, const double* h, const double* pre, double* delta, int64_t n, Activation act, double scale);

// e = prediction[i] - scale * target[i]; grad[i] = factor * e; returns sum(e^2) in double.
double error_loop(const float* prediction, const float* target, float* grad, int64_t n, float scale, float factor);
double error_loop(const double* prediction, const double* target, double* grad, int64_t n, double scale, double factor);

}  // namespace fastdni::cpu
