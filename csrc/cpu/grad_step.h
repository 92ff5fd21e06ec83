// The two primitives every CPU op is built from: a weight update whose gradient is a GEMM, and the same
// update for a gradient already in memory (biases, label-context weights). Where writing the whole weight
// gradient would go to DRAM and the batch is small, the GEMM runs in panels of rows, each consumed by the
// optimizer while it is hot in L2, so the gradient is never written whole; otherwise one library GEMM
// produces it and one vectorised pass steps the optimizer (docs/performance.md has the measurements).
#pragma once

#include <ATen/ATen.h>

#include <string_view>
#include <vector>

namespace fastdni::cpu {

// param[N, K] -= update(grad_out^T @ input) with grad_out [B, N], input [B, K]; state: the optimizer's
// tensors for param (contiguous, like param).
void gemm_grad_step_(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& param,
                     const std::vector<at::Tensor>& state, std::string_view optimizer, c10::ArrayRef<double> hyper);

// param -= update(grad), elementwise; grad contiguous and shaped like param.
void elementwise_step_(const at::Tensor& grad, const at::Tensor& param, const std::vector<at::Tensor>& state,
                       std::string_view optimizer, c10::ArrayRef<double> hyper);

}  // namespace fastdni::cpu
