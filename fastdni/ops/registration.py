"""Fake (meta) kernels, the reference fallback and the autograd formula of the ``torch.ops.fastdni`` ops.

- ``register_fake``: output shapes for ``torch.compile`` and other tracing; no data touched.
- ``CompositeExplicitAutograd``: the reference backend, used on any device without a compiled kernel
  (a compiled backend registers for its own dispatch key, e.g. CPU, and takes precedence there).
- ``register_autograd`` for ``dni_forward`` and ``sg_predict``, the ops inside a differentiable graph (backprop
  mode, pushing a synthetic gradient back through a block, an SG model trained by autograd). The update ops
  are optimizer steps.
"""
from __future__ import annotations

import torch

from ..contract import NEEDS_PRE
from ..reference import (SGParams, activation_derivative_from_output, batch_norm_act_backward, layer_grads_from_delta,
                         sg_backward)
from . import reference_backend
from .schema import NAMESPACE, SCHEMAS

for _name in SCHEMAS:
    torch.library.impl(f"{NAMESPACE}::{_name}", "CompositeExplicitAutograd")(getattr(reference_backend, _name))


@torch.library.register_fake(f"{NAMESPACE}::dni_forward")
def _dni_forward_fake(x, weight, bias, sg_weights, sg_biases, context_weight, context, activation):
    rows, features = x.shape[0], weight.shape[0]
    pre = x.new_empty(rows, features) if activation in NEEDS_PRE else x.new_empty(0)
    prediction = x.new_empty(rows, features) if sg_weights else x.new_empty(0)
    hidden = [x.new_empty(rows, w.shape[0]) for w in sg_weights[:-1]]
    return x.new_empty(rows, features), pre, prediction, hidden


@torch.library.register_fake(f"{NAMESPACE}::sg_predict")
def _sg_predict_fake(h, sg_weights, sg_biases, context_weight, context):
    rows = h.shape[0]
    return h.new_empty(rows, h.shape[1]), [h.new_empty(rows, w.shape[0]) for w in sg_weights[:-1]]


@torch.library.register_fake(f"{NAMESPACE}::dni_update_")
def _dni_update_fake(x, weight, bias, h, pre, prediction, state, optimizer, hyper, grad_scale, activation, need_input_grad):
    return x.new_empty(x.shape) if need_input_grad else x.new_empty(0)


@torch.library.register_fake(f"{NAMESPACE}::sg_regression_")
def _sg_regression_fake(h, sg_hidden, prediction, target, sg_weights, sg_biases, context_weight, context, state,
                        optimizer, hyper, target_scale, loss_weight):
    return h.new_empty(())


@torch.library.register_fake(f"{NAMESPACE}::batch_norm_act")
def _batch_norm_act_fake(pre, weight, bias, running_mean, running_var, momentum, eps, activation):
    features = pre.shape[1]
    return (pre.new_empty(pre.shape), pre.new_empty(pre.shape), pre.new_empty(features), pre.new_empty(features),
            pre.new_empty(features))


@torch.library.register_fake(f"{NAMESPACE}::batch_norm_act_update_")
def _batch_norm_act_update_fake(h, xhat, invstd, prediction, weight, bias, state, optimizer, hyper, grad_scale, activation):
    return h.new_empty(h.shape)


def _save_sg(ctx, h, sg_weights, hidden, context_weight, context, *leading):
    """What the SG part of a backward needs: ``leading`` tensors, then ``h``, the context, ``U``, the weights and
    the hidden activations (the biases only by their count: the SG backward does not read them)."""
    ctx.num_sg_layers = len(sg_weights)
    ctx.has_context_weight = context_weight is not None
    ctx.save_for_backward(*leading, h, context, context_weight, *sg_weights, *hidden)


def _sg_grads(ctx, saved, grad_prediction):
    """``(grad_h through M, [dW_l], [db_l], dU)`` from :func:`_save_sg`'s tensors (``leading`` removed)."""
    h, context, context_weight, *rest = saved
    sg_weights, hidden = rest[:ctx.num_sg_layers], rest[ctx.num_sg_layers:]
    # Biases are not needed by the SG backward, only their count; pass the weights in their place.
    params = SGParams(tuple(sg_weights), tuple(sg_weights), context_weight if ctx.has_context_weight else None)
    grads, through_sg = sg_backward(grad_prediction, [h, *hidden], params, context, need_input_grad=True)
    return through_sg, list(grads.weights), list(grads.biases), grads.context_weight


def setup_forward(ctx, inputs, output):
    """``dni_forward``'s autograd context (also the Triton backend's, ``fastdni/ops/_triton.py``)."""
    x, weight, _bias, sg_weights, _sg_biases, context_weight, context, activation = inputs
    h, pre, _prediction, hidden = output
    ctx.activation = activation
    _save_sg(ctx, h, sg_weights, hidden, context_weight, context, x, weight, pre)
    ctx.mark_non_differentiable(pre, *hidden)


def dni_forward_backward(ctx, grad_h, _grad_pre, grad_prediction, _grad_hidden):
    """``dni_forward``'s backward: the layer's and the SG's gradients (``fastdni.reference``)."""
    x, weight, pre, *saved = ctx.saved_tensors
    h = saved[0]
    grad_sg_w = [None] * ctx.num_sg_layers
    grad_sg_b = [None] * ctx.num_sg_layers
    grad_u = None
    if grad_h is None:
        grad_h = torch.zeros_like(h)
    if ctx.num_sg_layers and grad_prediction is not None:
        through_sg, grad_sg_w, grad_sg_b, grad_u = _sg_grads(ctx, saved, grad_prediction)
        grad_h = grad_h + through_sg
    delta = grad_h * activation_derivative_from_output(h, pre, ctx.activation)
    grads = layer_grads_from_delta(x, weight, delta, need_input_grad=True)
    return grads.input, grads.weight, grads.bias, grad_sg_w, grad_sg_b, grad_u, None, None


def setup_sg_predict(ctx, inputs, output):
    """``sg_predict``'s autograd context (also the Triton backend's, ``fastdni/ops/_triton.py``)."""
    h, sg_weights, _sg_biases, context_weight, context = inputs
    _prediction, hidden = output
    _save_sg(ctx, h, sg_weights, hidden, context_weight, context)
    ctx.mark_non_differentiable(*hidden)


def sg_predict_backward(ctx, grad_prediction, _grad_hidden):
    """``sg_predict``'s backward: ``dh``, and the SG's parameter gradients (``fastdni.reference.sg_backward``)."""
    if grad_prediction is None:
        return None, [None] * ctx.num_sg_layers, [None] * ctx.num_sg_layers, None, None
    grad_h, grad_w, grad_b, grad_u = _sg_grads(ctx, ctx.saved_tensors, grad_prediction)
    return grad_h, grad_w, grad_b, grad_u, None


def setup_batch_norm_act(ctx, inputs, output):
    _pre, weight, bias, _mean, _var, _momentum, _eps, activation = inputs
    h, xhat, invstd, running_mean, running_var = output
    ctx.activation = activation
    ctx.save_for_backward(h, xhat, invstd, weight, bias)
    ctx.mark_non_differentiable(xhat, invstd, running_mean, running_var)


def batch_norm_act_backward_formula(ctx, grad_h, _grad_xhat, _grad_invstd, _grad_mean, _grad_var):
    """``batch_norm_act``'s backward: the batch-statistics BatchNorm backward (``fastdni.reference.batch_norm``)."""
    if grad_h is None:
        return None, None, None, None, None, None, None, None
    h, xhat, invstd, weight, bias = ctx.saved_tensors
    grads = batch_norm_act_backward(grad_h, h, xhat, invstd, weight, bias, ctx.activation)
    return grads.pre, grads.weight, grads.bias, None, None, None, None, None


torch.library.register_autograd(f"{NAMESPACE}::batch_norm_act", batch_norm_act_backward_formula,
                                setup_context=setup_batch_norm_act)
torch.library.register_autograd(f"{NAMESPACE}::dni_forward", dni_forward_backward, setup_context=setup_forward)
torch.library.register_autograd(f"{NAMESPACE}::sg_predict", sg_predict_backward, setup_context=setup_sg_predict)
