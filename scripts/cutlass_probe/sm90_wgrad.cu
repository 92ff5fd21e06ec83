// CUTLASS compile probe, not part of the build: the same weight-gradient GEMM as sm80_wgrad.cu, as CUTLASS 3.x's
// Hopper kernel (TMA loads, wgmma, warp-specialized), the form whose epilogue visitor trees (EVT) could carry an
// optimizer step. Compile-only: scripts/cutlass_probe.sh times it for sm_90a.
#include <cute/tensor.hpp>
#include <cutlass/bfloat16.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>  // tools/util/include

#include <cstdio>

using namespace cute;

using Element = cutlass::bfloat16_t;
using TileShape = Shape<_128, _128, _64>;
using ClusterShape = Shape<_1, _1, _1>;

using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape, cutlass::epilogue::collective::EpilogueTileAuto,
    float, float, float, cutlass::layout::RowMajor, 4, float, cutlass::layout::RowMajor, 4,
    cutlass::epilogue::collective::EpilogueScheduleAuto>::CollectiveOp;

using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cutlass::layout::ColumnMajor, 8, Element, cutlass::layout::RowMajor, 8,
    float, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
    cutlass::gemm::collective::KernelScheduleAuto>::CollectiveOp;

using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
using WeightGradGemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

// Launches dW = G^T X (G [batch, rows], X [batch, cols], dW [rows, cols]); returns CUTLASS's status as an int.
int weight_grad(const Element* g, const Element* x, float* dw, int batch, int rows, int cols) {
  using StrideA = typename WeightGradGemm::GemmKernel::StrideA;
  using StrideB = typename WeightGradGemm::GemmKernel::StrideB;
  using StrideC = typename WeightGradGemm::GemmKernel::StrideC;
  using StrideD = typename WeightGradGemm::GemmKernel::StrideD;
  const auto stride_a = cutlass::make_cute_packed_stride(StrideA{}, make_shape(rows, batch, 1));
  const auto stride_b = cutlass::make_cute_packed_stride(StrideB{}, make_shape(cols, batch, 1));
  const auto stride_c = cutlass::make_cute_packed_stride(StrideC{}, make_shape(rows, cols, 1));
  const auto stride_d = cutlass::make_cute_packed_stride(StrideD{}, make_shape(rows, cols, 1));
  typename WeightGradGemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                          {rows, cols, batch, 1},
                                          {g, stride_a, x, stride_b},
                                          {{1.f, 0.f}, dw, stride_c, dw, stride_d}};
  WeightGradGemm gemm;
  cutlass::Status status = gemm.can_implement(args);
  if (status == cutlass::Status::kSuccess) status = gemm(args);
  if (status != cutlass::Status::kSuccess) std::fprintf(stderr, "weight_grad: %s\n", cutlassGetStatusString(status));
  return static_cast<int>(status);
}
