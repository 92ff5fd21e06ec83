"""The Triton backend (``fastdni/kernels/``): ``backend="triton"``, and ``torch.ops.fastdni``
on CUDA tensors in an install built without the C++ CUDA kernels (``fastdni.ops._extension.HAS_CUDA_KERNELS``).

Registering needs neither a GPU nor importing triton: the CUDA implementations import ``fastdni.kernels.ops``
on their first call. Under ``TRITON_INTERPRET=1`` (set before torch/triton are imported) the same kernels
run on CPU tensors through Triton's interpreter, which is how CI checks them; ``backend="triton"`` then
accepts CPU tensors.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from . import registration
from ._extension import HAS_CUDA_KERNELS
from .schema import GPU_OPS, NAMESPACE, TRITON_ONLY_OPS

HAS_TRITON = importlib.util.find_spec("triton") is not None and importlib.util.find_spec("fastdni.kernels") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def kernel_ops():
    """The module of Triton op implementations (imported on first use: importing triton takes a while)."""
    from fastdni.kernels import ops

    return ops


def _lazy(name: str):
    def impl(*args):
        return getattr(kernel_ops(), name)(*args)

    impl.__name__ = f"{name}_triton"
    return impl


def register(dispatch_key: str = "CUDA", library: "torch.library.Library | None" = None,
             names: "tuple[str, ...]" = GPU_OPS) -> "torch.library.Library":
    """Register the Triton implementations of the ops ``names`` (default: every op) for ``dispatch_key``; returns the
    ``Library`` holding the registrations (they last as long as it lives). CUDA by default; the interpreted tests
    register them for CPU in a process of their own, to run ``torch.compile`` over them there."""
    library = library or torch.library.Library(NAMESPACE, "IMPL")
    for name in names:
        library.impl(name, _lazy(name), dispatch_key)
    return library


# The CUDA dispatch key belongs to the C++ CUDA kernels for the ops they have when the extension has them
# (registering here would override them); Triton takes it for the rest, or for every op in an install without them,
# and backend="triton" reaches it either way.
_CUDA_LIBRARY = register("CUDA", names=TRITON_ONLY_OPS if HAS_CUDA_KERNELS else GPU_OPS) if HAS_TRITON else None


def _split_sg(num_sg: int, has_context_weight: bool, has_context: bool, rest) -> tuple:
    """``(sg_weights, sg_biases, context_weight, context)`` from the flat tensor arguments of an ``apply``."""
    sg_weights, sg_biases = list(rest[:num_sg]), list(rest[num_sg:2 * num_sg])
    tail = list(rest[2 * num_sg:])
    context_weight = tail.pop(0) if has_context_weight else None
    context = tail.pop(0) if has_context else None
    return sg_weights, sg_biases, context_weight, context


def _flat_sg(sg_weights, sg_biases, context_weight, context) -> list:
    return [*sg_weights, *sg_biases, *(t for t in (context_weight, context) if t is not None)]


def _sg_grad_tail(ctx, grad_w, grad_b, grad_u) -> list:
    return [*grad_w, *grad_b, *([grad_u] if ctx.has_context_weight else []), *([None] if ctx.has_context else [])]


class _DniForward(torch.autograd.Function):
    """``backend="triton"`` calls the kernels directly (they also run on CPU under the interpreter, where
    ``torch.ops.fastdni`` dispatches to the C++ kernels): this gives that call the op's autograd formula."""

    @staticmethod
    def forward(ctx, activation, num_sg, has_context_weight, has_context, x, weight, bias, *rest):
        sg_weights, sg_biases, context_weight, context = _split_sg(num_sg, has_context_weight, has_context, rest)
        inputs = (x, weight, bias, sg_weights, sg_biases, context_weight, context, activation)
        h, pre, prediction, hidden = kernel_ops().dni_forward(*inputs)
        registration.setup_forward(ctx, inputs, (h, pre, prediction, hidden))
        ctx.has_context = has_context
        return (h, pre, prediction, *hidden)

    @staticmethod
    def backward(ctx, grad_h, grad_pre, grad_prediction, *grad_hidden):
        gx, gw, gb, gsw, gsb, gu, _, _ = registration.dni_forward_backward(ctx, grad_h, grad_pre, grad_prediction,
                                                                            list(grad_hidden))
        return (None, None, None, None, gx, gw, gb, *_sg_grad_tail(ctx, gsw, gsb, gu))


class _SgPredict(torch.autograd.Function):
    """:class:`_DniForward` for ``sg_predict``."""

    @staticmethod
    def forward(ctx, num_sg, has_context_weight, has_context, h, *rest):
        inputs = (h, *_split_sg(num_sg, has_context_weight, has_context, rest))
        prediction, hidden = kernel_ops().sg_predict(*inputs)
        registration.setup_sg_predict(ctx, inputs, (prediction, hidden))
        ctx.has_context = has_context
        return (prediction, *hidden)

    @staticmethod
    def backward(ctx, grad_prediction, *grad_hidden):
        gh, gw, gb, gu, _ = registration.sg_predict_backward(ctx, grad_prediction, list(grad_hidden))
        return (None, None, None, gh, *_sg_grad_tail(ctx, gw, gb, gu))


def dni_forward(x, weight, bias, sg_weights, sg_biases, context_weight, context, activation):
    """The Triton ``dni_forward``, differentiable (backprop mode), with the op's signature and results."""
    out = _DniForward.apply(activation, len(sg_weights), context_weight is not None, context is not None,
                            x, weight, bias, *_flat_sg(sg_weights, sg_biases, context_weight, context))
    return out[0], out[1], out[2], list(out[3:])


def sg_predict(h, sg_weights, sg_biases, context_weight, context):
    """The Triton ``sg_predict``, differentiable, with the op's signature and results."""
    out = _SgPredict.apply(len(sg_weights), context_weight is not None, context is not None,
                           h, *_flat_sg(sg_weights, sg_biases, context_weight, context))
    return out[0], list(out[1:])


class _BatchNormAct(torch.autograd.Function):
    """:class:`_DniForward` for ``batch_norm_act``."""

    @staticmethod
    def forward(ctx, pre, weight, bias, running_mean, running_var, momentum, eps, activation):
        inputs = (pre, weight, bias, running_mean, running_var, momentum, eps, activation)
        output = kernel_ops().batch_norm_act(*inputs)
        registration.setup_batch_norm_act(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return registration.batch_norm_act_backward_formula(ctx, *grads)


def batch_norm_act(pre, weight, bias, running_mean, running_var, momentum, eps, activation):
    """The Triton ``batch_norm_act``, differentiable, with the op's signature and results."""
    return _BatchNormAct.apply(pre, weight, bias, running_mean, running_var, momentum, eps, activation)


#: The ops whose ``backend="triton"`` call goes through an autograd wrapper above (the others are optimizer steps).
DIFFERENTIABLE = {"dni_forward": dni_forward, "sg_predict": sg_predict, "batch_norm_act": batch_norm_act}
