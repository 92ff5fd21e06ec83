"""Activations of a DNI layer and their derivatives, written out explicitly.

==========  ==========================  ====================================  =====================
name        act(p)                      act'(p)                               act' from the output
==========  ==========================  ====================================  =====================
identity    p                           1                                     1
relu        max(p, 0)                   1[p > 0]                              1[h > 0]
tanh        tanh(p)                     1 - tanh(p)^2                         1 - h^2
gelu        p * Phi(p)  (exact, erf)    Phi(p) + p * phi(p)                   (needs p)
leaky_relu  p if p > 0 else 0.01 p      1 if p > 0 else 0.01                  1 if h > 0 else 0.01
==========  ==========================  ====================================  =====================

with Phi the standard normal CDF and phi its density. A fused forward keeps the output ``h`` and, only
for the activations of :data:`NEEDS_PRE` (gelu), the pre-activation ``p``:
:func:`activation_derivative_from_output` forms ``act'`` from what it kept. The names, their kernel codes
and ``NEEDS_PRE`` are part of the op contract, :mod:`fastdni.contract`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..contract import ACTIVATIONS, LEAKY_RELU_SLOPE, NEEDS_PRE, check_activation

__all__ = ["ACTIVATIONS", "NEEDS_PRE", "check_activation", "activate", "activation_derivative",
           "activation_derivative_from_output"]

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def activate(pre: Tensor, activation: str) -> Tensor:
    """``act(pre)`` for one of :data:`ACTIVATIONS`."""
    check_activation(activation)
    if activation == "identity":
        return pre.clone()
    if activation == "relu":
        return torch.relu(pre)
    if activation == "tanh":
        return torch.tanh(pre)
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(pre, LEAKY_RELU_SLOPE)
    return pre * 0.5 * (1.0 + torch.erf(pre * _INV_SQRT2))


def _positive_or_slope(t: Tensor) -> Tensor:
    """leaky_relu's derivative: 1 where ``t > 0``, else the slope (``pre`` and ``h`` have the same sign)."""
    return torch.full_like(t, LEAKY_RELU_SLOPE).masked_fill_(t > 0, 1.0)


def activation_derivative(pre: Tensor, activation: str) -> Tensor:
    """``act'(pre)`` elementwise, a tensor of the shape of ``pre``."""
    check_activation(activation)
    if activation == "identity":
        return torch.ones_like(pre)
    if activation == "relu":
        return (pre > 0).to(pre.dtype)
    if activation == "tanh":
        return 1.0 - torch.tanh(pre) ** 2
    if activation == "leaky_relu":
        return _positive_or_slope(pre)
    cdf = 0.5 * (1.0 + torch.erf(pre * _INV_SQRT2))
    pdf = torch.exp(-0.5 * pre * pre) * _INV_SQRT_2PI
    return cdf + pre * pdf


def activation_derivative_from_output(h: Tensor, pre: Tensor, activation: str) -> Tensor:
    """``act'(pre)`` from what a fused forward keeps: the output ``h`` alone for identity, relu
    (``1[h > 0]``), tanh (``1 - h^2``) and leaky_relu; gelu needs ``pre`` (:data:`NEEDS_PRE`)."""
    check_activation(activation)
    if activation in NEEDS_PRE:
        return activation_derivative(pre, activation)
    if activation == "identity":
        return torch.ones_like(h)
    if activation == "relu":
        return (h > 0).to(h.dtype)
    if activation == "leaky_relu":
        return _positive_or_slope(h)
    return 1.0 - h * h
