// The CUDA backend's elementwise kernels: what neither cuBLASLt's epilogues nor the fused grad-step kernel
// cover (exact-erf gelu and tanh after a bias epilogue, cDNI's label gather, a formed gradient stored for a
// library GEMM, the SG error stored with its loss where a library GEMM reads it). Grid-stride loops; math in fp32
// via dni_math.h.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "cuda/grid_sum.cuh"
#include "cuda/kernels.h"

namespace fastdni::cuda {
namespace {

constexpr int kThreads = 256;
// Enough blocks to fill an H100 (132 SMs x 8 resident blocks of 256 threads); beyond it the grid-stride loop.
constexpr int64_t kMaxBlocks = 1056;

int blocks_for(int64_t n) { return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks))); }

template <typename T>
__global__ void activate_kernel(const T* pre, T* h, int64_t n, Activation act) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    h[i] = static_cast<T>(activate(act, static_cast<float>(pre[i])));
  }
}

template <typename T>
__global__ void label_context_kernel(T* a, const T* u, const int64_t* labels, int64_t rows, int64_t cols, int64_t classes, bool relu) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < rows * cols; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t b = i / cols, j = i - b * cols;
    const float v = static_cast<float>(a[i]) + static_cast<float>(u[j * classes + labels[b]]);
    a[i] = static_cast<T>(relu && v < 0.f ? 0.f : v);
  }
}

template <typename T>
__global__ void store_grad_kernel(GradSource<T> grad, T* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = static_cast<T>(grad.at(i));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) error_loss_kernel(const T* prediction, const T* target, T* grad, int64_t n,
                                                              float target_scale, float scale, LossSink<T> loss) {
  float sum = 0.f;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const float e = sg_error_value(static_cast<float>(prediction[i]), static_cast<float>(target[i]), target_scale);
    grad[i] = static_cast<T>(e * scale);
    sum = fmaf(e, e, sum);
  }
  float total = 0.f;
  if (grid_sum<kThreads>(sum, loss.partials, loss.arrivals, blockIdx.x, gridDim.x, total)) *loss.loss = static_cast<T>(loss.scale * total);
}

}  // namespace

template <typename T>
cudaError_t launch_activate(const T* pre, T* h, int64_t n, Activation act, cudaStream_t stream) {
  activate_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(pre, h, n, act);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_label_context(T* a, const T* u, const int64_t* labels, int64_t rows, int64_t cols, int64_t classes, bool relu,
                                 cudaStream_t stream) {
  label_context_kernel<T><<<blocks_for(rows * cols), kThreads, 0, stream>>>(a, u, labels, rows, cols, classes, relu);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_store_grad(GradSource<T> grad, T* out, int64_t n, cudaStream_t stream) {
  store_grad_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(grad, out, n);
  return cudaGetLastError();
}

int64_t error_loss_partials(int64_t n) { return blocks_for(n); }

template <typename T>
cudaError_t launch_error_loss(const T* prediction, const T* target, T* grad, int64_t n, float target_scale, float scale, LossSink<T> loss,
                              cudaStream_t stream) {
  error_loss_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(prediction, target, grad, n, target_scale, scale, loss);
  return cudaGetLastError();
}

#define FASTDNI_INSTANTIATE(T)                                                                                                   \
  template cudaError_t launch_activate<T>(const T*, T*, int64_t, Activation, cudaStream_t);                                     \
  template cudaError_t launch_label_context<T>(T*, const T*, const int64_t*, int64_t, int64_t, int64_t, bool, cudaStream_t);    \
  template cudaError_t launch_store_grad<T>(GradSource<T>, T*, int64_t, cudaStream_t);                                          \
  template cudaError_t launch_error_loss<T>(const T*, const T*, T*, int64_t, float, float, LossSink<T>, cudaStream_t);
FASTDNI_INSTANTIATE(float)
FASTDNI_INSTANTIATE(c10::BFloat16)
FASTDNI_INSTANTIATE(c10::Half)
#undef FASTDNI_INSTANTIATE

}  // namespace fastdni::cuda
