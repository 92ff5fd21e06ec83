#include "cpu/fused_step.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "common/dni_math.h"
#include "common/op_args.h"
#include "cpu/vector_loops.h"

namespace fastdni::cpu {
namespace {

// The gradient is produced in tiles of about this many bytes: a tile, and the param and state tiles its
// optimizer step reads and writes, stay within a core's L2 (1-2 MiB on current x86 parts).
constexpr int64_t kTileBytes = 128 * 1024;
// Tiles span at most this many columns, so each tile's GEMM repacks little of `input` (B x cols) per flop.
constexpr int64_t kTileCols = 256;

template <typename T>
T* state_ptr(const std::vector<at::Tensor>& state, size_t i) {
  return state.size() > i ? state[i].data_ptr<T>() : nullptr;
}

template <typename T>
T* offset(T* ptr, int64_t by) {
  return ptr == nullptr ? nullptr : ptr + by;
}

}  // namespace

void gemm_grad_step_(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& param,
                     const std::vector<at::Tensor>& state, std::string_view optimizer, c10::ArrayRef<double> hyper) {
  const int64_t rows = param.size(0), cols = param.size(1);
  const int64_t threads = at::get_num_threads();
  // 2-d tiles (tile_rows x tile_cols) of param, of ~kTileBytes, and at least one per thread.
  const int64_t tile_cols = std::min(cols, kTileCols);
  int64_t tile_rows = std::max<int64_t>(1, kTileBytes / (tile_cols * param.element_size()));
  const int64_t col_tiles = (cols + tile_cols - 1) / tile_cols;
  if (((rows + tile_rows - 1) / tile_rows) * col_tiles < threads) {
    tile_rows = std::max<int64_t>(1, (rows * col_tiles + threads - 1) / threads / col_tiles);
  }
  const int64_t row_tiles = (rows + tile_rows - 1) / tile_rows;
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "fastdni_gemm_grad_step", [&] {
    const auto o = parse_optimizer<scalar_t>(optimizer, hyper);
    scalar_t* p = param.data_ptr<scalar_t>();
    scalar_t* s0 = state_ptr<scalar_t>(state, 0);
    scalar_t* s1 = state_ptr<scalar_t>(state, 1);
    at::parallel_for(0, row_tiles * col_tiles, 1, [&](int64_t begin, int64_t end) {
      // One scratch tile per thread; inside a parallel region the BLAS call runs on this thread alone.
      at::Tensor scratch = at::empty({tile_rows, tile_cols}, param.options());
      for (int64_t t = begin; t < end; ++t) {
        const int64_t row0 = (t / col_tiles) * tile_rows, col0 = (t % col_tiles) * tile_cols;
        const int64_t n = std::min(tile_rows, rows - row0), k = std::min(tile_cols, cols - col0);
        at::Tensor grad = scratch.narrow(0, 0, n).narrow(1, 0, k);
        at::mm_out(grad, grad_out.narrow(1, row0, n).t(), input.narrow(1, col0, k));
        const scalar_t* g = grad.data_ptr<scalar_t>();
        for (int64_t r = 0; r < n; ++r) {  // the tile's rows: contiguous runs of k in param and state
          const int64_t at = (row0 + r) * cols + col0;
          optimizer_loop(p + at, offset(s0, at), offset(s1, at), g + r * grad.stride(0), k, o);
        }
      }
    });
  });
}

void elementwise_step_(const at::Tensor& grad, const at::Tensor& param, const std::vector<at::Tensor>& state,
                       std::string_view optimizer, c10::ArrayRef<double> hyper) {
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "fastdni_elementwise_step", [&] {
    const auto o = parse_optimizer<scalar_t>(optimizer, hyper);
    scalar_t* p = param.data_ptr<scalar_t>();
    scalar_t* s0 = state_ptr<scalar_t>(state, 0);
    scalar_t* s1 = state_ptr<scalar_t>(state, 1);
    const scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, param.numel(), 16384, [&](int64_t begin, int64_t end) {
      optimizer_loop(p + begin, offset(s0, begin), offset(s1, begin), g + begin, end - begin, o);
    });
  });
}

}  // namespace fastdni::cpu
