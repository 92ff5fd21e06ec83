// sg_regression_ on CUDA: layer by layer from the top, cuBLASLt takes the gradient for the layer below with the
// pre-update weight, and the fused grad-step kernel steps the layer's weight and bias (and, at the bottom, cDNI's
// U in the same launch) on gradients that never leave registers. A linear SG's step forms the error's gradient as
// it loads prediction and target and reduces the loss on the way: one launch in all. With hidden layers the
// error's gradient is stored (with the loss, one pass) for the library GEMM; a hidden layer's relu mask is applied
// as the next kernel loads the gradient, or stored in place where a library GEMM must read it. Launches: linear SG
// 1; each hidden layer +2, +1 for the error pass, +1 below the second.
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "common/op_args.h"
#include "cuda/launch.h"
#include "cuda/lt_gemm.h"
#include "cuda/ops.h"

namespace fastdni::cuda {

at::Tensor sg_regression_(FASTDNI_SG_REGRESSION_PARAMS) {
  const RegressionArgs args = check_regression_args(h, sg_hidden, prediction, target, sg_weights, sg_biases, context_weight, context,
                                                    state, optimizer, hyper, loss_weight);
  check_step_dtype("h", h);
  const auto o = parse_optimizer<float>(optimizer, hyper);
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t rows = h.size(0), features = h.size(1);
  const size_t layers = sg_weights.size();
  std::vector<at::Tensor> inputs;
  for (const at::Tensor& input : args.inputs) inputs.push_back(input.contiguous());
  const at::Tensor prediction_c = prediction.contiguous(), target_c = target.contiguous();
  // cDNI's context as the bottom layer's U reads it: dense features, or labels for a one-hot operand.
  at::Tensor context_input, labels;
  if (context.has_value() && at::isFloatingType(context->scalar_type())) {
    context_input = context->contiguous();
  } else if (context.has_value()) {
    labels = labels_int64(*context);
  }

  at::Tensor loss = at::empty({}, h.options());
  // The error's gradient is stored only where a library GEMM (the gradient below the top layer) reads it; a
  // linear SG's step forms it as it loads prediction and target, and sums the loss as it goes.
  const bool store_error = layers > 1;
  at::Tensor grad = store_error ? at::empty({rows, features}, h.options()) : at::Tensor();
  // d loss / d prediction = 2 loss_weight / B * e, loss = loss_weight / B * sum e^2 (an empty batch: NaN, as 0 / 0).
  const double per_row = rows > 0 ? loss_weight / static_cast<double>(rows) : 0.0;
  if (rows == 0) loss.fill_(std::numeric_limits<double>::quiet_NaN());
  const at::Tensor partials = loss_partials(loss, store_error ? error_loss_partials(rows * features) : grad_step_loss_partials(features));
  dispatch_step_dtype(h.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const LossSink<T> sink = rows == 0 ? LossSink<T>{} : loss_sink<T>(loss, per_row, partials);
    if (store_error && rows > 0) {
      check_launch(launch_error_loss<T>(ptr<T>(prediction_c), ptr<T>(target_c), ptr<T>(grad), rows * features,
                                        static_cast<float>(target_scale), static_cast<float>(2.0 * per_row), sink, current_stream()),
                   "error_loss_kernel");
    }
    GradSource<T> source = store_error ? stored_grad<T>(grad)
                                       : GradSource<T>{GradKind::kError, ptr<T>(prediction_c), ptr<T>(target_c), Activation::kIdentity,
                                                       static_cast<float>(2.0 * per_row), static_cast<float>(target_scale)};
    for (size_t l = layers; l-- > 0;) {
      at::Tensor below;
      if (l > 0) {  // with the pre-update weight: launched before the step below rewrites it
        below = at::empty({rows, inputs[l].size(1)}, h.options());
        lt_gemm(grad, sg_weights[l], false, below, LtEpilogue::kNone, {}, 0.f);
      }
      const at::Tensor& w = sg_weights[l];
      const StepTarget<T> layer{dense_input<T>(inputs[l]), w.size(1), slot<T>(w, args.state[2 * l])};
      StepTarget<T> context_target{};  // cDNI's U, stepped beside the bottom layer: it shares that layer's gradient
      if (l == 0 && context_weight.has_value()) {
        context_target = {InputSource<T>{ptr<T>(context_input), ptr<int64_t>(labels)}, context_weight->size(1),
                          slot<T>(*context_weight, args.state.back())};
      }
      const LossSink<T> layer_sink = store_error ? LossSink<T>{} : sink;  // linear SG: the only layer reduces it
      check_launch(launch_grad_step<T>(source, rows, w.size(0), layer, context_target, slot<T>(sg_biases[l], args.state[2 * l + 1]), o,
                                       layer_sink, current_stream()),
                   "grad_step_kernel (SG layer)");
      if (l == 0) break;
      // The gradient through layer l's input relu: 1[z > 0], z = inputs[l]. Formed as it is loaded, unless a
      // library GEMM (the next layer down's `below`) must read it: then stored in place.
      const GradSource<T> masked{GradKind::kReluMasked, ptr<T>(below), ptr<T>(inputs[l]), Activation::kIdentity, 1.f, 0.f};
      if (l > 1) {
        check_launch(launch_store_grad<T>(masked, ptr<T>(below), below.numel(), current_stream()), "store_grad_kernel (relu mask)");
        source = stored_grad<T>(below);
      } else {
        source = masked;
      }
      grad = below;
    }
  });
  return loss;
}

}  // namespace fastdni::cuda
