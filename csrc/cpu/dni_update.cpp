// dni_update_ on CPU: one pass forms delta = prediction / grad_scale * act'(.) (and, from it, the bias
// gradient); dx = delta W reads the pre-update W; then dW = delta^T x is produced tile by tile, each tile
// consumed by the optimizer while hot, so dW never exists whole.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "common/dni_math.h"
#include "common/op_args.h"
#include "cpu/grad_step.h"
#include "cpu/ops.h"
#include "cpu/vector_loops.h"

namespace fastdni::cpu {

at::Tensor dni_update_(FASTDNI_DNI_UPDATE_PARAMS) {
  const Activation act = parse_activation(activation);
  const auto grouped = check_update_args(x, weight, bias, h, pre, prediction, state, optimizer, hyper, grad_scale, act);
  const int64_t rows = x.size(0), features = weight.size(0);

  const at::Tensor h_c = h.contiguous(), pred_c = prediction.contiguous();
  const at::Tensor pre_c = needs_pre(act) ? pre.contiguous() : h_c;
  at::Tensor delta = at::empty({rows, features}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastdni_delta", [&] {
    const scalar_t* g = pred_c.data_ptr<scalar_t>();
    const scalar_t* hv = h_c.data_ptr<scalar_t>();
    const scalar_t* pv = pre_c.data_ptr<scalar_t>();
    scalar_t* d = delta.data_ptr<scalar_t>();
    const auto scale = static_cast<scalar_t>(grad_scale);
    at::parallel_for(0, delta.numel(), 16384, [&](int64_t begin, int64_t end) {
      delta_loop(g + begin, hv + begin, pv + begin, d + begin, end - begin, act, scale);
    });
  });
  at::Tensor grad_input = need_input_grad ? at::mm(delta, weight) : at::empty({0}, x.options());
  gemm_grad_step_(delta, x, weight, grouped[0], optimizer, hyper);
  elementwise_step_(delta.sum(0), bias, grouped[1], optimizer, hyper);
  return grad_input;
}

}  // namespace fastdni::cpu
