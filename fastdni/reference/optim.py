"""Optimizer update rules, written to match ``torch.optim.SGD`` and ``torch.optim.Adam``/``AdamW``
(single-tensor path, ``maximize=False``) formula for formula; in fp64 they agree to rounding (the tests
hold them to ``rtol=1e-14``: torch fuses some products, e.g. ``addcmul``).

The functions are pure: they return new tensors and never modify their arguments. The fused
backends apply the same formulae in place, in fp32 (or fp64) master precision.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

from torch import Tensor

from .._checks import check_positive, check_tensor


class SGDState(NamedTuple):
    param: Tensor
    momentum_buffer: Optional[Tensor]  #: ``None`` when ``momentum == 0``


class AdamState(NamedTuple):
    param: Tensor
    exp_avg: Tensor  #: first moment ``m``
    exp_avg_sq: Tensor  #: second moment ``v``


def _check_param_grad(param: Tensor, grad: Tensor) -> None:
    check_tensor("param", param)
    check_tensor("grad", grad, shape=tuple(param.shape), like=param)


def sgd_momentum_update(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Optional[Tensor],
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> SGDState:
    """One SGD step; ``momentum_buffer=None`` means the first step.

    .. math::
        g \\leftarrow g + \\lambda p, \\quad
        \\mathrm{buf} \\leftarrow \\begin{cases} g & \\text{first step} \\\\
            \\mu\\,\\mathrm{buf} + (1 - \\tau) g & \\text{otherwise} \\end{cases}, \\quad
        d = g + \\mu\\,\\mathrm{buf} \\text{ (Nesterov) or } \\mathrm{buf}, \\quad
        p \\leftarrow p - \\eta d

    With ``dampening == 0`` a zero-initialised buffer gives the same first step, which is
    what the fused kernels store.
    """
    _check_param_grad(param, grad)
    check_positive("lr", lr, allow_zero=True)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov: requires momentum > 0 and dampening == 0")
    if weight_decay != 0:
        grad = grad + weight_decay * param
    if momentum == 0:
        return SGDState(param - lr * grad, None)
    if momentum_buffer is None:
        buf = grad.clone()
    else:
        check_tensor("momentum_buffer", momentum_buffer, shape=tuple(param.shape), like=param)
        buf = momentum * momentum_buffer + (1 - dampening) * grad
    direction = grad + momentum * buf if nesterov else buf
    return SGDState(param - lr * direction, buf)


def adam_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
) -> AdamState:
    """One Adam step (AdamW with ``decoupled_weight_decay=True``); ``step`` counts from 1.

    .. math::
        g \\leftarrow g + \\lambda p \\text{ (Adam)}, \\quad p \\leftarrow p (1 - \\eta\\lambda) \\text{ (AdamW)}, \\\\
        m \\leftarrow \\beta_1 m + (1 - \\beta_1) g, \\quad
        v \\leftarrow \\beta_2 v + (1 - \\beta_2) g^2, \\\\
        p \\leftarrow p - \\frac{\\eta}{1 - \\beta_1^t} \\cdot
            \\frac{m}{\\sqrt{v} / \\sqrt{1 - \\beta_2^t} + \\epsilon}
    """
    _check_param_grad(param, grad)
    check_tensor("exp_avg", exp_avg, shape=tuple(param.shape), like=param)
    check_tensor("exp_avg_sq", exp_avg_sq, shape=tuple(param.shape), like=param)
    check_positive("lr", lr, allow_zero=True)
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"step: expected an int >= 1 (steps count from 1), got {step!r}")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name}: expected a value in [0, 1), got {beta!r}")
    if weight_decay != 0:
        if decoupled_weight_decay:
            param = param * (1 - lr * weight_decay)
        else:
            grad = grad + weight_decay * param
    exp_avg = exp_avg.lerp(grad, 1 - beta1)
    exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = exp_avg_sq.sqrt() / math.sqrt(bias_correction2) + eps
    return AdamState(param - (lr / bias_correction1) * exp_avg / denom, exp_avg, exp_avg_sq)
