// The fused weight-gradient step: param [rows, cols] -= update(G^T X), bias [rows] -= update(colsum(G)), with
// G [batch, rows] formed as it is loaded (GradSource: stored, the layer's delta, the SG error, relu-masked)
// and X [batch, cols] dense or one-hot labels. Each block owns one kTile x kTile tile of the parameter: it
// reduces the whole batch for that tile in registers (no split-K, so the in-place update is race-free), then
// steps the tile's parameters and optimizer state; the blocks of the first tile column also step the bias.
// Neither the weight gradient nor the bias gradient is ever written to memory.
// Two things ride in the same launch, each saving one: a second parameter that shares G (cDNI's U beside the SG's
// bottom layer: more block columns), and the SG loss, which the first tile column (together it loads every
// element of G once) reduces from the errors it loads, deterministically (grid_sum.cuh).
//
// A hand-written SIMT GEMM (fp32 FMAs), not cuBLASLt or CUTLASS: cuBLASLt has no epilogue that reads and
// writes further tensors (the parameter and two optimizer moments), and CUTLASS's templates cost minutes per
// instantiation on the 2-core CI machine; docs/performance.md has the trade-off and the tensor-core plan.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "cuda/grid_sum.cuh"
#include "cuda/kernels.h"

namespace fastdni::cuda {
namespace {

constexpr int kTile = 64;                           // parameter rows and columns per block
constexpr int kThreadTile = 4;                      // each thread owns 4 x 4 outputs
constexpr int kThreadsPerSide = kTile / kThreadTile;  // 16
constexpr int kThreads = kThreadsPerSide * kThreadsPerSide;  // 256
constexpr int kBatchChunk = 16;                     // batch rows staged in shared memory per step

template <typename T, bool kLoss>
__global__ void __launch_bounds__(kThreads) grad_step_kernel(GradSource<T> grad, int64_t batch, int64_t rows, StepTarget<T> first,
                                                             StepTarget<T> second, unsigned first_blocks, ParamSlot<T> bias,
                                                             OptimizerStep<float> o, LossSink<T> loss) {
  // float4-aligned rows, so each thread reads its 4 operands of a batch row in one shared-memory load.
  __shared__ __align__(16) float grad_tile[kBatchChunk][kTile];
  __shared__ __align__(16) float input_tile[kBatchChunk][kTile];
  const int tid = threadIdx.x;
  const int tx = tid % kThreadsPerSide, ty = tid / kThreadsPerSide;
  // Block columns [0, first_blocks) step `first`, the rest `second`; copied by value (pointers in registers).
  const bool in_second = blockIdx.x >= first_blocks;
  const InputSource<T> input = in_second ? second.input : first.input;
  const ParamSlot<T> param = in_second ? second.param : first.param;
  const int64_t cols = in_second ? second.cols : first.cols;
  const int64_t row0 = int64_t{blockIdx.y} * kTile, col0 = int64_t{in_second ? blockIdx.x - first_blocks : blockIdx.x} * kTile;
  const bool steps_bias = bias.param != nullptr && blockIdx.x == 0;

  float acc[kThreadTile][kThreadTile] = {};
  float bias_grad = 0.f;  // thread t < kTile: the bias gradient of row row0 + t, summed in batch order
  float squared_errors = 0.f;  // kLoss: this thread's share of sum(e^2) over the elements it loads
  for (int64_t b0 = 0; b0 < batch; b0 += kBatchChunk) {
    // Consecutive threads load consecutive columns of one batch row: coalesced.
    for (int e = tid; e < kBatchChunk * kTile; e += kThreads) {
      const int b = e / kTile, j = e % kTile;
      const int64_t row = b0 + b, n = row0 + j, k = col0 + j;
      float g = 0.f;
      if (row < batch && n < rows) {
        if constexpr (kLoss) {
          const float error = grad.error(row * rows + n);
          squared_errors = fmaf(error, error, squared_errors);
          g = error * grad.factor;
        } else {
          g = grad.at(row * rows + n);
        }
      }
      grad_tile[b][j] = g;
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
  if constexpr (kLoss) {
    float total = 0.f;
    if (blockIdx.x == 0 && grid_sum<kThreads>(squared_errors, loss.partials, loss.arrivals, blockIdx.y, gridDim.y, total)) {
      *loss.loss = static_cast<T>(loss.scale * total);
    }
  }
}

unsigned blocks_over(int64_t n) { return static_cast<unsigned>((n + kTile - 1) / kTile); }

}  // namespace

int64_t grad_step_loss_partials(int64_t rows) { return std::max<int64_t>(1, blocks_over(rows)); }

template <typename T>
cudaError_t launch_grad_step(GradSource<T> grad, int64_t batch, int64_t rows, StepTarget<T> first, StepTarget<T> second, ParamSlot<T> bias,
                             const OptimizerStep<float>& o, LossSink<T> loss, cudaStream_t stream) {
  const bool has_second = second.param.param != nullptr;
  if (loss.loss == nullptr && (rows == 0 || (first.cols == 0 && bias.param == nullptr && !has_second))) return cudaSuccess;
  // At least one column of blocks for `first`, so that a parameter with no columns still has its bias stepped
  // (and one row of blocks, so that a loss over no rows is still written: 0).
  const unsigned first_blocks = std::max(1u, blocks_over(first.cols));
  const dim3 blocks(first_blocks + (has_second ? blocks_over(second.cols) : 0u), static_cast<unsigned>(grad_step_loss_partials(rows)));
  if (loss.loss != nullptr) {
    grad_step_kernel<T, true><<<blocks, kThreads, 0, stream>>>(grad, batch, rows, first, second, first_blocks, bias, o, loss);
  } else {
    grad_step_kernel<T, false><<<blocks, kThreads, 0, stream>>>(grad, batch, rows, first, second, first_blocks, bias, o, loss);
  }
  return cudaGetLastError();
}

#define FASTDNI_INSTANTIATE(T)                                                                                                   \
  template cudaError_t launch_grad_step<T>(GradSource<T>, int64_t, int64_t, StepTarget<T>, StepTarget<T>, ParamSlot<T>,        \
                                           const OptimizerStep<float>&, LossSink<T>, cudaStream_t);
FASTDNI_INSTANTIATE(float)
FASTDNI_INSTANTIATE(c10::BFloat16)
FASTDNI_INSTANTIATE(c10::Half)
#undef FASTDNI_INSTANTIATE

}  // namespace fastdni::cuda
