// CUTLASS compile probe, not part of the build: the weight-gradient GEMM of a DNI step, dW = G^T X
// (G [batch, rows] and X [batch, cols] row-major, bf16; fp32 accumulation), as CUTLASS 2.x's Ampere tensor-op GEMM
// (also runs on sm_90). It answers whether the nvidia-cutlass wheel's headers build with this toolchain (nvcc,
// torch's C++ standard) and what one instantiation costs to compile on the CI machine; scripts/cutlass_probe.sh
// times it and docs/performance.md records the result.
#include <cutlass/bfloat16.h>
#include <cutlass/gemm/device/gemm.h>

#include <cstdio>

using WeightGradGemm = cutlass::gemm::device::Gemm<cutlass::bfloat16_t, cutlass::layout::ColumnMajor,  // G^T [rows, batch]
                                                   cutlass::bfloat16_t, cutlass::layout::RowMajor,     // X [batch, cols]
                                                   float, cutlass::layout::RowMajor,                   // dW [rows, cols]
                                                   float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80>;

// Launches dW = G^T X on the default stream; returns CUTLASS's status as an int (0: success).
int weight_grad(const cutlass::bfloat16_t* g, const cutlass::bfloat16_t* x, float* dw, int batch, int rows, int cols) {
  WeightGradGemm gemm;
  const WeightGradGemm::Arguments args({rows, cols, batch}, {g, rows}, {x, cols}, {dw, cols}, {dw, cols}, {1.f, 0.f});
  const cutlass::Status status = gemm(args);
  if (status != cutlass::Status::kSuccess) std::fprintf(stderr, "weight_grad: %s\n", cutlassGetStatusString(status));
  return static_cast<int>(status);
}
