"""The BatchNorm step of a DNI layer on Triton: ``batch_norm_act`` and ``batch_norm_act_update_``.

Both are per-feature reductions over the batch followed by elementwise passes, with no GEMM: one program owns a
block of ``BLOCK_N`` features and walks every row of it in ``BLOCK_M``-row slabs, so each feature's sums are
formed in one program, in row order, in fp32, and its gamma/beta/state elements are stepped by that program alone
(the race-free in-place epilogue of ``grad_step.py``'s bias kernel).

``batch_norm_act`` (3 passes over ``pre``): the mean; the centred squares (two passes, as the CPU kernel and the
reference: one-pass ``E[x^2] - E[x]^2`` loses the variance to cancellation when ``|mean| >> std``); then ``xhat``
and ``h = act(gamma xhat + beta)``. The running statistics (``[N]``) are moved by ATen ops, as on the CPU.

``batch_norm_act_update_`` (2 passes): ``dy = prediction / grad_scale * act'(y)`` with its two per-feature sums
``sum dy`` (dbeta) and ``sum dy xhat`` (dgamma); then ``dpre = gamma invstd (dy - sum dy / B - xhat sum dy xhat / B)``
from the pre-update gamma; then the optimizer steps gamma and beta in the epilogue. ``dy`` is formed again in the
second pass rather than stored.

Parallelism is ``ceil(N / BLOCK_N)`` programs: at the widths of the paper's layers (256-1024 features) a few to a
few dozen, each streaming its ``[B, BLOCK_N]`` strip; these ops move ``3-5 B N`` elements against the layer
GEMM's ``2 B N K`` flops, a small share of a layer step (docs/ops.md, "BatchNorm").
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastdni.contract import split_state, state_per_param
from fastdni.reference.batch_norm import check_batch_norm, check_momentum_eps

from ._checks import check_device, check_float, check_like
from ._launch import record_launch
from ._tiling import INTERPRETED, gemm_configs, pruner
from .grad_step import check_param_step
from .optim import optimizer_epilogue
from .prologue import activation_code, activation_derivative, apply_activation

__all__ = ["batch_norm_act", "batch_norm_act_update_"]

# (BLOCK_N, BLOCK_M, warps): a strip of BLOCK_N features in slabs of BLOCK_M rows, 8 elements per thread in a slab.
# Compiled for sm_80/sm_90 with every flag combination (`python -m fastdni.kernels.aot --all`): 16 per thread
# spilled (the update's gelu + Adam, ragged sizes), and so did BLOCK_M = 16 and 128 x 32 with 8 warps on sm_80
# (8-24 bytes of stack, at 80-96 registers).
_CONFIGS = gemm_configs(("BLOCK_N", "BLOCK_M"), [(32, 32, 2), (64, 32, 4)])
_KEY_FLAGS = ["IS_ADAM", "HAS_WD", "DECOUPLED", "HAS_BUF", "NESTEROV", "FIRST_STEP"]
# Autotuning runs a launch once per config: the update's in-place outputs are restored after each run.
_RESTORE = ["w_ptr", "b_ptr", "sw0_ptr", "sw1_ptr", "sb0_ptr", "sb1_ptr"]


@triton.jit
def _slab_mask(m0, offs_m, mask_n, M):
    """``(rows, mask)`` of the slab of rows from ``m0`` in a strip of features (``mask_n``)."""
    rows = offs_m + m0
    return rows, (rows < M)[:, None] & mask_n[None, :]


@triton.jit
def _load_slab(ptr, rows, offs_n, mask, stride_m, stride_n):
    """The fp32 ``[BLOCK_M, BLOCK_N]`` block of a strided ``[M, N]`` tensor at ``rows`` x ``offs_n``, 0 outside."""
    return tl.load(ptr + rows[:, None] * stride_m + offs_n[None, :] * stride_n, mask=mask, other=0.0).to(tl.float32)


@triton.autotune(configs=_CONFIGS, key=["M", "N", "ACTIVATION"], prune_configs_by=pruner({"BLOCK_N": "N"}, "pre_ptr"))
@triton.jit
def _batch_norm_act_kernel(
    pre_ptr, w_ptr, b_ptr, h_ptr, xhat_ptr, mean_ptr, var_ptr, invstd_ptr,
    M, N,
    stride_pm, stride_pn,
    EPS,
    ACTIVATION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    mask_n = offs_n < N
    # Per-feature sums reduced slab by slab into [BLOCK_N] vectors: one accumulator block fewer per pass than
    # [BLOCK_M, BLOCK_N] partials (which spilled in the update's Adam epilogue, fastdni/kernels/aot.py).
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows, mask = _slab_mask(m0, offs_m, mask_n, M)
        p = _load_slab(pre_ptr, rows, offs_n, mask, stride_pm, stride_pn)
        total += tl.sum(p, axis=0)
    mean = total / M
    squares = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows, mask = _slab_mask(m0, offs_m, mask_n, M)
        p = _load_slab(pre_ptr, rows, offs_n, mask, stride_pm, stride_pn)
        d = tl.where(mask, p - mean[None, :], 0.0)
        squares += tl.sum(d * d, axis=0)
    var = squares / M
    invstd = 1.0 / tl.sqrt_rn(var + EPS)
    gamma = tl.load(w_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    beta = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows, mask = _slab_mask(m0, offs_m, mask_n, M)
        p = _load_slab(pre_ptr, rows, offs_n, mask, stride_pm, stride_pn)
        xhat = (p - mean[None, :]) * invstd[None, :]
        out = rows[:, None] * N + offs_n[None, :]  # xhat and h: new, contiguous [M, N]
        tl.store(xhat_ptr + out, xhat.to(xhat_ptr.dtype.element_ty), mask=mask)
        h = apply_activation(xhat * gamma[None, :] + beta[None, :], ACTIVATION)
        tl.store(h_ptr + out, h.to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + offs_n, mean, mask=mask_n)
    tl.store(var_ptr + offs_n, var, mask=mask_n)
    tl.store(invstd_ptr + offs_n, invstd.to(invstd_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _dy_slab(m0, offs_m, offs_n, mask_n, M, h_ptr, xhat_ptr, pred_ptr, stride_hm, stride_hn, stride_xm, stride_xn,
             stride_pm, stride_pn, gamma, beta, GRAD_SCALE, ACTIVATION: tl.constexpr):
    """``(dy, xhat, rows, mask)`` of the slab of rows from ``m0``, fp32, zero outside the tensor:
    ``prediction / grad_scale * act'``, with ``act'`` from ``h`` (or, for gelu, from ``y = gamma xhat + beta``, formed
    again here)."""
    rows, mask = _slab_mask(m0, offs_m, mask_n, M)
    xhat = _load_slab(xhat_ptr, rows, offs_n, mask, stride_xm, stride_xn)
    pred = _load_slab(pred_ptr, rows, offs_n, mask, stride_pm, stride_pn)
    if ACTIVATION == 3:
        q = xhat * gamma[None, :] + beta[None, :]
    else:
        q = _load_slab(h_ptr, rows, offs_n, mask, stride_hm, stride_hn)
    dy = (pred / GRAD_SCALE) * activation_derivative(q, ACTIVATION)
    return tl.where(mask, dy, 0.0), xhat, rows, mask


@triton.autotune(
    configs=_CONFIGS,
    key=["M", "N", "ACTIVATION"] + _KEY_FLAGS,
    prune_configs_by=pruner({"BLOCK_N": "N"}, "h_ptr"),
    restore_value=None if INTERPRETED else _RESTORE,
)
@triton.jit
def _batch_norm_act_update_kernel(
    h_ptr, xhat_ptr, invstd_ptr, pred_ptr, w_ptr, b_ptr, sw0_ptr, sw1_ptr, sb0_ptr, sb1_ptr, grad_pre_ptr,
    M, N,
    stride_hm, stride_hn, stride_xm, stride_xn, stride_pm, stride_pn, stride_i,
    GRAD_SCALE,
    OPT_LR, OPT_WEIGHT_DECAY, OPT_BETA2, OPT_EPS, OPT_STEP_SIZE, OPT_BC2_SQRT, OPT_LERP_WEIGHT,
    OPT_ONE_MINUS_BETA2, OPT_DECOUPLED_FACTOR, OPT_MOMENTUM, OPT_ONE_MINUS_DAMPENING,
    ACTIVATION: tl.constexpr,
    IS_ADAM: tl.constexpr, HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, HAS_BUF: tl.constexpr,
    NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    mask_n = offs_n < N
    gamma = tl.load(w_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)  # pre-update: dpre and dy (gelu) need it
    beta = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    invstd = tl.load(invstd_ptr + offs_n * stride_i, mask=mask_n, other=0.0).to(tl.float32)
    grad_bias = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum dy
    grad_weight = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum dy xhat
    for m0 in range(0, M, BLOCK_M):
        dy, xhat, _, _ = _dy_slab(m0, offs_m, offs_n, mask_n, M, h_ptr, xhat_ptr, pred_ptr, stride_hm, stride_hn,
                                  stride_xm, stride_xn, stride_pm, stride_pn, gamma, beta, GRAD_SCALE, ACTIVATION)
        grad_bias += tl.sum(dy, axis=0)
        grad_weight += tl.sum(dy * xhat, axis=0)
    scale = gamma * invstd
    mean_dy, mean_dy_xhat = grad_bias / M, grad_weight / M
    for m0 in range(0, M, BLOCK_M):
        dy, xhat, rows, mask = _dy_slab(m0, offs_m, offs_n, mask_n, M, h_ptr, xhat_ptr, pred_ptr, stride_hm, stride_hn,
                                        stride_xm, stride_xn, stride_pm, stride_pn, gamma, beta, GRAD_SCALE, ACTIVATION)
        grad_pre = scale[None, :] * (dy - mean_dy[None, :] - xhat * mean_dy_xhat[None, :])
        tl.store(grad_pre_ptr + rows[:, None] * N + offs_n[None, :], grad_pre.to(grad_pre_ptr.dtype.element_ty), mask=mask)
    for which in tl.static_range(2):  # gamma, then beta (unrolled at compile time)
        if which == 0:
            grad, p_ptr, s0_ptr, s1_ptr = grad_weight, w_ptr, sw0_ptr, sw1_ptr
        else:
            grad, p_ptr, s0_ptr, s1_ptr = grad_bias, b_ptr, sb0_ptr, sb1_ptr
        optimizer_epilogue(grad, p_ptr + offs_n, s0_ptr + offs_n, s1_ptr + offs_n, mask_n,
                           OPT_LR, OPT_WEIGHT_DECAY, OPT_BETA2, OPT_EPS, OPT_STEP_SIZE, OPT_BC2_SQRT, OPT_LERP_WEIGHT,
                           OPT_ONE_MINUS_BETA2, OPT_DECOUPLED_FACTOR, OPT_MOMENTUM, OPT_ONE_MINUS_DAMPENING,
                           IS_ADAM, HAS_WD, DECOUPLED, HAS_BUF, NESTEROV, FIRST_STEP)


# ---------------------------------------------------------------------------------------------------
# Host side: the op contract's checks (the same messages as the reference and the C++ kernels), then launch.

def _grid(N: int):
    return lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)


def _check_input(name: str, t: object) -> Tensor:
    t = check_float(name, t, 2)
    check_device(name, t, INTERPRETED)
    return t


def batch_norm_act(pre: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor, momentum: float,
                   eps: float, activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(h, xhat, invstd, running_mean_out, running_var_out)``, as :func:`fastdni.ops.batch_norm_act`: 1 launch, plus
    the two ATen ops of the running statistics."""
    pre = _check_input("pre", pre)
    check_batch_norm(pre, weight, bias, running_mean, running_var)
    check_momentum_eps(float(momentum), float(eps))
    code = activation_code(activation)
    rows, features = pre.shape
    h, xhat = torch.empty_like(pre, memory_format=torch.contiguous_format), torch.empty_like(pre, memory_format=torch.contiguous_format)
    mean = torch.empty(features, dtype=torch.float32, device=pre.device)
    var = torch.empty_like(mean)
    invstd = torch.empty(features, dtype=pre.dtype, device=pre.device)
    if features:
        record_launch("batch_norm_act")
        _batch_norm_act_kernel[_grid(features)](
            pre, weight.contiguous(), bias.contiguous(), h, xhat, mean, var, invstd, rows, features,
            pre.stride(0), pre.stride(1), float(eps), ACTIVATION=code)
    # The running variance takes the unbiased batch variance, as nn.BatchNorm1d. [N]-sized: ATen's ops (2 launches).
    record_launch("running_stats")
    new_mean = running_mean * (1.0 - momentum) + mean.to(pre.dtype) * momentum
    new_var = running_var * (1.0 - momentum) + var.to(pre.dtype) * (momentum * rows / (rows - 1))
    return h, xhat, invstd, new_mean, new_var


def batch_norm_act_update_(h: Tensor, xhat: Tensor, invstd: Tensor, prediction: Tensor, weight: Tensor, bias: Tensor,
                           state: Sequence[Tensor], optimizer: str, hyper: Sequence[float], grad_scale: float,
                           activation: str) -> Tensor:
    """``dL/dpre``, stepping ``weight`` (gamma) and ``bias`` (beta) in place, as :func:`fastdni.ops.batch_norm_act_update_`:
    1 launch."""
    h = _check_input("h", h)
    check_batch_norm(h, weight, bias, name="h")
    rows, features = h.shape
    for name, t, shape in (("xhat", xhat, (rows, features)), ("prediction", prediction, (rows, features)),
                           ("invstd", invstd, (features,))):
        t = check_float(name, t, len(shape))
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        check_like(name, t, h, "h")
    code = activation_code(activation)
    if not grad_scale > 0:
        raise ValueError(f"grad_scale: expected a positive value, got {grad_scale!r}")
    weight_state, bias_state = split_state(list(state), 2, state_per_param(optimizer, hyper))
    scalars, constexprs, sw0, sw1 = check_param_step("weight", weight, (features,), weight_state, optimizer, hyper, h)
    _, _, sb0, sb1 = check_param_step("bias", bias, (features,), bias_state, optimizer, hyper, h)
    grad_pre = torch.empty((rows, features), dtype=h.dtype, device=h.device)
    if features:
        record_launch("batch_norm_act_update")
        _batch_norm_act_update_kernel[_grid(features)](
            h, xhat, invstd, prediction, weight, bias, sw0, sw1, sb0, sb1, grad_pre, rows, features,
            h.stride(0), h.stride(1), xhat.stride(0), xhat.stride(1), prediction.stride(0), prediction.stride(1),
            invstd.stride(0), float(grad_scale), **scalars, ACTIVATION=code, **constexprs)
    return grad_pre


