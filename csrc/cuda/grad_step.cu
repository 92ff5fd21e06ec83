// The fused weight-gradient step: param [rows, cols] -= update(G^T X), bias [rows] -= update(colsum(G)), with
// G [batch, rows] formed as it is loaded (GradSource: stored, the layer's delta, the SG error, relu-masked)
// and X [batch, cols] dense or one-hot labels. Each block owns one kTile x kTile tile of the parameter: it
// reduces the whole batch for that tile in registers (no split-K, so the in-place update is race-free), then
// steps the tile's parameters and optimizer state; the blocks of the first tile column also step the bias.
// Neither the weight gradient nor the bias gradient is ever written to memory (the bias gradient is summed in fp32).
// Two things ride in the same launch, each saving one: a second parameter that shares G (cDNI's U beside the SG's
// bottom layer: more block columns), and the SG loss, which the first tile column (together it loads every
// element of G once) reduces from the errors it loads, deterministically (grid_sum.cuh).
//
// A hand-written GEMM, not cuBLASLt or CUTLASS: cuBLASLt has no epilogue that reads and writes further tensors (the
// parameter and two optimizer moments), and neither forms an operand from two tensors as it loads it (the prologue
// that keeps delta and the SG error out of memory); docs/performance.md has the trade-off and the CUTLASS probe.
// The mainloop: bf16 / fp16 operands on tensor cores (WMMA m16n16k16, fp32 accumulators; G is rounded to the
// storage type as it is staged, as the Triton backend's tl.dot does), fp32 on SIMT FMAs (IEEE products, as cuBLAS
// without TF32: the reference tolerances need them).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "cuda/grid_sum.cuh"
#include "cuda/kernels.h"

namespace fastdni::cuda {
namespace {

constexpr int kTile = 64;                           // parameter rows and columns per block
constexpr int kThreadTile = 4;                      // SIMT: each thread accumulates and steps 4 x 4 outputs
constexpr int kThreadsPerSide = kTile / kThreadTile;  // 16
constexpr int kThreads = kThreadsPerSide * kThreadsPerSide;  // 256
constexpr int kBatchChunk = 16;                     // batch rows staged in shared memory per step (one WMMA k-step)

// What one block steps: a kTile x kTile tile of `first` (block columns [0, first_blocks)) or of `second` (the rest),
// copied by value so that the pointers stay in registers. The parameter's pointers are picked only for the epilogue
// (block_param), so that they do not hold registers through the mainloop.
template <typename T>
struct BlockTile {
  InputSource<T> input;
  int64_t cols, row0, col0;
};

template <typename T>
__device__ BlockTile<T> block_tile(const StepTarget<T>& first, const StepTarget<T>& second, unsigned first_blocks) {
  const bool in_second = blockIdx.x >= first_blocks;
  return {in_second ? second.input : first.input, in_second ? second.cols : first.cols, int64_t{blockIdx.y} * kTile,
          int64_t{in_second ? blockIdx.x - first_blocks : blockIdx.x} * kTile};
}

template <typename T>
__device__ ParamSlot<T> block_param(const StepTarget<T>& first, const StepTarget<T>& second, unsigned first_blocks) {
  return blockIdx.x >= first_blocks ? second.param : first.param;
}

// G's element (row, n), 0 outside; with kLoss (an error source) its squared error is added to `squared_errors`.
template <typename T, bool kLoss>
__device__ float load_grad(const GradSource<T>& grad, int64_t row, int64_t n, int64_t batch, int64_t rows, float& squared_errors) {
  if (row >= batch || n >= rows) return 0.f;
  if constexpr (kLoss) {
    const float error = grad.error(row * rows + n);
    squared_errors = fmaf(error, error, squared_errors);
    return error * grad.scale;
  } else {
    return grad.at(row * rows + n);
  }
}

// X's element (row, k) of the block's input operand, 0 outside.
template <typename T>
__device__ float load_input(const BlockTile<T>& tile, int64_t row, int64_t k, int64_t batch) {
  return row < batch && k < tile.cols ? tile.input.at(row, k, tile.cols) : 0.f;
}

// kLoss: the first tile column's blocks together loaded every error once; their sums make the loss.
template <typename T>
__device__ void finish_loss(float squared_errors, const LossSink<T>& loss) {
  float total = 0.f;
  if (blockIdx.x == 0 && grid_sum<kThreads>(squared_errors, loss.partials, loss.arrivals, blockIdx.y, gridDim.y, total)) {
    *loss.loss = static_cast<T>(loss.scale * total);
  }
}

// fp32: SIMT. Each thread accumulates its 4 x 4 outputs in registers from float4 reads of the staged tiles.
template <typename T, bool kLoss>
__global__ void __launch_bounds__(kThreads) grad_step_kernel(GradSource<T> grad, int64_t batch, int64_t rows, StepTarget<T> first,
                                                             StepTarget<T> second, unsigned first_blocks, ParamSlot<T> bias,
                                                             OptimizerStep<float> o, LossSink<T> loss) {
  // float4-aligned rows, so each thread reads its 4 operands of a batch row in one shared-memory load.
  __shared__ __align__(16) float grad_tile[kBatchChunk][kTile];
  __shared__ __align__(16) float input_tile[kBatchChunk][kTile];
  const int tid = threadIdx.x;
  const int tx = tid % kThreadsPerSide, ty = tid / kThreadsPerSide;
  const BlockTile<T> tile = block_tile(first, second, first_blocks);
  const bool steps_bias = bias.param != nullptr && blockIdx.x == 0;

  float acc[kThreadTile][kThreadTile] = {};
  float bias_grad = 0.f;  // thread t < kTile: the bias gradient of row row0 + t, summed in batch order
  float squared_errors = 0.f;  // kLoss: this thread's share of sum(e^2) over the elements it loads
  for (int64_t b0 = 0; b0 < batch; b0 += kBatchChunk) {
    // Consecutive threads load consecutive columns of one batch row: coalesced.
    for (int e = tid; e < kBatchChunk * kTile; e += kThreads) {
      const int b = e / kTile, j = e % kTile;
      const int64_t row = b0 + b;
      grad_tile[b][j] = load_grad<T, kLoss>(grad, row, tile.row0 + j, batch, rows, squared_errors);
      input_tile[b][j] = load_input(tile, row, tile.col0 + j, batch);
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

  const ParamSlot<T> param = block_param(first, second, first_blocks);
#pragma unroll
  for (int i = 0; i < kThreadTile; ++i) {
    const int64_t n = tile.row0 + ty * kThreadTile + i;
#pragma unroll
    for (int j = 0; j < kThreadTile; ++j) {
      const int64_t k = tile.col0 + tx * kThreadTile + j;
      if (n < rows && k < tile.cols) optimizer_update_stored(param, n * tile.cols + k, acc[i][j], o);
    }
  }
  if (steps_bias && tid < kTile && tile.row0 + tid < rows) optimizer_update_stored(bias, tile.row0 + tid, bias_grad, o);
  if constexpr (kLoss) finish_loss(squared_errors, loss);
}

template <typename T>
struct WmmaElement;  // the CUDA type WMMA takes for a storage type
template <>
struct WmmaElement<c10::BFloat16> {
  using type = __nv_bfloat16;
  static __device__ type from(float v) { return __float2bfloat16(v); }
};
template <>
struct WmmaElement<c10::Half> {
  using type = __half;
  static __device__ type from(float v) { return __float2half(v); }
};

constexpr int kWmma = 16;                 // m = n = k of one WMMA
constexpr int kWarpRows = kTile / kWmma;  // 4 warps down the tile's rows, 2 across its columns: 8 warps
constexpr int kWarpCols = kThreads / kWarp / kWarpRows;
constexpr int kFragmentsPerWarp = kTile / kWmma / kWarpCols;  // 2 16 x 16 accumulators per warp
constexpr int kStageLd = kTile + 8;       // staged operand rows, padded 16 bytes (ldm: a multiple of 8 elements)
constexpr int kAccLd = kTile + 4;         // the fp32 accumulator tile's rows, padded 16 bytes
constexpr int kLoadGroups = kThreads / kTile;  // threads t, t + 64, ... load the same column: 4 bias partial sums

// bf16 / fp16: tensor cores. The staged tiles are G^T (column-major A: element (n, b) at [b][n]) and X (row-major
// B: (b, k) at [b][k]); the accumulators go through shared memory (their register layout is the hardware's) to an
// epilogue in which consecutive threads step consecutive parameters.
template <typename T, bool kLoss>
__global__ void __launch_bounds__(kThreads) grad_step_tc_kernel(GradSource<T> grad, int64_t batch, int64_t rows, StepTarget<T> first,
                                                                StepTarget<T> second, unsigned first_blocks, ParamSlot<T> bias,
                                                                OptimizerStep<float> o, LossSink<T> loss) {
  using namespace nvcuda;
  using E = WmmaElement<T>;
  using Element = typename E::type;
  __shared__ __align__(32) Element grad_tile[kBatchChunk][kStageLd];
  __shared__ __align__(32) Element input_tile[kBatchChunk][kStageLd];
  __shared__ __align__(32) float acc_tile[kTile][kAccLd];
  __shared__ float bias_parts[kLoadGroups][kTile];
  const int tid = threadIdx.x;
  // This warp's 16-row band and 32-column half of the tile; unsigned, so that they are a shift and a mask that the
  // compiler recomputes after the mainloop instead of keeping them in a register (or on the stack) through it.
  const unsigned warp = threadIdx.x / kWarp, warp_row = warp % kWarpRows, warp_col = warp / kWarpRows;
  const BlockTile<T> tile = block_tile(first, second, first_blocks);
  const bool steps_bias = bias.param != nullptr && blockIdx.x == 0;

  wmma::fragment<wmma::accumulator, kWmma, kWmma, kWmma, float> acc[kFragmentsPerWarp];
#pragma unroll
  for (int f = 0; f < kFragmentsPerWarp; ++f) wmma::fill_fragment(acc[f], 0.f);
  // The bias gradient from G in fp32, before it is rounded for the tensor cores: this thread always loads column
  // tid % 64, rows tid / 64 + 4 i of each chunk.
  float bias_part = 0.f;
  float squared_errors = 0.f;
  for (int64_t b0 = 0; b0 < batch; b0 += kBatchChunk) {
    for (int e = tid; e < kBatchChunk * kTile; e += kThreads) {
      const int b = e / kTile, j = e % kTile;
      const int64_t row = b0 + b;
      const float g = load_grad<T, kLoss>(grad, row, tile.row0 + j, batch, rows, squared_errors);
      bias_part += g;
      grad_tile[b][j] = E::from(g);
      input_tile[b][j] = E::from(load_input(tile, row, tile.col0 + j, batch));
    }
    __syncthreads();
    wmma::fragment<wmma::matrix_a, kWmma, kWmma, kWmma, Element, wmma::col_major> a;
    wmma::load_matrix_sync(a, &grad_tile[0][warp_row * kWmma], kStageLd);
#pragma unroll
    for (int f = 0; f < kFragmentsPerWarp; ++f) {
      wmma::fragment<wmma::matrix_b, kWmma, kWmma, kWmma, Element, wmma::row_major> x;
      wmma::load_matrix_sync(x, &input_tile[0][(warp_col * kFragmentsPerWarp + f) * kWmma], kStageLd);
      wmma::mma_sync(acc[f], a, x, acc[f]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int f = 0; f < kFragmentsPerWarp; ++f) {
    wmma::store_matrix_sync(&acc_tile[warp_row * kWmma][(warp_col * kFragmentsPerWarp + f) * kWmma], acc[f], kAccLd, wmma::mem_row_major);
  }
  if (steps_bias) bias_parts[tid / kTile][tid % kTile] = bias_part;
  __syncthreads();

  // Consecutive threads step consecutive columns of a row: coalesced parameter and moment traffic.
  const ParamSlot<T> param = block_param(first, second, first_blocks);
  for (int e = tid; e < kTile * kTile; e += kThreads) {
    const int i = e / kTile, j = e % kTile;
    const int64_t n = tile.row0 + i, k = tile.col0 + j;
    if (n < rows && k < tile.cols) optimizer_update_stored(param, n * tile.cols + k, acc_tile[i][j], o);
  }
  if (steps_bias && tid < kTile && tile.row0 + tid < rows) {
    float bias_grad = 0.f;
    for (int p = 0; p < kLoadGroups; ++p) bias_grad += bias_parts[p][tid];  // a fixed order: the same bits every run
    optimizer_update_stored(bias, tile.row0 + tid, bias_grad, o);
  }
  if constexpr (kLoss) finish_loss(squared_errors, loss);
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
  const auto launch = [&](auto kernel) {
    kernel<<<blocks, kThreads, 0, stream>>>(grad, batch, rows, first, second, first_blocks, bias, o, loss);
    return cudaGetLastError();
  };
  if constexpr (std::is_same_v<T, float>) {
    return loss.loss != nullptr ? launch(grad_step_kernel<T, true>) : launch(grad_step_kernel<T, false>);
  } else {
    return loss.loss != nullptr ? launch(grad_step_tc_kernel<T, true>) : launch(grad_step_tc_kernel<T, false>);
  }
}

#define FASTDNI_INSTANTIATE(T)                                                                                                   \
  template cudaError_t launch_grad_step<T>(GradSource<T>, int64_t, int64_t, StepTarget<T>, StepTarget<T>, ParamSlot<T>,        \
                                           const OptimizerStep<float>&, LossSink<T>, cudaStream_t);
FASTDNI_INSTANTIATE(float)
FASTDNI_INSTANTIATE(c10::BFloat16)
FASTDNI_INSTANTIATE(c10::Half)
#undef FASTDNI_INSTANTIATE

}  // namespace fastdni::cuda
