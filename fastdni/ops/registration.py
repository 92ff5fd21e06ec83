"""Fake (meta) kernels, the reference fallback and the autograd formula of the ``torch.ops.fastdni`` ops.

- ``register_fake``: output shapes for ``torch.compile`` and other tracing; no data touched.
- ``CompositeExplicitAutograd``: the reference backend, used on any device without a compiled kernel
  (a compiled backend registers for its own dispatch key, e.g. CPU, and takes precedence there).
- ``register_autograd`` for ``dni_forward``, the only op inside a differentiable graph (backprop
  mode, and pushing a synthetic gradient back through a block). The update ops are optimizer steps.
"""
from __future__ import annotations

import torch

from ..contract import NEEDS_PRE
from ..reference import SGParams, activation_derivative_from_output, layer_grads_from_delta, sg_backward
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


@torch.library.register_fake(f"{NAMESPACE}::dni_update_")
def _dni_update_fake(x, weight, bias, h, pre, prediction, state, optimizer, hyper, grad_scale, activation, need_input_grad):
    return x.new_empty(x.shape) if need_input_grad else x.new_empty(0)


@torch.library.register_fake(f"{NAMESPACE}::sg_regression_")
def _sg_regression_fake(h, sg_hidden, prediction, target, sg_weights, sg_biases, context_weight, context, state,
                        optimizer, hyper, target_scale, loss_weight):
    return h.new_empty(())


def setup_forward(ctx, inputs, output):
    """``dni_forward``'s autograd context (also the Triton backend's, ``fastdni/ops/_triton.py``)."""
    x, weight, _bias, sg_weights, _sg_biases, context_weight, context, activation = inputs
    h, pre, _prediction, hidden = output
    ctx.activation = activation
    ctx.num_sg_layers = len(sg_weights)
    ctx.has_context_weight = context_weight is not None
    ctx.save_for_backward(x, weight, h, pre, context, context_weight, *sg_weights, *hidden)
    ctx.mark_non_differentiable(pre, *hidden)


def dni_forward_backward(ctx, grad_h, _grad_pre, grad_prediction, _grad_hidden):
    """``dni_forward``'s backward: the layer's and the SG's gradients (``fastdni.reference``)."""
    x, weight, h, pre, context, context_weight, *rest = ctx.saved_tensors
    sg_weights, hidden = rest[:ctx.num_sg_layers], rest[ctx.num_sg_layers:]
    grad_sg_w = [None] * ctx.num_sg_layers
    grad_sg_b = [None] * ctx.num_sg_layers
    grad_u = None
    if grad_h is None:
        grad_h = torch.zeros_like(h)
    if ctx.num_sg_layers and grad_prediction is not None:
        # Biases are not needed by the SG backward, only their count; pass the weights in their place.
        params = SGParams(tuple(sg_weights), tuple(sg_weights), context_weight if ctx.has_context_weight else None)
        grads, through_sg = sg_backward(grad_prediction, [h, *hidden], params, context, need_input_grad=True)
        grad_sg_w, grad_sg_b, grad_u = list(grads.weights), list(grads.biases), grads.context_weight
        grad_h = grad_h + through_sg
    delta = grad_h * activation_derivative_from_output(h, pre, ctx.activation)
    grads = layer_grads_from_delta(x, weight, delta, need_input_grad=True)
    return grads.input, grads.weight, grads.bias, grad_sg_w, grad_sg_b, grad_u, None, None


torch.library.register_autograd(f"{NAMESPACE}::dni_forward", dni_forward_backward, setup_context=setup_forward)
