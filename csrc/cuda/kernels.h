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

// The SG regression's error pass: grad[i] = factor * (prediction[i] - scale * target[i]) (unless grad is null:
// a linear SG's step forms it as it loads it) and *loss = loss_scale * sum(e^2), reduced deterministically (warp shuffles, per-block partials summed in a fixed
// order by the last block to finish). `workspace` holds error_loss_workspace_floats(n) floats followed by an
// unsigned arrival counter that must be zero on entry (the last block resets it).
int64_t error_loss_workspace_floats(int64_t n);
template <typename T>
cudaError_t launch_error_loss(const T* prediction, const T* target, T* grad, int64_t n, float scale, float factor, float loss_scale,
                              T* loss, float* workspace, cudaStream_t stream);

// param [rows, cols] stepped in place on G^T X (G [batch, rows], X [batch, cols]), and bias [rows] (if given)
// on the column sums of G, the gradients never leaving registers (docs/performance.md: why hand-written).
template <typename T>
cudaError_t launch_grad_step(GradSource<T> grad, InputSource<T> input, int64_t batch, int64_t rows, int64_t cols, ParamSlot<T> param,
                             ParamSlot<T> bias, const OptimizerStep<float>& o, cudaStream_t stream);

}  // namespace fastdni::cuda
