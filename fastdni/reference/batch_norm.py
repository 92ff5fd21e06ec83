"""BatchNorm (training statistics) then an activation, after a layer's GEMM: forward and backward in explicit formulae.

Shapes: ``pre`` is ``[B, N]`` (the layer's ``x W^T + b``), ``weight`` (gamma), ``bias`` (beta) and the running
statistics ``[N]``. As ``torch.nn.BatchNorm1d`` in training mode:

.. math::
    \\mu = mean_b(pre), \\quad \\sigma^2 = mean_b((pre - \\mu)^2) \\text{ (biased)}, \\quad
    \\hat x = (pre - \\mu) / \\sqrt{\\sigma^2 + \\epsilon}, \\quad y = \\gamma \\hat x + \\beta, \\quad h = act(y)

and the running statistics move by ``momentum`` towards ``\\mu`` and the *unbiased* variance
``\\sigma^2 B / (B - 1)``. Eval mode (running statistics) is a plain composition, no fused step.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .._checks import check_tensor
from ..contract import NEEDS_PRE
from .activations import activate, activation_derivative_from_output, check_activation


class BatchNormForward(NamedTuple):
    h: Tensor  #: ``act(gamma * xhat + beta)``, ``[B, N]``
    xhat: Tensor  #: the normalised ``pre``, ``[B, N]`` (what the backward needs, with ``invstd``)
    invstd: Tensor  #: ``1 / sqrt(var + eps)`` of the batch, ``[N]``
    running_mean: Tensor  #: the updated running mean, ``[N]`` (a new tensor: the op is functional)
    running_var: Tensor  #: the updated running variance (unbiased batch variance), ``[N]``


class BatchNormGrads(NamedTuple):
    pre: Tensor  #: dL/dpre, ``[B, N]``
    weight: Tensor  #: dL/dgamma = sum_b dy * xhat, ``[N]``
    bias: Tensor  #: dL/dbeta = sum_b dy, ``[N]``


def check_batch_stats_rows(name: str, batch: Tensor) -> None:
    """Batch statistics need ``B >= 2``: the unbiased running variance divides by ``B - 1`` (``nn.BatchNorm1d``
    refuses one value per channel in training too). The C++ backend gives the same message (``op_args.h``)."""
    if batch.shape[0] < 2:
        raise ValueError(f"{name}: expected a batch of at least 2 rows (batch statistics), got shape {tuple(batch.shape)}")


def check_batch_norm(pre: Tensor, weight: Tensor, bias: Tensor, *stats: Tensor, name: str = "pre") -> None:
    """``pre [B >= 2, N]`` (called ``name``), and ``weight``, ``bias`` (and the running ``stats``) ``[N]`` like it."""
    check_tensor(name, pre, ndim=2)
    check_batch_stats_rows(name, pre)
    features = pre.shape[1]
    for name, t in zip(("weight", "bias", "running_mean", "running_var"), (weight, bias, *stats)):
        check_tensor(name, t, shape=(features,), like=pre)


def check_momentum_eps(momentum: float, eps: float) -> None:
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum: expected a value in [0, 1], got {momentum!r}")
    if not eps > 0.0:
        raise ValueError(f"eps: expected a positive value, got {eps!r}")


def batch_norm_act_forward(pre: Tensor, weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor,
                           momentum: float, eps: float, activation: str) -> BatchNormForward:
    """Training-mode BatchNorm with batch statistics, then ``act``; returns the new running statistics."""
    check_batch_norm(pre, weight, bias, running_mean, running_var)
    check_momentum_eps(momentum, eps)
    check_activation(activation)
    rows = pre.shape[0]
    mean = pre.mean(0)
    centered = pre - mean
    var = (centered * centered).mean(0)
    invstd = torch.rsqrt(var + eps)
    xhat = centered * invstd
    h = activate(xhat * weight + bias, activation)
    new_mean = running_mean * (1.0 - momentum) + mean * momentum
    new_var = running_var * (1.0 - momentum) + var * (momentum * rows / (rows - 1))
    return BatchNormForward(h, xhat, invstd, new_mean, new_var)


def batch_norm_act_backward(grad_h: Tensor, h: Tensor, xhat: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor,
                            activation: str) -> BatchNormGrads:
    """Gradients through ``act`` and the batch-statistics BatchNorm, from ``grad_h = dL/dh``.

    .. math::
        dy = grad_h \\odot act'(y), \\quad d\\gamma = \\sum_b dy\\,\\hat x, \\quad d\\beta = \\sum_b dy, \\quad
        dpre = \\gamma\\, invstd\\, (dy - d\\beta / B - \\hat x\\, d\\gamma / B)

    ``y = gamma * xhat + beta`` is formed again only where ``act'`` needs it (gelu); ``weight`` and ``bias`` are the
    values the forward used (before any update)."""
    y = xhat * weight + bias if activation in NEEDS_PRE else h.new_empty(0)
    dy = grad_h * activation_derivative_from_output(h, y, activation)
    rows = dy.shape[0]
    grad_bias = dy.sum(0)
    grad_weight = (dy * xhat).sum(0)
    grad_pre = (weight * invstd) * (dy - grad_bias / rows - xhat * (grad_weight / rows))
    return BatchNormGrads(grad_pre, grad_weight, grad_bias)
