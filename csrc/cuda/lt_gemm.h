// The CUDA backend's library GEMMs, through cuBLASLt: row-major tensors, fp32 accumulation, bias and relu in
// the epilogue. A failed cuBLASLt call raises a c10::Error (a Python RuntimeError) naming the call.
#pragma once

#include <ATen/ATen.h>

namespace fastdni::cuda {

enum class LtEpilogue { kNone, kBias, kReluBias };

// out [M, N] = beta * out + lhs [M, K] @ (rhs_transposed ? rhs[N, K]^T : rhs[K, N]) (+ bias [N]) (then relu),
// all of one dtype (fp32, bf16, fp16), lhs, rhs and out contiguous.
void lt_gemm(const at::Tensor& lhs, const at::Tensor& rhs, bool rhs_transposed, const at::Tensor& out, LtEpilogue epilogue,
             const at::Tensor& bias, float beta);

}  // namespace fastdni::cuda
