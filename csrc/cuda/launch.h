// Host-side helpers of the CUDA ops beyond csrc/common/step_tensors.h: the current stream, a failed launch
// turned into an exception that names the kernel, and the loss reduction's workspace.
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include <map>
#include <mutex>
#include <utility>

#include "common/step_tensors.h"
#include "cuda/kernels.h"

namespace fastdni::cuda {

inline void check_launch(cudaError_t error, const char* kernel) {
  TORCH_CHECK(error == cudaSuccess, kernel, " failed: ", cudaGetErrorString(error));
}

inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }

// The arrival counter of grid_sum (csrc/cuda/grid_sum.cuh) for the current stream: zeroed once, at its first use
// on that stream, and kept for the process (each kernel leaves it zero), so that no launch per call fills one.
// One per stream, since kernels on one stream never overlap. Never freed (a static tensor would be released
// after CUDA's teardown at exit).
inline unsigned* arrival_counter() {
  static std::mutex mutex;
  static auto* counters = new std::map<std::pair<c10::DeviceIndex, cudaStream_t>, at::Tensor>();
  const c10::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();
  const std::lock_guard<std::mutex> lock(mutex);
  auto [it, added] = counters->try_emplace({stream.device_index(), stream.stream()});
  if (added) it->second = at::zeros({1}, at::TensorOptions().device(at::kCUDA, stream.device_index()).dtype(at::kInt));
  return reinterpret_cast<unsigned*>(it->second.data_ptr());
}

// The partials of a loss reduction over `blocks` blocks; the caller keeps the tensor until the kernel is launched.
inline at::Tensor loss_partials(const at::Tensor& loss, int64_t blocks) { return at::empty({blocks}, loss.options().dtype(at::kFloat)); }

// A loss sink (kernels.h): *loss = scale * sum(e^2), reduced in `partials`.
template <typename T>
LossSink<T> loss_sink(const at::Tensor& loss, double scale, const at::Tensor& partials) {
  return {ptr<T>(loss), static_cast<float>(scale), ptr<float>(partials), arrival_counter()};
}

}  // namespace fastdni::cuda
