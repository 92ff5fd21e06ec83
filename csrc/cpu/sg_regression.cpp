// sg_regression_ on CPU: one pass forms the error, the loss and the output gradient; then, layer by
// layer from the top, the gradient for the layer below is taken with the pre-update weight, and the
// weight is stepped on its gradient GEMM tile by tile (gemm_grad_step_).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "common/op_args.h"
#include "cpu/grad_step.h"
#include "cpu/ops.h"
#include "cpu/vector_loops.h"

namespace fastdni::cpu {
namespace {

// g = (2 w / B) (prediction - s target); returns w * sum(e^2) / B, accumulated in double.
at::Tensor error_and_loss(const at::Tensor& prediction, const at::Tensor& target, double target_scale, double loss_weight,
                          at::Tensor& grad) {
  const at::Tensor p = prediction.contiguous(), t = target.contiguous();
  grad = at::empty_like(p);
  const int64_t batch = p.size(0);
  double sum = 0;
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "fastdni_sg_error", [&] {
    const scalar_t* pv = p.data_ptr<scalar_t>();
    const scalar_t* tv = t.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    const auto scale = static_cast<scalar_t>(target_scale);
    const auto factor = static_cast<scalar_t>(2.0 * loss_weight / batch);
    sum = at::parallel_reduce(0, p.numel(), 16384, 0.0, [&](int64_t begin, int64_t end, double acc) {
      return acc + error_loop(pv + begin, tv + begin, g + begin, end - begin, scale, factor);
    }, std::plus<double>());
  });
  return at::scalar_tensor(loss_weight * sum / batch, p.options());
}

// dU[:, y_b] += g[b, :], summed over b in order (deterministic), for label contexts.
at::Tensor label_context_grad(const at::Tensor& grad, const at::Tensor& labels, const at::Tensor& context_weight) {
  const at::Tensor y = labels.to(at::kLong).contiguous();
  at::Tensor out = at::zeros_like(context_weight);
  const int64_t rows = grad.size(0), cols = grad.size(1), classes = out.size(1);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "fastdni_label_context_grad", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const int64_t* label = y.data_ptr<int64_t>();
    scalar_t* du = out.data_ptr<scalar_t>();
    at::parallel_for(0, cols, 64, [&](int64_t begin, int64_t end) {
      for (int64_t b = 0; b < rows; ++b) {
        for (int64_t j = begin; j < end; ++j) du[j * classes + label[b]] += g[b * cols + j];
      }
    });
  });
  return out;
}

}  // namespace

at::Tensor sg_regression_(FASTDNI_SG_REGRESSION_PARAMS) {
  const RegressionArgs args = check_regression_args(h, sg_hidden, prediction, target, sg_weights, sg_biases, context_weight, context,
                                                     state, optimizer, hyper, loss_weight);
  const std::vector<at::Tensor>& inputs = args.inputs;
  const auto& grouped = args.state;
  const size_t layers = sg_weights.size();

  at::Tensor grad;
  at::Tensor loss = error_and_loss(prediction, target, target_scale, loss_weight, grad);
  for (size_t l = layers; l-- > 0;) {
    at::Tensor below;
    if (l > 0) {  // with the pre-update weight, masked by relu'(z) = 1[z > 0]
      below = at::mm(grad, sg_weights[l]);
      below.mul_(inputs[l].gt(0));
    } else if (context_weight.has_value()) {
      if (at::isFloatingType(context->scalar_type())) {
        gemm_grad_step_(grad, *context, *context_weight, grouped.back(), optimizer, hyper);
      } else {
        elementwise_step_(label_context_grad(grad, *context, *context_weight), *context_weight, grouped.back(), optimizer, hyper);
      }
    }
    gemm_grad_step_(grad, inputs[l], sg_weights[l], grouped[2 * l], optimizer, hyper);
    elementwise_step_(grad.sum(0), sg_biases[l], grouped[2 * l + 1], optimizer, hyper);
    grad = below;
  }
  return loss;
}

}  // namespace fastdni::cpu
