// The fused weight-gradient step: param [rows, cols] -= update(G^T X), bias [rows] -= update(colsum(G)), with
// G [batch, rows] formed as it is loaded (GradSource: stored, the layer's delta, the SG error, relu-masked)
// and X [batch, cols] dense or one-hot labels. Each block owns one kTile x kTile tile of the parameter: it
// reduces the whole batch for that tile in registers (no split-K, so the in-place update is race-free), then
// steps the tile's parameters and optimizer state; the blocks of the first tile column also step the bias.
// Neither the weight gradient nor the bias gradient is ever written to memory.
//
// A hand-written SIMT GEMM (fp32 FMAs), not cuBLASLt or CUTLASS: cuBLASLt has no epilogue that reads and
// writes further tensors (the parameter and two optimizer moments), and CUTLASS's templates cost minutes per
// instantiation on the 2-core CI machine; docs/performance.md has the trade-off and the tensor-core plan.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/kernels.h"

namespace fastdni::cuda {
namespace {

constexpr int kTile = 64;                           // parameter rows and columns per block
constexpr int kThreadTile = 4;                      // each thread owns 4 x 4 outputs
constexpr int kThreadsPerSide = kTile / kThreadTile;  // 16
constexpr int kThreads = kThreadsPerSide * kThreadsPerSide;  // 256
constexpr int kBatchChunk = 16;                     // batch rows staged in shared memory per step

template <typename T>
__global__ void __launch_bounds__(kThreads) grad_step_kernel(GradSource<T> grad, InputSource<T> input, int64_t batch, int64_t rows,
                                                             int64_t cols, ParamSlot<T> param, ParamSlot<T> bias, OptimizerStep<float> o) {
  // float4-aligned rows, so each thread reads its 4 operands of a batch row in one shared-memory load.
  __shared__ __align__(16) float grad_tile[kBatchChunk][kTile];
  __shared__ __align__(16) float input_tile[kBatchChunk][kTile];
  const int tid = threadIdx.x;
  const int tx = tid % kThreadsPerSide, ty = tid / kThreadsPerSide;
  const int64_t row0 = int64_t{blockIdx.y} * kTile, col0 = int64_t{blockIdx.x} * kTile;
  const bool steps_bias = bias.param != nullptr && blockIdx.x == 0;

  float acc[kThreadTile][kThreadTile] = {};
  float bias_grad = 0.f;  // thread t < kTile: the bias gradient of row row0 + t, summed in batch order
  for (int64_t b0 = 0; b0 < batch; b0 += kBatchChunk) {
    // Consecutive threads load consecutive columns of one batch row: coalesced.
    for (int e = tid; e < kBatchChunk * kTile; e += kThreads) {
      const int b = e / kTile, j = e % kTile;
      const int64_t row = b0 + b, n = row0 + j, k = col0 + j;
      grad_tile[b][j] = row < batch && n < rows ? grad.at(row * rows + n) : 0.f;
      input_tile[b][j] = row < batch && k < cols ? input.at(row, k, cols) : 0.f;
    }
    __syncthreads();
    if (steps_bias && tid < kTile) {
      for (int b = 0; b < kBatchChunk; ++b) bias_grad += grad_tile[b][tid];
    }
#pragma unroll
    for (int b = 0; b < kBatchChunk; ++b) {
      const float4 g = *reinterpret_cast<const float4*>(&grad_tile[b][ty * kThreadTile]);
      const float4 x = *reinterpret_cast<const float4*>(&input_tile[b][tx * kThreadTile]);
      const float gv[kThreadTile] = {g.x, g.y, g.z, g.w};
      const float xv[kThreadTile] = {x.x, x.y, x.z, x.w};
#pragma unroll
      for (int i = 0; i < kThreadTile; ++i) {
#pragma unroll
        for (int j = 0; j < kThreadTile; ++j) acc[i][j] = fmaf(gv[i], xv[j], acc[i][j]);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kThreadTile; ++i) {
    const int64_t n = row0 + ty * kThreadTile + i;
#pragma unroll
    for (int j = 0; j < kThreadTile; ++j) {
      const int64_t k = col0 + tx * kThreadTile + j;
      if (n < rows && k < cols) optimizer_update_stored(param, n * cols + k, acc[i][j], o);
    }
  }
  if (steps_bias && tid < kTile && row0 + tid < rows) optimizer_update_stored(bias, row0 + tid, bias_grad, o);
}

}  // namespace

template <typename T>
cudaError_t launch_grad_step(GradSource<T> grad, InputSource<T> input, int64_t batch, int64_t rows, int64_t cols, ParamSlot<T> param,
                             ParamSlot<T> bias, const OptimizerStep<float>& o, cudaStream_t stream) {
  if (rows == 0 || (cols == 0 && bias.param == nullptr)) return cudaSuccess;
  // At least one column of blocks, so that a parameter with no columns still has its bias stepped.
  const dim3 blocks(static_cast<unsigned>(cols == 0 ? 1 : (cols + kTile - 1) / kTile), static_cast<unsigned>((rows + kTile - 1) / kTile));
  grad_step_kernel<T><<<blocks, kThreads, 0, stream>>>(grad, input, batch, rows, cols, param, bias, o);
  return cudaGetLastError();
}

template cudaError_t launch_grad_step<float>(GradSource<float>, InputSource<float>, int64_t, int64_t, int64_t, ParamSlot<float>,
                                             ParamSlot<float>, const OptimizerStep<float>&, cudaStream_t);
template cudaError_t launch_grad_step<c10::BFloat16>(GradSource<c10::BFloat16>, InputSource<c10::BFloat16>, int64_t, int64_t, int64_t,
                                                     ParamSlot<c10::BFloat16>, ParamSlot<c10::BFloat16>, const OptimizerStep<float>&,
                                                     cudaStream_t);
template cudaError_t launch_grad_step<c10::Half>(GradSource<c10::Half>, InputSource<c10::Half>, int64_t, int64_t, int64_t,
                                                 ParamSlot<c10::Half>, ParamSlot<c10::Half>, const OptimizerStep<float>&, cudaStream_t);

}  // namespace fastdni::cuda
