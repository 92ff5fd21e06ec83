// CPU twin of the CUDA backend's fused grad-step kernel (csrc/cuda/grad_step.cu): the same per-element math,
// from the same header (csrc/common/grad_step_math.h: the gradient formed as it is loaded, the one-hot label
// operand, the fp32 optimizer step on fp32/bf16/fp16 storage), run on the host in the kernel's order (each
// output's batch sum in row order; bf16/fp16 with G rounded as the tensor-core kernel stages it). CI has no GPU:
// tests/ops/test_cuda_twin.py checks this math against the reference through torch.ops.fastdni_twin.grad_step_.
// Test-only, not in the shipped extension: the test compiles it (torch.utils.cpp_extension.load).
#include <torch/library.h>

#include <string_view>
#include <type_traits>

#include "common/op_args.h"
#include "common/step_tensors.h"

namespace fastdni::twin {
namespace {

GradKind parse_grad_kind(std::string_view kind) {
  if (kind == "stored") return GradKind::kStored;
  if (kind == "delta") return GradKind::kDelta;
  if (kind == "error") return GradKind::kError;
  if (kind == "relu_masked") return GradKind::kReluMasked;
  TORCH_CHECK(false, "kind: expected one of stored, delta, error, relu_masked, got '", kind, "'");
}

// G's element as the kernel multiplies it: bf16 / fp16 steps run on tensor cores (grad_step_tc_kernel), which stage G
// rounded to the storage type; fp32 keeps it (the bias gradient always sums it unrounded).
template <typename T>
float operand(float g) {
  if constexpr (std::is_same_v<T, float>) {
    return g;
  } else {
    return static_cast<float>(static_cast<T>(g));
  }
}

template <typename T>
void grad_step(const GradSource<T>& grad, const InputSource<T>& input, int64_t batch, int64_t rows, int64_t cols, const ParamSlot<T>& param,
               const ParamSlot<T>& bias, const OptimizerStep<float>& o) {
  for (int64_t n = 0; n < rows; ++n) {
    for (int64_t k = 0; k < cols; ++k) {
      float acc = 0.f;
      for (int64_t b = 0; b < batch; ++b) acc = std::fma(operand<T>(grad.at(b * rows + n)), input.at(b, k, cols), acc);
      optimizer_update_stored(param, n * cols + k, acc, o);
    }
    if (bias.param != nullptr) {
      float sum = 0.f;
      for (int64_t b = 0; b < batch; ++b) sum += grad.at(b * rows + n);
      optimizer_update_stored(bias, n, sum, o);
    }
  }
}

// param [rows, cols] -= update(G^T X), bias -= update(colsum(G)); G [batch, rows] from `first` and `second` as
// `kind` says, X [batch, cols] the dense `input` or onehot(`labels`).
void grad_step_(const at::Tensor& first, const std::optional<at::Tensor>& second, std::string_view kind, std::string_view activation,
                double scale, double target_scale, const std::optional<at::Tensor>& input, const std::optional<at::Tensor>& labels,
                const at::Tensor& param, at::TensorList state, const std::optional<at::Tensor>& bias, at::TensorList bias_state,
                std::string_view optimizer, c10::ArrayRef<double> hyper) {
  const GradKind grad_kind = parse_grad_kind(kind);
  const Activation act = parse_activation(activation);
  check_step_dtype("first", first);
  const int64_t batch = first.size(0), rows = param.size(0), cols = param.size(1);
  check_tensor("first", first, {batch, rows}, param);
  if (grad_kind != GradKind::kStored) {
    TORCH_CHECK(second.has_value(), "second: required by kind '", kind, "'");
    check_tensor("second", *second, {batch, rows}, param);
  }
  TORCH_CHECK(input.has_value() != labels.has_value(), "input, labels: expected exactly one");
  if (input.has_value()) check_tensor("input", *input, {batch, cols}, param);
  const auto o = parse_optimizer<float>(optimizer, hyper);
  const at::Tensor labels64 = labels.has_value() ? labels_int64(*labels) : at::Tensor();
  const auto grouped = split_state(state, {param}, optimizer, hyper);
  dispatch_step_dtype(param.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const at::Tensor first_c = first.contiguous();
    const at::Tensor second_c = second.has_value() ? second->contiguous() : at::Tensor();
    const at::Tensor input_c = input.has_value() ? input->contiguous() : at::Tensor();
    const GradSource<T> grad{grad_kind, ptr<T>(first_c), ptr<T>(second_c), act, static_cast<float>(scale),
                              static_cast<float>(target_scale)};
    ParamSlot<T> bias_slot{};
    if (bias.has_value()) {
      check_tensor("bias", *bias, {rows}, param);
      bias_slot = slot<T>(*bias, split_state(bias_state, {*bias}, optimizer, hyper)[0]);
    }
    grad_step(grad, InputSource<T>{ptr<T>(input_c), ptr<int64_t>(labels64)}, batch, rows, cols, slot<T>(param, grouped[0]), bias_slot, o);
  });
}

}  // namespace
}  // namespace fastdni::twin

TORCH_LIBRARY(fastdni_twin, m) {
  m.def("grad_step_(Tensor first, Tensor? second, str kind, str activation, float scale, float target_scale, Tensor? input, "
        "Tensor? labels, Tensor(a!) param, Tensor(b!)[] state, Tensor(c!)? bias, Tensor(d!)[] bias_state, str optimizer, "
        "float[] hyper) -> ()");
}

TORCH_LIBRARY_IMPL(fastdni_twin, CPU, m) { m.impl("grad_step_", &fastdni::twin::grad_step_); }
