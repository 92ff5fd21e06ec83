"""Activations of a DNI layer and their derivatives, written out explicitly.

The fused backends save only what ``act'(pre)`` needs, so the derivative is a
function of the pre-activation ``pre`` alone:

==========  ==========================  ====================================
name        act(p)                      act'(p)
==========  ==========================  ====================================
identity    p                           1
relu        max(p, 0)                   1[p > 0]
tanh        tanh(p)                     1 - tanh(p)^2
gelu        p * Phi(p)  (exact, erf)    Phi(p) + p * phi(p)
==========  ==========================  ====================================

with Phi the standard normal CDF and phi its density.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

ACTIVATIONS = ("identity", "relu", "tanh", "gelu")
NEEDS_PRE = ("gelu",)  #: activations whose derivative cannot be formed from the output alone

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def activate(pre: Tensor, activation: str) -> Tensor:
    """``act(pre)`` for one of :data:`ACTIVATIONS`."""
    check_activation(activation)
    if activation == "identity":
        return pre.clone()
    if activation == "relu":
        return torch.relu(pre)
    if activation == "tanh":
        return torch.tanh(pre)
    return pre * 0.5 * (1.0 + torch.erf(pre * _INV_SQRT2))


def activation_derivative(pre: Tensor, activation: str) -> Tensor:
    """``act'(pre)`` elementwise, a tensor of the shape of ``pre``."""
    check_activation(activation)
    if activation == "identity":
        return torch.ones_like(pre)
    if activation == "relu":
        return (pre > 0).to(pre.dtype)
    if activation == "tanh":
        return 1.0 - torch.tanh(pre) ** 2
    cdf = 0.5 * (1.0 + torch.erf(pre * _INV_SQRT2))
    pdf = torch.exp(-0.5 * pre * pre) * _INV_SQRT_2PI
    return cdf + pre * pdf


def activation_derivative_from_output(h: Tensor, pre: Tensor, activation: str) -> Tensor:
    """``act'(pre)`` from what a fused forward keeps: the output ``h`` alone for identity, relu
    (``1[h > 0]``) and tanh (``1 - h^2``); gelu needs ``pre`` (:data:`NEEDS_PRE`)."""
    check_activation(activation)
    if activation in NEEDS_PRE:
        return activation_derivative(pre, activation)
    if activation == "identity":
        return torch.ones_like(h)
    if activation == "relu":
        return (h > 0).to(h.dtype)
    return 1.0 - h * h
