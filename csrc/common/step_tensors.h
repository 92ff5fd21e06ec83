// From tensors to the raw views the fused grad-step math takes (csrc/common/grad_step_math.h), for the CUDA
// backend's host code and its CPU twin: the storage-type switch (fp32, bf16, fp16), pointers, optimizer slots.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <vector>

#include "common/grad_step_math.h"

namespace fastdni {

// The storage types the fused kernels are instantiated for; checked before any launch.
inline void check_step_dtype(const char* name, const at::Tensor& t) {
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, name,
              ": the CUDA backend takes float32, bfloat16 or float16 tensors, got ", s);
}

// f(T{}) with T the storage type of dtype (one check_step_dtype accepted).
template <typename F>
void dispatch_step_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: return f(float{});
  }
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

// A parameter with its optimizer state (0, 1 or 2 tensors, as split_state groups them).
template <typename T>
ParamSlot<T> slot(const at::Tensor& param, const std::vector<at::Tensor>& state) {
  return {ptr<T>(param), state.size() > 0 ? ptr<T>(state[0]) : nullptr, state.size() > 1 ? ptr<T>(state[1]) : nullptr};
}

template <typename T>
GradSource<T> stored_grad(const at::Tensor& g) {
  return {GradKind::kStored, ptr<T>(g), nullptr, Activation::kIdentity, 1.f, 0.f};
}

template <typename T>
InputSource<T> dense_input(const at::Tensor& x) {
  return {ptr<T>(x), nullptr};
}

// cDNI labels as the kernels read them: int64, contiguous.
inline at::Tensor labels_int64(const at::Tensor& labels) { return labels.to(at::kLong).contiguous(); }

}  // namespace fastdni
