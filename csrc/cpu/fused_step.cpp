#include "cpu/fused_step.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "common/dni_math.h"
#include "common/op_args.h"

namespace fastdni::cpu {
namespace {

// Bytes of gradient per tile: the tile plus the param and state rows it updates stay within L2.
constexpr int64_t kTileBytes = 64 * 1024;

// One branch on the optimizer per range, not per element, so the loops stay simple enough to vectorise.
template <typename T>
void update_range(T* __restrict param, T* __restrict state0, T* __restrict state1, const T* __restrict grad, int64_t n,
                  const OptimizerStep<T>& step) {
  const OptimizerStep<T> o = step;
  if (o.kind == OptimizerKind::kAdam) {
    for (int64_t i = 0; i < n; ++i) adam_update(param[i], state0[i], state1[i], grad[i], o);
  } else if (state0 != nullptr) {
    for (int64_t i = 0; i < n; ++i) sgd_update(param[i], state0 + i, grad[i], o);
  } else {
    for (int64_t i = 0; i < n; ++i) sgd_update<T>(param[i], nullptr, grad[i], o);
  }
}

template <typename T>
T* state_ptr(const std::vector<at::Tensor>& state, size_t i) {
  return state.size() > i ? state[i].data_ptr<T>() : nullptr;
}

}  // namespace

void gemm_grad_step_(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& param,
                     const std::vector<at::Tensor>& state, std::string_view optimizer, c10::ArrayRef<double> hyper) {
  const int64_t rows = param.size(0), cols = param.size(1);
  const int64_t elem = param.element_size();
  // Tiles of whole rows of param: ~kTileBytes each, and at least one per thread.
  int64_t tile = std::max<int64_t>(8, kTileBytes / std::max<int64_t>(1, cols * elem));
  tile = std::min(tile, std::max<int64_t>(1, (rows + at::get_num_threads() - 1) / at::get_num_threads()));
  const int64_t tiles = (rows + tile - 1) / tile;
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "fastdni_gemm_grad_step", [&] {
    const auto o = parse_optimizer<scalar_t>(optimizer, hyper);
    scalar_t* p = param.data_ptr<scalar_t>();
    scalar_t* s0 = state_ptr<scalar_t>(state, 0);
    scalar_t* s1 = state_ptr<scalar_t>(state, 1);
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      // One scratch tile per thread; inside a parallel region the BLAS call runs on this thread alone.
      at::Tensor scratch = at::empty({tile, cols}, param.options());
      for (int64_t t = begin; t < end; ++t) {
        const int64_t row0 = t * tile, n = std::min(tile, rows - row0);
        at::Tensor grad = scratch.narrow(0, 0, n);
        at::mm_out(grad, grad_out.narrow(1, row0, n).t(), input);
        const int64_t offset = row0 * cols;
        update_range<scalar_t>(p + offset, s0 ? s0 + offset : nullptr, s1 ? s1 + offset : nullptr,
                               grad.data_ptr<scalar_t>(), n * cols, o);
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
      update_range<scalar_t>(p + begin, s0 ? s0 + begin : nullptr, s1 ? s1 + begin : nullptr, g + begin, end - begin, o);
    });
  });
}

}  // namespace fastdni::cpu
