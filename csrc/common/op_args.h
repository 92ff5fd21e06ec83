// Host-side parsing and checking of the op arguments, shared by every compiled backend: one error
// message per mistake, naming the argument, whichever backend the caller reached.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <vector>

#include "common/dni_math.h"

namespace fastdni {

// The op contract of fastdni/contract.py, mirrored name for name: ACTIVATIONS (parse_activation), NEEDS_PRE
// (needs_pre), check_hyper (parse_optimizer), state_per_param, split_state, check_label_range (check_labels).
inline Activation parse_activation(std::string_view name) {
  if (name == "identity") return Activation::kIdentity;
  if (name == "relu") return Activation::kRelu;
  if (name == "tanh") return Activation::kTanh;
  if (name == "gelu") return Activation::kGelu;
  if (name == "leaky_relu") return Activation::kLeakyRelu;
  TORCH_CHECK(false, "activation: expected one of identity, relu, tanh, gelu, leaky_relu, got '", name, "'");
}

inline bool needs_pre(Activation act) { return act == Activation::kGelu; }

// A 2-d (or 1-d) floating tensor with the given sizes (-1: any), on x's device and of x's dtype.
inline void check_tensor(const char* name, const at::Tensor& t, std::initializer_list<int64_t> sizes, const at::Tensor& like) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK(t.device() == like.device(), name, ": expected device ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, ": expected dtype ", like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == static_cast<int64_t>(sizes.size()), name, ": expected a ", sizes.size(), "-d tensor, got shape ", t.sizes());
  int64_t i = 0;
  for (int64_t want : sizes) {
    TORCH_CHECK(want < 0 || t.size(i) == want, name, ": expected size ", want, " in dim ", i, ", got shape ", t.sizes());
    ++i;
  }
}

// The layer's x [B, K], weight [N, K], bias [N]: the checks every op that takes a layer starts with.
inline void check_layer(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-d tensor, got shape ", x.sizes());
  // A batch of none: a mean over it is 0/0 and an optimizer step on a zero gradient still moves (fastdni/_checks.py).
  TORCH_CHECK(x.size(0) >= 1, "x: expected a batch of at least 1 row, got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x: expected a floating-point tensor, got ", x.scalar_type());
  check_tensor("weight", weight, {-1, x.size(1)}, x);
  check_tensor("bias", bias, {weight.size(0)}, x);
}

// Tensors updated in place must be contiguous: a strided view would need a copy written back.
inline void check_updatable(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor (it is updated in place), got strides ", t.strides());
}

// Integer class labels [rows] in [0, classes): they index memory, so every backend checks them, once per call
// (fastdni/contract.py check_label_range: the same message, and a ValueError in Python, as TORCH_CHECK_VALUE gives).
inline void check_labels(const at::Tensor& labels, int64_t rows, int64_t classes) {
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, "context: labels must be int32 or int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == rows, "context: integer labels must have shape (", rows, "), got ", labels.sizes());
  if (labels.numel() > 0) {  // one transfer of (min, max): one device sync
    const auto [low, high] = at::aminmax(labels);
    const at::Tensor range = at::stack({low, high}).to(at::kCPU, at::kLong);
    const int64_t lo = range[0].item<int64_t>(), hi = range[1].item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < classes, "context: labels must lie in [0, ", classes, "), got values in [", lo, ", ", hi, "]");
  }
}

inline int64_t state_per_param(std::string_view optimizer, c10::ArrayRef<double> hyper) {
  TORCH_CHECK(optimizer == "adam" || optimizer == "sgd", "optimizer: expected 'adam' or 'sgd', got '", optimizer, "'");
  if (optimizer == "adam") return 2;
  return hyper.size() > 1 && hyper[1] != 0.0 ? 1 : 0;
}

// The hyper list layout: fastdni/contract.py HYPER_FIELDS (documented in fastdni/ops/optim.py); the checks those of
// its check_hyper, with the same messages.
template <typename T>
OptimizerStep<T> parse_optimizer(std::string_view optimizer, c10::ArrayRef<double> hyper) {
  OptimizerStep<T> o{};
  if (optimizer == "adam") {
    TORCH_CHECK(hyper.size() == 7, "hyper: expected 7 values (lr, beta1, beta2, eps, weight_decay, decoupled, step) for 'adam', got ", hyper.size());
    const double lr = hyper[0], beta1 = hyper[1], beta2 = hyper[2], step = hyper[6];
    TORCH_CHECK(step >= 1 && std::floor(step) == step, "hyper: Adam's step must be an integer >= 1 (steps count from 1), got ", step);
    TORCH_CHECK(lr >= 0, "hyper: lr must be >= 0, got ", lr);
    o.kind = OptimizerKind::kAdam;
    o.lr = T(lr);
    o.beta2 = T(beta2);
    o.lerp_weight = T(1.0 - beta1);
    o.one_minus_beta2 = T(1.0 - beta2);
    o.eps = T(hyper[3]);
    o.weight_decay = T(hyper[4]);
    o.decoupled_factor = T(1.0 - lr * hyper[4]);
    o.decoupled_weight_decay = hyper[5] != 0.0;
    o.step_size = T(lr / (1.0 - std::pow(beta1, step)));
    o.bias_correction2_sqrt = T(std::sqrt(1.0 - std::pow(beta2, step)));
    return o;
  }
  TORCH_CHECK(optimizer == "sgd", "optimizer: expected 'adam' or 'sgd', got '", optimizer, "'");
  TORCH_CHECK(hyper.size() == 6, "hyper: expected 6 values (lr, momentum, dampening, weight_decay, nesterov, first_step) for 'sgd', got ", hyper.size());
  TORCH_CHECK(hyper[0] >= 0, "hyper: lr must be >= 0, got ", hyper[0]);
  o.kind = OptimizerKind::kSgd;
  o.lr = T(hyper[0]);
  o.momentum = T(hyper[1]);
  o.one_minus_dampening = T(1.0 - hyper[2]);
  o.weight_decay = T(hyper[3]);
  o.nesterov = hyper[4] != 0.0;
  o.first_step = hyper[5] != 0.0;
  return o;
}

// Checks `state` against the parameters it belongs to and returns it grouped per parameter.
inline std::vector<std::vector<at::Tensor>> split_state(at::TensorList state, const std::vector<at::Tensor>& params,
                                                        std::string_view optimizer, c10::ArrayRef<double> hyper) {
  const int64_t per = state_per_param(optimizer, hyper);
  TORCH_CHECK(static_cast<int64_t>(state.size()) == per * static_cast<int64_t>(params.size()), "state: expected ",
              per * params.size(), " tensors for ", params.size(), " parameters with '", optimizer, "', got ", state.size());
  std::vector<std::vector<at::Tensor>> grouped(params.size());
  for (size_t i = 0; i < state.size(); ++i) {
    const at::Tensor& p = params[i / per];
    TORCH_CHECK(state[i].sizes() == p.sizes() && state[i].scalar_type() == p.scalar_type() && state[i].device() == p.device(),
                "state[", i, "]: expected a tensor like its parameter (shape ", p.sizes(), ", ", p.scalar_type(), "), got shape ",
                state[i].sizes(), ", ", state[i].scalar_type());
    check_updatable("state", state[i]);
    grouped[i / per].push_back(state[i]);
  }
  return grouped;
}

// An SG model over [rows, features] inputs shaped like `like`: the layers' shapes (each takes the one below's
// output, the last gives `features`) and the context, all checked before any work (dni_forward, sg_predict).
inline void check_sg_model(const at::Tensor& like, int64_t rows, int64_t features, at::TensorList sg_weights,
                           at::TensorList sg_biases, const std::optional<at::Tensor>& context_weight,
                           const std::optional<at::Tensor>& context) {
  int64_t width = features;
  for (size_t l = 0; l < sg_weights.size(); ++l) {
    const int64_t out = l + 1 == sg_weights.size() ? features : sg_weights[l].size(0);
    check_tensor("sg_weights", sg_weights[l], {out, width}, like);
    check_tensor("sg_biases", sg_biases[l], {out}, like);
    width = out;
  }
  if (!context.has_value()) {
    TORCH_CHECK(!context_weight.has_value(), "context: the SG model has a context_weight, so a context is required");
    return;
  }
  TORCH_CHECK(context_weight.has_value(), "context: given, but the SG model has no context_weight");
  const at::Tensor& u = *context_weight;
  check_tensor("context_weight", u, {sg_weights[0].size(0), -1}, like);
  if (at::isFloatingType(context->scalar_type())) {
    check_tensor("context", *context, {rows, u.size(1)}, like);
  } else {
    check_labels(*context, rows, u.size(1));
  }
}

// dni_forward's arguments: the layer, then its SG model (if any) over h [B, N].
inline void check_forward_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::TensorList sg_weights,
                               at::TensorList sg_biases, const std::optional<at::Tensor>& context_weight,
                               const std::optional<at::Tensor>& context) {
  check_layer(x, weight, bias);
  TORCH_CHECK(sg_weights.size() == sg_biases.size(), "sg_biases: expected one per SG weight (", sg_weights.size(), "), got ",
              sg_biases.size());
  if (sg_weights.empty()) {
    TORCH_CHECK(!context.has_value(), "context: given, but there is no SG model to condition");
    return;
  }
  check_sg_model(x, x.size(0), weight.size(0), sg_weights, sg_biases, context_weight, context);
}

// The SG's input h [B, N] of sg_predict and sg_regression_: 2-d, floating, at least one row.
inline void check_sg_input(const at::Tensor& h) {
  TORCH_CHECK(h.dim() == 2, "h: expected a 2-d tensor, got shape ", h.sizes());
  // A batch of none: a mean over it is 0/0 and an optimizer step on a zero gradient still moves (fastdni/_checks.py).
  TORCH_CHECK(h.size(0) >= 1, "h: expected a batch of at least 1 row, got shape ", h.sizes());
  TORCH_CHECK(at::isFloatingType(h.scalar_type()), "h: expected a floating-point tensor, got ", h.scalar_type());
}

// sg_predict's arguments: h [B, N] and an SG model of at least one layer over it.
inline void check_predict_args(const at::Tensor& h, at::TensorList sg_weights, at::TensorList sg_biases,
                               const std::optional<at::Tensor>& context_weight, const std::optional<at::Tensor>& context) {
  check_sg_input(h);
  TORCH_CHECK(!sg_weights.empty(), "sg_weights: expected at least one SG layer");
  TORCH_CHECK(sg_biases.size() == sg_weights.size(), "sg_biases: expected ", sg_weights.size(), " tensors, got ", sg_biases.size());
  check_sg_model(h, h.size(0), h.size(1), sg_weights, sg_biases, context_weight, context);
}

// What every update op that steps a (weight, bias) pair checks last: both updatable in place, a positive
// grad_scale, the state; returns the state grouped per parameter (weight, bias).
inline std::vector<std::vector<at::Tensor>> check_step_args(const at::Tensor& weight, const at::Tensor& bias, at::TensorList state,
                                                            std::string_view optimizer, c10::ArrayRef<double> hyper,
                                                            double grad_scale) {
  check_updatable("weight", weight);
  check_updatable("bias", bias);
  TORCH_CHECK(grad_scale > 0, "grad_scale: expected a positive value, got ", grad_scale);
  return split_state(state, {weight, bias}, optimizer, hyper);
}

// dni_update_'s arguments; returns the optimizer state grouped per parameter (weight, bias).
inline std::vector<std::vector<at::Tensor>> check_update_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                                              const at::Tensor& h, const at::Tensor& pre, const at::Tensor& prediction,
                                                              at::TensorList state, std::string_view optimizer,
                                                              c10::ArrayRef<double> hyper, double grad_scale, Activation act) {
  check_layer(x, weight, bias);
  const int64_t rows = x.size(0), features = weight.size(0);
  check_tensor("h", h, {rows, features}, x);
  check_tensor("prediction", prediction, {rows, features}, x);
  if (needs_pre(act)) check_tensor("pre", pre, {rows, features}, x);
  return check_step_args(weight, bias, state, optimizer, hyper, grad_scale);
}

// What sg_regression_ works on once its arguments are checked: each SG layer's input (h, then the hidden
// activations) and the optimizer state grouped per parameter (A_0, c_0, A_1, c_1, ..., then U).
struct RegressionArgs {
  std::vector<at::Tensor> inputs;
  std::vector<std::vector<at::Tensor>> state;
};

inline RegressionArgs check_regression_args(const at::Tensor& h, at::TensorList sg_hidden, const at::Tensor& prediction,
                                            const at::Tensor& target, at::TensorList sg_weights, at::TensorList sg_biases,
                                            const std::optional<at::Tensor>& context_weight, const std::optional<at::Tensor>& context,
                                            at::TensorList state, std::string_view optimizer, c10::ArrayRef<double> hyper,
                                            double loss_weight) {
  check_sg_input(h);
  const int64_t rows = h.size(0), features = h.size(1);
  const size_t layers = sg_weights.size();
  TORCH_CHECK(layers >= 1, "sg_weights: expected at least one SG layer");
  TORCH_CHECK(sg_biases.size() == layers, "sg_biases: expected ", layers, " tensors, got ", sg_biases.size());
  TORCH_CHECK(sg_hidden.size() == layers - 1, "sg_hidden: expected ", layers - 1, " tensors, got ", sg_hidden.size());
  TORCH_CHECK(context.has_value() == context_weight.has_value(),
              context.has_value() ? "context: given, but the SG model has no context_weight"
                                  : "context: the SG model has a context_weight, so a context is required");
  check_tensor("prediction", prediction, {rows, features}, h);
  check_tensor("target", target, {rows, features}, h);
  TORCH_CHECK(loss_weight > 0, "loss_weight: expected a positive value, got ", loss_weight);

  std::vector<at::Tensor> params;
  RegressionArgs args{{h}, {}};
  for (size_t l = 0; l < layers; ++l) {
    const int64_t out = l + 1 == layers ? features : sg_weights[l].size(0);
    check_tensor("sg_weights", sg_weights[l], {out, args.inputs.back().size(1)}, h);
    check_tensor("sg_biases", sg_biases[l], {out}, h);
    check_updatable("sg_weights", sg_weights[l]);
    check_updatable("sg_biases", sg_biases[l]);
    params.push_back(sg_weights[l]);
    params.push_back(sg_biases[l]);
    if (l + 1 < layers) {
      check_tensor("sg_hidden", sg_hidden[l], {rows, out}, h);
      args.inputs.push_back(sg_hidden[l]);
    }
  }
  if (context_weight.has_value()) {
    check_tensor("context_weight", *context_weight, {sg_weights[0].size(0), -1}, h);
    check_updatable("context_weight", *context_weight);
    if (at::isFloatingType(context->scalar_type())) {
      check_tensor("context", *context, {rows, context_weight->size(1)}, h);
    } else {
      check_labels(*context, rows, context_weight->size(1));
    }
    params.push_back(*context_weight);
  }
  args.state = split_state(state, params, optimizer, hyper);
  return args;
}

// A BatchNorm's input [B, N] (named `name`) and its per-feature tensors [N]: batch statistics need B >= 2, the
// unbiased running variance dividing by B - 1 (fastdni/reference/batch_norm.py: the same messages).
inline void check_batch_norm_input(const char* name, const at::Tensor& t, std::initializer_list<const at::Tensor*> per_feature,
                                   std::initializer_list<const char*> names) {
  TORCH_CHECK(t.dim() == 2, name, ": expected a 2-d tensor, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.size(0) >= 2, name, ": expected a batch of at least 2 rows (batch statistics), got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, ": expected a floating-point tensor, got ", t.scalar_type());
  auto n = names.begin();
  for (const at::Tensor* p : per_feature) check_tensor(*n++, *p, {t.size(1)}, t);
}

inline void check_batch_norm_args(const at::Tensor& pre, const at::Tensor& weight, const at::Tensor& bias,
                                  const at::Tensor& running_mean, const at::Tensor& running_var, double momentum, double eps) {
  check_batch_norm_input("pre", pre, {&weight, &bias, &running_mean, &running_var}, {"weight", "bias", "running_mean", "running_var"});
  TORCH_CHECK_VALUE(momentum >= 0 && momentum <= 1, "momentum: expected a value in [0, 1], got ", momentum);
  TORCH_CHECK_VALUE(eps > 0, "eps: expected a positive value, got ", eps);
}

// batch_norm_act_update_'s arguments; returns the optimizer state grouped per parameter (weight, bias).
inline std::vector<std::vector<at::Tensor>> check_batch_norm_update_args(
    const at::Tensor& h, const at::Tensor& xhat, const at::Tensor& invstd, const at::Tensor& prediction, const at::Tensor& weight,
    const at::Tensor& bias, at::TensorList state, std::string_view optimizer, c10::ArrayRef<double> hyper, double grad_scale) {
  check_batch_norm_input("h", h, {&weight, &bias, &invstd}, {"weight", "bias", "invstd"});
  check_tensor("xhat", xhat, {h.size(0), h.size(1)}, h);
  check_tensor("prediction", prediction, {h.size(0), h.size(1)}, h);
  return check_step_args(weight, bias, state, optimizer, hyper, grad_scale);
}

}  // namespace fastdni
