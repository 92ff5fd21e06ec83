// dni_forward on CPU: the layer GEMM with its bias folded in (addmm), the activation as one pass over
// its output, then each SG layer the same way, the cDNI context term joining the first SG layer's pass.
// sg_predict is the SG part alone (the same code), for an activation the SG model sits on.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "common/dni_math.h"
#include "common/op_args.h"
#include "cpu/ops.h"

namespace fastdni::cpu {
namespace {

constexpr int64_t kGrain = 4096;

// act(pre) with ATen's vectorised kernels: in place, or into a new tensor for gelu (whose pre is kept).
at::Tensor activate(const at::Tensor& pre, Activation act) {
  switch (act) {
    case Activation::kRelu: return pre.relu_();
    case Activation::kTanh: return pre.tanh_();
    case Activation::kGelu: return at::gelu(pre);
    case Activation::kLeakyRelu: {
      at::Tensor out = pre;  // the same storage: in place, as relu_ and tanh_
      return at::leaky_relu_(out, kLeakyReluSlope);
    }
    default: return pre;
  }
}

// a[b, :] += U[:, y_b] for labels (the one-hot GEMM as a gather), then relu in the same pass.
void add_label_context_relu_(const at::Tensor& a, const at::Tensor& context_weight, const at::Tensor& labels, bool relu) {
  const at::Tensor y = labels.to(at::kLong).contiguous();
  const at::Tensor u = context_weight.contiguous();
  const int64_t rows = a.size(0), cols = a.size(1), classes = u.size(1);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "fastdni_label_context", [&] {
    scalar_t* out = a.data_ptr<scalar_t>();
    const scalar_t* w = u.data_ptr<scalar_t>();
    const int64_t* label = y.data_ptr<int64_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / cols), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        scalar_t* row = out + b * cols;
        const scalar_t* column = w + label[b];
        for (int64_t j = 0; j < cols; ++j) {
          const scalar_t v = row[j] + column[j * classes];
          row[j] = relu && v < scalar_t(0) ? scalar_t(0) : v;
        }
      }
    });
  });
}

// The SG model M(h, c) layer by layer: (prediction, the hidden activations the regression needs). h may be strided.
SgPredictResult predict(const at::Tensor& h, at::TensorList sg_weights, at::TensorList sg_biases,
                        const std::optional<at::Tensor>& context_weight, const std::optional<at::Tensor>& context) {
  std::vector<at::Tensor> hidden;
  at::Tensor z = h;
  const size_t last = sg_weights.size() - 1;
  for (size_t l = 0; l < sg_weights.size(); ++l) {
    at::Tensor a = at::addmm(sg_biases[l], z, sg_weights[l].t());
    const bool relu = l != last;
    if (l == 0 && context.has_value()) {
      if (at::isFloatingType(context->scalar_type())) {
        a.addmm_(*context, context_weight->t());
        if (relu) a.relu_();
      } else {
        add_label_context_relu_(a, *context_weight, *context, relu);
      }
    } else if (relu) {
      a.relu_();
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

  at::Tensor pre = at::addmm(bias, x, weight.t());
  at::Tensor h = activate(pre, act);
  at::Tensor saved_pre = needs_pre(act) ? pre : at::empty({0}, x.options());
  if (sg_weights.empty()) {
    return {h, saved_pre, at::empty({0}, x.options()), {}};
  }
  auto [prediction, hidden] = predict(h, sg_weights, sg_biases, context_weight, context);
  return {h, saved_pre, prediction, hidden};
}

SgPredictResult sg_predict(FASTDNI_SG_PREDICT_PARAMS) {
  check_predict_args(h, sg_weights, sg_biases, context_weight, context);
  return predict(h, sg_weights, sg_biases, context_weight, context);
}

}  // namespace fastdni::cpu
