// Launchers of the CUDA backend's own kernels (the GEMMs that fit cuBLASLt go through lt_gemm.h). They take
// raw pointers and a stream and return the launch's cudaError_t, so that the .cu files need no ATen headers
// (each .cu is compiled once per target architecture: keeping them light keeps the build short); the
// callers (csrc/cuda/*.cpp) turn a failed launch into a Python exception naming the kernel.
// T: float, c10::BFloat16 or c10::Half; math and accumulation in fp32.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/grad_step_math.h"

namespace fastdni::cuda {

// h[i] = act(pre[i]), n elements (h may be pre: in place).
template <typename T>
cudaError_t launch_activate(const T* pre, T* h, int64_t n, Activation act, cudaStream_t stream);

// a[b, j] += u[j, labels[b]], then relu if asked: cDNI's label context as a column gather of u [cols, classes].
template <typename T>
cudaError_t launch_label_context(T* a, const T* u, const int64_t* labels, int64_t rows, int64_t cols, int64_t classes, bool relu,
                                 cudaStream_t stream);

// out[i] = grad.at(i), n elements: stores a formed gradient where a library GEMM must read it (out may alias grad.first).
template <typename T>
cudaError_t launch_store_grad(GradSource<T> grad, T* out, int64_t n, cudaStream_t stream);

// The SG loss a kernel reduces as it reads the error: *loss = scale * sum(e^2), summed deterministically
// (csrc/cuda/grid_sum.cuh). `loss` null: none wanted. `partials`: as many floats as the launcher's *_loss_partials
// says; `arrivals`: a counter that is zero on entry (arrival_counter(), launch.h) and that the kernel leaves zero.
template <typename T>
struct LossSink {
  T* loss;
  float scale;
  float* partials;
  unsigned* arrivals;
};

// The SG regression's error pass, where a library GEMM must read the error's gradient (an SG with hidden
// layers): grad[i] = scale * (prediction[i] - target_scale * target[i]), and the loss.
int64_t error_loss_partials(int64_t n);
template <typename T>
cudaError_t launch_error_loss(const T* prediction, const T* target, T* grad, int64_t n, float target_scale, float scale, LossSink<T> loss,
                              cudaStream_t stream);

// One parameter of a fused step: param [rows, cols], stepped on G^T X with X [batch, cols] its input operand.
template <typename T>
struct StepTarget {
  InputSource<T> input;
  int64_t cols;
  ParamSlot<T> param;  // param.param null: no such target
};

// first.param (and second.param, if given: cDNI's U, which shares G with the SG's bottom layer) stepped in place on
// G^T X (G [batch, rows]), and bias [rows] (if given) on the column sums of G, in one launch; the gradients never
// leave registers (docs/performance.md: why hand-written). With a loss sink (G must be an error source: a linear
// SG's step), the kernel also reduces the SG loss from the errors it loads.
int64_t grad_step_loss_partials(int64_t rows);
template <typename T>
cudaError_t launch_grad_step(GradSource<T> grad, int64_t batch, int64_t rows, StepTarget<T> first, StepTarget<T> second, ParamSlot<T> bias,
                             const OptimizerStep<float>& o, LossSink<T> loss, cudaStream_t stream);

}  // namespace fastdni::cuda
