// dni_update_ on CUDA: the weight-gradient GEMM with the optimizer step on W and b as its epilogue (one launch,
// grad_step.cu), forming delta = prediction * act' / grad_scale as it loads it. With dx wanted, delta is stored
// once (one pass) for cuBLASLt's dx = delta W, launched before the step that rewrites W (stream order), and the
// step then reads the stored delta. Launches: 1, or 3 with dx.
#include <c10/cuda/CUDAGuard.h>

#include "common/op_args.h"
#include "cuda/launch.h"
#include "cuda/lt_gemm.h"
#include "cuda/ops.h"

namespace fastdni::cuda {

at::Tensor dni_update_(FASTDNI_DNI_UPDATE_PARAMS) {
  const Activation act = parse_activation(activation);
  const auto grouped = check_update_args(x, weight, bias, h, pre, prediction, state, optimizer, hyper, grad_scale, act);
  check_step_dtype("x", x);
  const auto o = parse_optimizer<float>(optimizer, hyper);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), features = weight.size(0), in_features = weight.size(1);
  const at::Tensor x_c = x.contiguous(), prediction_c = prediction.contiguous();
  const at::Tensor derivative_input = needs_pre(act) ? pre.contiguous() : h.contiguous();  // act' reads pre or h

  at::Tensor grad_input = at::empty({0}, x.options());
  dispatch_step_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    GradSource<T> delta{GradKind::kDelta, ptr<T>(prediction_c), ptr<T>(derivative_input), act, static_cast<float>(1.0 / grad_scale),
                        0.f};
    at::Tensor delta_stored;
    if (need_input_grad) {
      delta_stored = at::empty({rows, features}, x.options());
      check_launch(launch_store_grad<T>(delta, ptr<T>(delta_stored), delta_stored.numel(), current_stream()), "store_grad_kernel (delta)");
      grad_input = at::empty({rows, in_features}, x.options());
      lt_gemm(delta_stored, weight, false, grad_input, LtEpilogue::kNone, {}, 0.f);
      delta = stored_grad<T>(delta_stored);
    }
    const StepTarget<T> w{dense_input<T>(x_c), in_features, slot<T>(weight, grouped[0])};
    check_launch(launch_grad_step<T>(delta, rows, features, w, {}, slot<T>(bias, grouped[1]), o, {}, current_stream()),
                 "grad_step_kernel (W, b)");
  });
  return grad_input;
}

}  // namespace fastdni::cuda
