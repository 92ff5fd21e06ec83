"""The "reference" backend: each op composed from :mod:`fastdni.reference`, updating in place.

It is what the compiled backends are tested against, and the implementation ``torch.ops.fastdni``
falls back to (``CompositeExplicitAutograd``) on a device without a compiled kernel.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from .._checks import check_context_presence
from ..reference import (
    SGParams,
    activation_derivative_from_output,
    batch_norm_act_backward,
    batch_norm_act_forward,
    layer_forward,
    layer_grads_from_delta,
    sg_backward,
    sg_forward,
)
from ..contract import NEEDS_PRE, check_label_range, join_sg_params, split_state, state_per_param
from .optim import optimizer_step_


def dni_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    sg_weights: Sequence[Tensor],
    sg_biases: Sequence[Tensor],
    context_weight: Optional[Tensor],
    context: Optional[Tensor],
    activation: str,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    h, pre = layer_forward(x, weight, bias, activation)
    saved_pre = pre if activation in NEEDS_PRE else h.new_empty(0)
    if not sg_weights:
        check_context_presence(context, False)
        return h, saved_pre, h.new_empty(0), []
    prediction, hidden = sg_predict(h, sg_weights, sg_biases, context_weight, context)
    return h, saved_pre, prediction, hidden


def sg_predict(
    h: Tensor,
    sg_weights: Sequence[Tensor],
    sg_biases: Sequence[Tensor],
    context_weight: Optional[Tensor],
    context: Optional[Tensor],
) -> tuple[Tensor, list[Tensor]]:
    z = sg_forward(h, SGParams(tuple(sg_weights), tuple(sg_biases), context_weight), context)
    return z[-1], z[1:-1]


def dni_update_(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    h: Tensor,
    pre: Tensor,
    prediction: Tensor,
    state: Sequence[Tensor],
    optimizer: str,
    hyper: Sequence[float],
    grad_scale: float,
    activation: str,
    need_input_grad: bool,
) -> Tensor:
    delta = prediction * activation_derivative_from_output(h, pre, activation) / grad_scale
    grads = layer_grads_from_delta(x, weight, delta, need_input_grad=need_input_grad)
    weight_state, bias_state = split_state(state, 2, state_per_param(optimizer, hyper))
    optimizer_step_(optimizer, hyper, weight, grads.weight, weight_state)
    optimizer_step_(optimizer, hyper, bias, grads.bias, bias_state)
    return grads.input if need_input_grad else x.new_empty(0)


def sg_regression_(
    h: Tensor,
    sg_hidden: Sequence[Tensor],
    prediction: Tensor,
    target: Tensor,
    sg_weights: Sequence[Tensor],
    sg_biases: Sequence[Tensor],
    context_weight: Optional[Tensor],
    context: Optional[Tensor],
    state: Sequence[Tensor],
    optimizer: str,
    hyper: Sequence[float],
    target_scale: float,
    loss_weight: float,
) -> Tensor:
    if context is not None and not context.dtype.is_floating_point:  # labels index U (dni_forward: sg_forward checks)
        check_label_range("context", context, context_weight.shape[1])
    error = prediction - target_scale * target
    batch = h.shape[0]
    loss = loss_weight * (error * error).sum() / batch
    params = SGParams(tuple(sg_weights), tuple(sg_biases), context_weight)
    grads, _ = sg_backward(error * (2.0 * loss_weight / batch), [h, *sg_hidden], params, context)
    ordered = ordered_params(params)
    per_param = split_state(state, len(ordered), state_per_param(optimizer, hyper))
    for param, grad, param_state in zip(ordered, ordered_params(grads), per_param):
        optimizer_step_(optimizer, hyper, param, grad, param_state)
    return loss


def batch_norm_act(
    pre: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    momentum: float,
    eps: float,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(batch_norm_act_forward(pre, weight, bias, running_mean, running_var, momentum, eps, activation))


def batch_norm_act_update_(
    h: Tensor,
    xhat: Tensor,
    invstd: Tensor,
    prediction: Tensor,
    weight: Tensor,
    bias: Tensor,
    state: Sequence[Tensor],
    optimizer: str,
    hyper: Sequence[float],
    grad_scale: float,
    activation: str,
) -> Tensor:
    grads = batch_norm_act_backward(prediction / grad_scale, h, xhat, invstd, weight, bias, activation)
    weight_state, bias_state = split_state(state, 2, state_per_param(optimizer, hyper))
    optimizer_step_(optimizer, hyper, weight, grads.weight, weight_state)  # after the backward: it reads the old gamma
    optimizer_step_(optimizer, hyper, bias, grads.bias, bias_state)
    return grads.pre


def ordered_params(params: SGParams) -> list[Tensor]:
    """The order of an SG's parameters in the ops' ``state``: ``W_1, b_1, ..., W_L, b_L`` then ``U``
    (:func:`fastdni.contract.join_sg_params`)."""
    return join_sg_params(params.weights, params.biases, params.context_weight)


__all__ = ["dni_forward", "sg_predict", "dni_update_", "sg_regression_", "batch_norm_act", "batch_norm_act_update_",
           "ordered_params"]
