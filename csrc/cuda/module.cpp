// Registers the CUDA kernels of torch.ops.fastdni; fastdni/ops/_triton.py sees them (fastdni.ops._extension.
// HAS_CUDA_KERNELS) and leaves the CUDA key to them, keeping Triton for backend="triton".
#include <torch/library.h>

#include "cuda/ops.h"

TORCH_LIBRARY_IMPL(fastdni, CUDA, m) {
  m.impl("dni_forward", &fastdni::cuda::dni_forward);
  m.impl("sg_predict", &fastdni::cuda::sg_predict);
  m.impl("dni_update_", &fastdni::cuda::dni_update_);
  m.impl("sg_regression_", &fastdni::cuda::sg_regression_);
}
