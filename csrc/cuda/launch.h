// Host-side helpers of the CUDA ops beyond csrc/common/step_tensors.h: the current stream, and a failed launch
// turned into an exception that names the kernel.
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include "common/step_tensors.h"
#include "cuda/kernels.h"

namespace fastdni::cuda {

inline void check_launch(cudaError_t error, const char* kernel) {
  TORCH_CHECK(error == cudaSuccess, kernel, " failed: ", cudaGetErrorString(error));
}

inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }

}  // namespace fastdni::cuda
