// batch_norm_act and batch_norm_act_update_ on CPU: the BatchNorm step between a layer's GEMM and its SG.
// Forward: the per-feature mean and (biased) variance in one Welford pass (ATen's var_mean), then one pass
// writing xhat and h = act(gamma xhat + beta). Update: per strip of columns, one pass forms
// dy = prediction / grad_scale * act'(y), stores it and sums dy and dy * xhat; a second pass over the same
// strip (still in cache) turns dy into dpre in place; then the optimizer steps gamma and beta.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "common/dni_math.h"
#include "common/op_args.h"
#include "cpu/grad_step.h"
#include "cpu/ops.h"

namespace fastdni::cpu {
namespace {

constexpr int64_t kRowGrain = 4096;  // elements per task in the row-parallel forward pass
constexpr int64_t kColumnGrain = 64;  // columns per task in the update: a [B, 64] strip of its operands stays in L2

}  // namespace

BatchNormActResult batch_norm_act(FASTDNI_BATCH_NORM_ACT_PARAMS) {
  const Activation act = parse_activation(activation);
  check_batch_norm_args(pre, weight, bias, running_mean, running_var, momentum, eps);
  const at::Tensor p = pre.contiguous();
  const int64_t rows = p.size(0), cols = p.size(1);
  auto [var, mean] = at::var_mean(p, at::IntArrayRef{0}, /*correction=*/at::Scalar(0), /*keepdim=*/false);
  const at::Tensor invstd = (var + eps).rsqrt_();
  // The running variance takes the unbiased batch variance, as nn.BatchNorm1d.
  const at::Tensor running_mean_out = running_mean * (1.0 - momentum) + mean * momentum;
  const at::Tensor running_var_out = running_var * (1.0 - momentum) + var * (momentum * rows / (rows - 1));
  at::Tensor xhat = at::empty_like(p), h = at::empty_like(p);
  const at::Tensor gamma = weight.contiguous(), beta = bias.contiguous();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "fastdni_batch_norm_act", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = p.data_ptr<scalar_t>();
    const scalar_t* mu = mean.data_ptr<scalar_t>();
    const scalar_t* is = invstd.data_ptr<scalar_t>();
    const scalar_t* g = gamma.data_ptr<scalar_t>();
    const scalar_t* b = beta.data_ptr<scalar_t>();
    scalar_t* xh = xhat.data_ptr<scalar_t>();
    scalar_t* out = h.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kRowGrain / cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t o = r * cols;
        for (int64_t j = 0; j < cols; ++j) {
          const acc_t x = (acc_t(in[o + j]) - acc_t(mu[j])) * acc_t(is[j]);
          xh[o + j] = static_cast<scalar_t>(x);
          out[o + j] = static_cast<scalar_t>(activate(act, acc_t(g[j]) * x + acc_t(b[j])));
        }
      }
    });
  });
  return {h, xhat, invstd, running_mean_out, running_var_out};
}

at::Tensor batch_norm_act_update_(FASTDNI_BATCH_NORM_ACT_UPDATE_PARAMS) {
  const Activation act = parse_activation(activation);
  const auto grouped = check_batch_norm_update_args(h, xhat, invstd, prediction, weight, bias, state, optimizer, hyper, grad_scale);
  const at::Tensor h_c = h.contiguous(), xhat_c = xhat.contiguous(), pred_c = prediction.contiguous();
  const at::Tensor invstd_c = invstd.contiguous();
  const int64_t rows = h.size(0), cols = h.size(1);
  at::Tensor grad_pre = at::empty_like(h_c);
  at::Tensor grad_weight = at::empty_like(weight), grad_bias = at::empty_like(bias);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "fastdni_batch_norm_act_update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* hv = h_c.data_ptr<scalar_t>();
    const scalar_t* xv = xhat_c.data_ptr<scalar_t>();
    const scalar_t* gv = pred_c.data_ptr<scalar_t>();
    const scalar_t* is = invstd_c.data_ptr<scalar_t>();
    const scalar_t* gamma = weight.data_ptr<scalar_t>();
    const scalar_t* beta = bias.data_ptr<scalar_t>();
    scalar_t* d = grad_pre.data_ptr<scalar_t>();
    scalar_t* dgamma = grad_weight.data_ptr<scalar_t>();
    scalar_t* dbeta = grad_bias.data_ptr<scalar_t>();
    const acc_t scale = static_cast<acc_t>(grad_scale);
    const bool with_y = needs_pre(act);  // gelu's act' needs y = gamma xhat + beta, formed again rather than kept
    at::parallel_for(0, cols, kColumnGrain, [&](int64_t c0, int64_t c1) {
      std::vector<acc_t> sum_dy(c1 - c0, acc_t(0)), sum_dyx(c1 - c0, acc_t(0));
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t o = r * cols;
        for (int64_t j = c0; j < c1; ++j) {
          const acc_t x = xv[o + j];
          const acc_t y = with_y ? acc_t(gamma[j]) * x + acc_t(beta[j]) : acc_t(0);
          const acc_t dy = delta_value(act, acc_t(gv[o + j]), acc_t(hv[o + j]), y, scale);
          d[o + j] = static_cast<scalar_t>(dy);
          sum_dy[j - c0] += dy;
          sum_dyx[j - c0] += dy * x;
        }
      }
      std::vector<acc_t> k(c1 - c0), mean_dy(c1 - c0), mean_dyx(c1 - c0);
      for (int64_t j = c0; j < c1; ++j) {
        dbeta[j] = static_cast<scalar_t>(sum_dy[j - c0]);
        dgamma[j] = static_cast<scalar_t>(sum_dyx[j - c0]);
        k[j - c0] = acc_t(gamma[j]) * acc_t(is[j]);  // the pre-update gamma: the step below comes after
        mean_dy[j - c0] = sum_dy[j - c0] / acc_t(rows);
        mean_dyx[j - c0] = sum_dyx[j - c0] / acc_t(rows);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t o = r * cols;
        for (int64_t j = c0; j < c1; ++j) {
          const int64_t i = j - c0;
          d[o + j] = static_cast<scalar_t>(k[i] * (acc_t(d[o + j]) - mean_dy[i] - acc_t(xv[o + j]) * mean_dyx[i]));
        }
      }
    });
  });
  elementwise_step_(grad_weight, weight, grouped[0], optimizer, hyper);
  elementwise_step_(grad_bias, bias, grouped[1], optimizer, hyper);
  return grad_pre;
}

}  // namespace fastdni::cpu
