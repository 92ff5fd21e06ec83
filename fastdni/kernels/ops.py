"""The ``torch.ops.fastdni`` op contract (``fastdni/ops/schema.py``) on the Triton kernels.

Same signatures and results as :mod:`fastdni.ops.reference_backend`, for CUDA tensors (or CPU tensors under
``TRITON_INTERPRET=1``) of dtype float32, bfloat16 or float16, every tensor of one dtype; accumulation and
optimizer math in fp32. Kernel launches per call (``L`` SG layers, ``dx`` = ``need_input_grad``):

``dni_forward``     1 + L      :func:`linear_act` for the layer (bias + activation epilogue; ``pre`` only for
                               gelu: relu/tanh take ``act'`` from ``h``), then one per SG layer (the cDNI
                               label term a row gather of ``U`` in the first one's epilogue)
``sg_predict``      L          ``dni_forward``'s SG part alone, on a given ``h`` (any strides)
``dni_update_``     1 (+1 dx)  ``dx = delta W`` first, then the weight-gradient GEMM with the Adam/SGD step on
                               ``W`` and ``b`` as its epilogue; ``delta = prediction / grad_scale * act'`` is
                               formed in both kernels' operand loads and never stored, nor is ``dW``/``db``
``sg_regression_``  2L - 1    per SG layer from the top: the gradient through it (below the top), then its
                               weight-gradient GEMM with the optimizer epilogue on ``A_l`` and ``c_l`` (the top
                               one forms the error ``prediction - t target`` as it loads and reduces the loss,
                               written by the last of its programs); +1 for ``U`` with a context

``batch_norm_act``  1 (+2)    the BatchNorm step (``fastdni/kernels/batch_norm.py``); +2 ATen ops for the running
                               statistics
``batch_norm_act_update_`` 1   its backward to ``dpre`` with gamma's and beta's optimizer step in the epilogue

Ordering: a gradient that needs a weight's pre-update value (``dx = delta W``; ``g_{l-1} = g_l A_l``) is
launched before the kernel that updates that weight in place. Kernels on one CUDA stream run in launch order,
each after the previous one has finished, so the reads of the first are complete before the second writes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastdni._checks import check_rows
from fastdni.contract import NEEDS_PRE, check_label_range, split_state, state_per_param

from ._launch import record_launch
from .batch_norm import batch_norm_act, batch_norm_act_update_
from .grad_step import gemm_grad_step_
from .linear_act import check_labels, linear_act
from .prologue import GradSource

__all__ = ["dni_forward", "sg_predict", "dni_update_", "sg_regression_", "batch_norm_act", "batch_norm_act_update_"]


def _context_args(context_weight: Optional[Tensor], context: Optional[Tensor]) -> dict:
    """How the first SG layer takes the context: a label gather in its epilogue, or a float term ``c U^T``
    from a library GEMM added there (cDNI's float context is rare and small: one GEMM of ``[B, C] x [C, H]``)."""
    if context_weight is None:
        return {}
    if not context.dtype.is_floating_point:
        return dict(label_weight=context_weight, labels=context, check_label_range=False)  # checked by the op
    record_launch("torch.mm")
    return dict(addend=context @ context_weight.T)


def _check_label_range(context_weight: Optional[Tensor], context: Optional[Tensor]) -> None:
    """Labels index ``U``: checked once per op (one device sync), not again by each kernel that reads them."""
    if context_weight is not None and context is not None and not context.dtype.is_floating_point:
        check_labels(context, context.shape[0], context_weight.shape[1], context.device, check_range=False)
        check_label_range("context", context, context_weight.shape[1])


def dni_forward(x: Tensor, weight: Tensor, bias: Tensor, sg_weights: Sequence[Tensor], sg_biases: Sequence[Tensor],
                context_weight: Optional[Tensor], context: Optional[Tensor],
                activation: str) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    check_rows("x", x)
    _check_label_range(context_weight, context)
    h, pre = linear_act(x, weight, bias, activation)
    saved_pre = pre if pre is not None else h.new_empty(0)
    if not sg_weights:
        return h, saved_pre, h.new_empty(0), []
    prediction, hidden = _sg_layers(h, sg_weights, sg_biases, context_weight, context)
    return h, saved_pre, prediction, hidden


def sg_predict(h: Tensor, sg_weights: Sequence[Tensor], sg_biases: Sequence[Tensor], context_weight: Optional[Tensor],
               context: Optional[Tensor]) -> tuple[Tensor, list[Tensor]]:
    check_rows("h", h)
    _check_label_range(context_weight, context)
    return _sg_layers(h, sg_weights, sg_biases, context_weight, context)


def _sg_layers(h: Tensor, sg_weights: Sequence[Tensor], sg_biases: Sequence[Tensor], context_weight: Optional[Tensor],
               context: Optional[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """``M(h, c)`` one :func:`linear_act` per SG layer (relu epilogue on the hidden ones), and the hidden outputs."""
    z = h
    hidden = []
    last = len(sg_weights) - 1
    for i, (w, b) in enumerate(zip(sg_weights, sg_biases)):
        extra = _context_args(context_weight, context) if i == 0 else {}
        z, _ = linear_act(z, w, b, "identity" if i == last else "relu", **extra)
        if i != last:
            hidden.append(z)
    return z, hidden


def dni_update_(x: Tensor, weight: Tensor, bias: Tensor, h: Tensor, pre: Tensor, prediction: Tensor,
                state: Sequence[Tensor], optimizer: str, hyper: Sequence[float], grad_scale: float, activation: str,
                need_input_grad: bool) -> Tensor:
    check_rows("x", x)
    delta = GradSource.delta(prediction, pre if activation in NEEDS_PRE else h, activation, 1.0 / grad_scale)
    # dx with the pre-update W: launched before the step below, which rewrites W (stream order).
    dx = linear_act(delta, weight.T, None, "identity")[0] if need_input_grad else x.new_empty(0)
    weight_state, bias_state = split_state(state, 2, state_per_param(optimizer, hyper))
    gemm_grad_step_(delta, x, weight, weight_state, optimizer, hyper, bias=bias, bias_state=bias_state)
    return dx


def sg_regression_(h: Tensor, sg_hidden: Sequence[Tensor], prediction: Tensor, target: Tensor,
                   sg_weights: Sequence[Tensor], sg_biases: Sequence[Tensor], context_weight: Optional[Tensor],
                   context: Optional[Tensor], state: Sequence[Tensor], optimizer: str, hyper: Sequence[float],
                   target_scale: float, loss_weight: float) -> Tensor:
    check_rows("h", h)
    _check_label_range(context_weight, context)
    batch = h.shape[0]
    layers = len(sg_weights)
    # One state list per parameter, in the contract's order: A_1, c_1, ..., A_L, c_L, then U.
    per_param = split_state(state, 2 * layers + (context_weight is not None), state_per_param(optimizer, hyper))
    inputs = [h, *sg_hidden]
    loss = torch.empty((), dtype=h.dtype, device=h.device)  # written by the top layer's kernel
    # d loss / d prediction = 2 loss_weight / B * error; the kernels reduce error^2 for the loss.
    grad = GradSource.error(prediction, target, target_scale, 2.0 * loss_weight / batch)  # batch >= 1: check_rows
    for i in reversed(range(layers)):
        w, b = sg_weights[i], sg_biases[i]
        w_state, b_state = per_param[2 * i], per_param[2 * i + 1]
        below = None
        if i > 0:  # the gradient through this layer, with its pre-update weight (launched before its step)
            below = linear_act(grad, w.T, None, "identity", out_derivative=(sg_hidden[i - 1], "relu"))[0]
        top = i == layers - 1
        gemm_grad_step_(grad, inputs[i], w, w_state, optimizer, hyper, bias=b, bias_state=b_state,
                        loss=loss if top else None, loss_scale=loss_weight / batch if batch else 0.0)
        if i == 0 and context_weight is not None:
            u_state = per_param[2 * layers]
            labelled = not context.dtype.is_floating_point
            gemm_grad_step_(grad, None if labelled else context, context_weight, u_state, optimizer, hyper,
                            labels=context if labelled else None, check_label_range=False)
        if below is not None:
            grad = GradSource.stored(below)
    if batch == 0 or h.shape[1] == 0:  # no kernel wrote it: the reference's 0 / 0 and empty sum
        loss.fill_(float("nan") if batch == 0 else 0.0)
    return loss
