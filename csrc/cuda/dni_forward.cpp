// dni_forward on CUDA: the layer GEMM through cuBLASLt with bias (and relu) in its epilogue; tanh and the exact
// (erf) gelu as one pass after a bias epilogue; each SG layer the same way, cDNI's context joining the first:
// a float context as a first GEMM that the layer's GEMM accumulates onto (beta = 1), labels as a column gather.
// Launches: 1 per GEMM, +1 for tanh/gelu, +1 for a label context, +1 for a float context.
// sg_predict is the SG part alone (the same code), for an activation the SG model sits on.
#include <c10/cuda/CUDAGuard.h>

#include "common/op_args.h"
#include "cuda/launch.h"
#include "cuda/lt_gemm.h"
#include "cuda/ops.h"

namespace fastdni::cuda {
namespace {

// The layer's epilogue: relu rides in cuBLASLt's; identity needs none beyond the bias; tanh, gelu and leaky_relu a pass.
at::Tensor activate(const at::Tensor& pre, Activation act) {
  if (act == Activation::kIdentity || act == Activation::kRelu) return pre;
  at::Tensor h = act == Activation::kGelu ? at::empty_like(pre) : pre;  // gelu keeps pre for the update
  dispatch_step_dtype(pre.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    check_launch(launch_activate<T>(ptr<T>(pre), ptr<T>(h), pre.numel(), act, current_stream()), "activate_kernel");
  });
  return h;
}

// The SG model M(h, c) layer by layer on a contiguous h: (prediction, the hidden activations the regression needs).
SgPredictResult predict(const at::Tensor& h, at::TensorList sg_weights, at::TensorList sg_biases,
                        const std::optional<at::Tensor>& context_weight, const std::optional<at::Tensor>& context) {
  const int64_t rows = h.size(0);
  std::vector<at::Tensor> hidden;
  at::Tensor z = h;
  const size_t last = sg_weights.size() - 1;
  for (size_t l = 0; l < sg_weights.size(); ++l) {
    const bool relu = l != last;
    const LtEpilogue epilogue = relu ? LtEpilogue::kReluBias : LtEpilogue::kBias;
    const at::Tensor w = sg_weights[l].contiguous(), b = sg_biases[l].contiguous();
    at::Tensor a = at::empty({rows, w.size(0)}, h.options());
    if (l == 0 && context.has_value() && at::isFloatingType(context->scalar_type())) {
      lt_gemm(context->contiguous(), context_weight->contiguous(), true, a, LtEpilogue::kNone, {}, 0.f);
      lt_gemm(z, w, true, a, epilogue, b, 1.f);  // a = z A^T + c U^T + b, then relu: one epilogue for both terms
    } else if (l == 0 && context.has_value()) {
      lt_gemm(z, w, true, a, LtEpilogue::kBias, b, 0.f);
      const at::Tensor labels = labels_int64(*context), u = context_weight->contiguous();
      dispatch_step_dtype(a.scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        check_launch(launch_label_context<T>(ptr<T>(a), ptr<T>(u), ptr<int64_t>(labels), rows, a.size(1), u.size(1), relu,
                                             current_stream()),
                     "label_context_kernel");
      });
    } else {
      lt_gemm(z, w, true, a, epilogue, b, 0.f);
    }
    if (relu) hidden.push_back(a);
    z = a;
  }
  return {z, hidden};
}

}  // namespace

DniForwardResult dni_forward(FASTDNI_DNI_FORWARD_PARAMS) {
  const Activation act = parse_activation(activation);
  check_forward_args(x, weight, bias, sg_weights, sg_biases, context_weight, context);
  check_step_dtype("x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), features = weight.size(0);

  at::Tensor pre = at::empty({rows, features}, x.options());
  lt_gemm(x.contiguous(), weight.contiguous(), true, pre, act == Activation::kRelu ? LtEpilogue::kReluBias : LtEpilogue::kBias,
          bias.contiguous(), 0.f);
  at::Tensor h = activate(pre, act);
  at::Tensor saved_pre = needs_pre(act) ? pre : at::empty({0}, x.options());
  if (sg_weights.empty()) return {h, saved_pre, at::empty({0}, x.options()), {}};
  auto [prediction, hidden] = predict(h, sg_weights, sg_biases, context_weight, context);
  return {h, saved_pre, prediction, hidden};
}

SgPredictResult sg_predict(FASTDNI_SG_PREDICT_PARAMS) {
  check_predict_args(h, sg_weights, sg_biases, context_weight, context);
  check_step_dtype("h", h);
  const c10::cuda::CUDAGuard guard(h.device());
  return predict(h.contiguous(), sg_weights, sg_biases, context_weight, context);
}

}  // namespace fastdni::cuda
