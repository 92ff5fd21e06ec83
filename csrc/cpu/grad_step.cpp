#include "cpu/grad_step.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <unistd.h>

#include <algorithm>

#include "common/dni_math.h"
#include "common/op_args.h"
#include "cpu/vector_loops.h"

namespace fastdni::cpu {
namespace {

// Tiled path: panels of whole rows of the gradient, of about this many bytes, so that a panel and the param
// and state rows its optimizer step streams through stay within a core's L2 (1-2 MiB on current x86 parts).
constexpr int64_t kPanelBytes = 256 * 1024;
// ... used only for batches up to this size: beyond it the GEMM dominates, and one library GEMM over the
// whole gradient runs 5-15% faster than its panels (measured, docs/performance.md), more than the memory
// pass the panels save.
constexpr int64_t kMaxTiledBatch = 128;

// Whether writing the whole gradient would cost a trip to DRAM: with it, param and state (4 arrays) not
// fitting in the last-level cache. Below that the gradient round-trips through cache almost for free.
bool gradient_spills(int64_t numel, int64_t elem) {
  static const int64_t llc = [] {
    const long size = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return size > 0 ? static_cast<int64_t>(size) : int64_t{32} << 20;
  }();
  return 4 * numel * elem > llc;
}

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
  if (input.size(0) > kMaxTiledBatch || !gradient_spills(param.numel(), param.element_size())) {
    elementwise_step_(at::mm(grad_out.t(), input), param, state, optimizer, hyper);
    return;
  }
  const int64_t threads = at::get_num_threads();
  int64_t panel = std::max<int64_t>(1, kPanelBytes / (cols * param.element_size()));
  panel = std::min(panel, (rows + threads - 1) / threads);  // at least one panel per thread
  const int64_t panels = (rows + panel - 1) / panel;
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "fastdni_gemm_grad_step", [&] {
    const auto o = parse_optimizer<scalar_t>(optimizer, hyper);
    scalar_t* p = param.data_ptr<scalar_t>();
    scalar_t* s0 = state_ptr<scalar_t>(state, 0);
    scalar_t* s1 = state_ptr<scalar_t>(state, 1);
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      // One scratch panel per thread; inside a parallel region the BLAS call runs on this thread alone.
      at::Tensor scratch = at::empty({panel, cols}, param.options());
      for (int64_t t = begin; t < end; ++t) {
        const int64_t row0 = t * panel, n = std::min(panel, rows - row0), at = row0 * cols;
        at::Tensor grad = scratch.narrow(0, 0, n);
        at::mm_out(grad, grad_out.narrow(1, row0, n).t(), input);
        optimizer_loop(p + at, offset(s0, at), offset(s1, at), grad.data_ptr<scalar_t>(), n * cols, o);
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
