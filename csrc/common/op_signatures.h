// The C++ signatures of the torch.ops.fastdni schemas (fastdni/ops/schema.py), as function types: each backend
// declares its kernels with them (csrc/cpu/ops.h, csrc/cuda/ops.h), so the signatures are written once.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

namespace fastdni {

// Each op's parameter list, written once: the function types below and each backend's definitions
// (`DniForwardResult dni_forward(FASTDNI_DNI_FORWARD_PARAMS) { ... }`) take it.
#define FASTDNI_DNI_FORWARD_PARAMS                                                                                      \
  const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::TensorList sg_weights, at::TensorList sg_biases, \
      const std::optional<at::Tensor>& context_weight, const std::optional<at::Tensor>& context, std::string_view activation

#define FASTDNI_SG_PREDICT_PARAMS                                                                                       \
  const at::Tensor& h, at::TensorList sg_weights, at::TensorList sg_biases, const std::optional<at::Tensor>& context_weight, \
      const std::optional<at::Tensor>& context

#define FASTDNI_DNI_UPDATE_PARAMS                                                                                         \
  const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& h, const at::Tensor& pre,     \
      const at::Tensor& prediction, at::TensorList state, std::string_view optimizer, c10::ArrayRef<double> hyper,       \
      double grad_scale, std::string_view activation, bool need_input_grad

#define FASTDNI_SG_REGRESSION_PARAMS                                                                                      \
  const at::Tensor& h, at::TensorList sg_hidden, const at::Tensor& prediction, const at::Tensor& target,                \
      at::TensorList sg_weights, at::TensorList sg_biases, const std::optional<at::Tensor>& context_weight,               \
      const std::optional<at::Tensor>& context, at::TensorList state, std::string_view optimizer,                         \
      c10::ArrayRef<double> hyper, double target_scale, double loss_weight

#define FASTDNI_BATCH_NORM_ACT_PARAMS                                                                                  \
  const at::Tensor& pre, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& running_mean,                 \
      const at::Tensor& running_var, double momentum, double eps, std::string_view activation

#define FASTDNI_BATCH_NORM_ACT_UPDATE_PARAMS                                                                           \
  const at::Tensor& h, const at::Tensor& xhat, const at::Tensor& invstd, const at::Tensor& prediction,                    \
      const at::Tensor& weight, const at::Tensor& bias, at::TensorList state, std::string_view optimizer,                 \
      c10::ArrayRef<double> hyper, double grad_scale, std::string_view activation

// (h, pre, prediction, sg_hidden)
using DniForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>;

// (prediction, sg_hidden)
using SgPredictResult = std::tuple<at::Tensor, std::vector<at::Tensor>>;

// (h, xhat, invstd, running_mean_out, running_var_out)
using BatchNormActResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

using DniForwardFn = DniForwardResult(FASTDNI_DNI_FORWARD_PARAMS);
using SgPredictFn = SgPredictResult(FASTDNI_SG_PREDICT_PARAMS);
using DniUpdateFn = at::Tensor(FASTDNI_DNI_UPDATE_PARAMS);
using SgRegressionFn = at::Tensor(FASTDNI_SG_REGRESSION_PARAMS);
using BatchNormActFn = BatchNormActResult(FASTDNI_BATCH_NORM_ACT_PARAMS);
using BatchNormActUpdateFn = at::Tensor(FASTDNI_BATCH_NORM_ACT_UPDATE_PARAMS);

}  // namespace fastdni
