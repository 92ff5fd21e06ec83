"""The synthetic-gradient (SG) model M and its regression onto a target gradient.

M maps a layer output ``h`` (``[B, N]``) and, for cDNI, a context ``c`` to a prediction of
``dL/dh`` of the same shape. With ``L`` layers ``(W_1, b_1) ... (W_L, b_L)`` (``L = 1``: a
linear SG) and hidden activation ReLU:

.. math::
    z_0 = h, \\quad
    a_1 = z_0 W_1^T + b_1 + \\mathrm{ctx}(c), \\quad
    z_l = \\mathrm{relu}(a_l), \\quad
    a_{l+1} = z_l W_{l+1}^T + b_{l+1}, \\quad
    M(h, c) = a_L

The context enters the first layer only, through a weight ``U`` of shape
``[out(W_1), C]``: ``ctx(c) = c U^T`` for float features ``c`` (``[B, C]``), or, for
integer class labels ``y`` (``[B]``), the row gather ``ctx(y)_b = U[:, y_b]``, which is
``onehot(y) U^T`` without the one-hot GEMM. As in the paper, the output layer
``(W_L, b_L)`` starts at zero, so M predicts 0 until it has learned.

The regression loss onto a target ``t`` (the true gradient, or a bootstrapped one) is
the batch mean of the squared error:

.. math:: \\ell = \\frac{1}{B} \\sum_b \\lVert M(h_b, c_b) - t_b \\rVert^2,
          \\qquad \\frac{\\partial \\ell}{\\partial M} = \\frac{2}{B} (M - t)
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .._checks import check_context, check_context_presence, check_rows, check_tensor


class SGParams(NamedTuple):
    """Parameters of an SG model; ``weights[-1], biases[-1]`` is the output layer."""

    weights: tuple[Tensor, ...]  #: ``W_l``, each ``[out_l, in_l]``; ``in_1 = out_L = N``
    biases: tuple[Tensor, ...]  #: ``b_l``, each ``[out_l]``
    context_weight: Optional[Tensor] = None  #: ``U``, ``[out_1, C]``; ``None`` without context


class SGRegression(NamedTuple):
    loss: Tensor  #: scalar ``l`` (see module docstring)
    prediction: Tensor  #: ``M(h, c)``, ``[B, N]``
    grads: SGParams  #: ``dl/dW_l``, ``dl/db_l``, ``dl/dU``


def init_sg_params(
    features: int,
    hidden: Sequence[int] = (),
    context_features: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
    generator: Optional[torch.Generator] = None,
) -> SGParams:
    """Random SG parameters as ``torch.nn.Linear`` initialises them, output layer zeroed."""
    sizes = [features, *hidden, features]
    weights, biases = [], []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        bound = fan_in ** -0.5
        weights.append((torch.rand(fan_out, fan_in, dtype=dtype, device=device, generator=generator) * 2 - 1) * bound)
        biases.append((torch.rand(fan_out, dtype=dtype, device=device, generator=generator) * 2 - 1) * bound)
    weights[-1] = torch.zeros_like(weights[-1])
    biases[-1] = torch.zeros_like(biases[-1])
    context_weight = None
    if context_features:
        bound = (features + context_features) ** -0.5
        context_weight = (torch.rand(sizes[1], context_features, dtype=dtype, device=device, generator=generator) * 2 - 1) * bound
        if len(weights) == 1:  # a linear SG: U is part of the zero-initialised output layer
            context_weight.zero_()
    return SGParams(tuple(weights), tuple(biases), context_weight)


def check_sg(h: Tensor, params: SGParams, context: Optional[Tensor], *, label_range: bool = True) -> None:
    check_tensor("h", h, ndim=2)
    check_rows("h", h)
    if len(params.weights) == 0 or len(params.weights) != len(params.biases):
        raise ValueError(
            f"params: expected as many weights as biases (at least one), got "
            f"{len(params.weights)} weights and {len(params.biases)} biases"
        )
    fan_in = h.shape[1]
    for i, (w, b) in enumerate(zip(params.weights, params.biases)):
        fan_out = h.shape[1] if i == len(params.weights) - 1 else None
        check_tensor(f"params.weights[{i}]", w, shape=(fan_out, fan_in), like=h)
        check_tensor(f"params.biases[{i}]", b, shape=(w.shape[0],), like=h)
        fan_in = w.shape[0]
    check_context_presence(context, params.context_weight is not None)
    if context is not None:
        u = check_tensor("params.context_weight", params.context_weight, shape=(params.weights[0].shape[0], None), like=h)
        check_context(context, batch=h.shape[0], features=u.shape[1], like=h, label_range=label_range)


def context_term(context: Tensor, context_weight: Tensor) -> Tensor:
    """``ctx(c)``: ``c U^T`` for features, the column gather ``U[:, y]^T`` for labels."""
    if context.dtype.is_floating_point:
        return context @ context_weight.T
    # index_select, not context_weight.T[context]: the backward of advanced indexing accumulates with
    # atomics on CPU, which made cDNI runs differ in the last bits from one run to the next.
    return context_weight.index_select(1, context).T


def sg_forward(h: Tensor, params: SGParams, context: Optional[Tensor] = None) -> list[Tensor]:
    """Every layer input ``z_0 = h, z_1 .. z_{L-1}`` followed by the output ``a_L = M(h, c)``.

    The hidden ``z_l`` are what the regression's backward needs (the fused forward saves them)."""
    check_sg(h, params, context)
    activations = [h]
    last = len(params.weights) - 1
    for i, (w, b) in enumerate(zip(params.weights, params.biases)):
        a = activations[-1] @ w.T + b
        if i == 0 and context is not None:
            a = a + context_term(context, params.context_weight)
        activations.append(a if i == last else torch.relu(a))
    return activations


def sg_predict(h: Tensor, params: SGParams, context: Optional[Tensor] = None) -> Tensor:
    """The synthetic gradient ``M(h, c)``, ``[B, N]``."""
    return sg_forward(h, params, context)[-1]


def sg_backward(
    grad_output: Tensor,
    activations: Sequence[Tensor],
    params: SGParams,
    context: Optional[Tensor] = None,
    *,
    need_input_grad: bool = False,
) -> tuple[SGParams, Optional[Tensor]]:
    """Backward of ``M`` from ``g_L = grad_output``, given the layer inputs ``z_0 .. z_{L-1}``
    (:func:`sg_forward` without its last entry).

    .. math::
        dW_l = g_l^T z_{l-1}, \\quad db_l = \\sum_b g_{l,b}, \\quad
        g_{l-1} = (g_l W_l) \\odot 1[z_{l-1} > 0], \\quad
        dU = g_1^T c \\;(\\text{labels: } dU[:, y_b] \\mathrel{+}= g_{1,b}), \\quad
        dh = g_1 W_1

    Returns the parameter gradients and ``dh`` (``None`` unless ``need_input_grad``).
    """
    g = grad_output
    grad_w: list[Tensor] = []
    grad_b: list[Tensor] = []
    for layer in reversed(range(len(params.weights))):
        grad_w.append(g.T @ activations[layer])
        grad_b.append(g.sum(0))
        if layer > 0:  # z[layer] = relu(a_layer), so its mask is z > 0
            g = (g @ params.weights[layer]) * (activations[layer] > 0).to(g.dtype)
    grad_u = None
    if context is not None:
        if context.dtype.is_floating_point:
            grad_u = g.T @ context
        else:
            grad_u = torch.zeros_like(params.context_weight).index_add_(1, context, g.T)
    grad_h = g @ params.weights[0] if need_input_grad else None
    return SGParams(tuple(reversed(grad_w)), tuple(reversed(grad_b)), grad_u), grad_h


def sg_regression(h: Tensor, params: SGParams, target: Tensor, context: Optional[Tensor] = None) -> SGRegression:
    """Loss of ``M(h, c)`` against ``target`` and its gradients w.r.t. every SG parameter
    (:func:`sg_backward` from ``g_L = dl/da_L = 2 (M - t) / B``)."""
    z = sg_forward(h, params, context)
    prediction = z.pop()
    check_tensor("target", target, shape=tuple(prediction.shape), like=h)
    error = prediction - target
    batch = h.shape[0]
    loss = (error * error).sum() / batch
    grads, _ = sg_backward(error * (2.0 / batch), z, params, context)
    return SGRegression(loss=loss, prediction=prediction, grads=grads)
