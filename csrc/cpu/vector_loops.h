// The elementwise passes of the CPU ops over raw arrays: the optimizer step, delta = g * act' / s, the
// regression error, and BatchNorm's forward and backward over a strip of columns. Each is compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (GCC
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

// BatchNorm over a strip of `width` columns of a [rows, *] array with row stride `stride` (every pointer at the
// strip's first column): the per-column mean, biased var and invstd = 1 / sqrt(var + eps), then
// xhat = (pre - mean) invstd and h = act(gamma xhat + beta).
void batch_norm_loop(const float* pre, float* xhat, float* h, const float* gamma, const float* beta, float* mean, float* var,
                     float* invstd, int64_t rows, int64_t stride, int64_t width, float eps, Activation act);
void batch_norm_loop(const double* pre, double* xhat, double* h, const double* gamma, const double* beta, double* mean,
                     double* var, double* invstd, int64_t rows, int64_t stride, int64_t width, double eps, Activation act);

// Its backward on the same strip from dL/dh = prediction / scale: grad_gamma = sum dy xhat, grad_beta = sum dy,
// grad_pre = gamma invstd (dy - grad_beta / rows - xhat grad_gamma / rows), with dy = dL/dh act'(y).
void batch_norm_backward_loop(const float* h, const float* xhat, const float* prediction, const float* gamma, const float* beta,
                              const float* invstd, float* grad_pre, float* grad_gamma, float* grad_beta, int64_t rows,
                              int64_t stride, int64_t width, Activation act, float scale);
void batch_norm_backward_loop(const double* h, const double* xhat, const double* prediction, const double* gamma,
                              const double* beta, const double* invstd, double* grad_pre, double* grad_gamma, double* grad_beta,
                              int64_t rows, int64_t stride, int64_t width, Activation act, double scale);

}  // namespace fastdni::cpu
