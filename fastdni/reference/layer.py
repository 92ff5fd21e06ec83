"""One Linear(+bias)+activation layer, forward and backward, in explicit formulae.

Shapes: ``x`` is ``[B, K]`` (batch, input features), ``weight`` ``[N, K]``,
``bias`` ``[N]``, the output ``h`` and the pre-activation ``pre`` ``[B, N]``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor

from .._checks import check_rows, check_tensor
from .activations import activate, activation_derivative, check_activation


class LayerGrads(NamedTuple):
    weight: Tensor  #: dL/dW = delta^T x, ``[N, K]``
    bias: Tensor  #: dL/db = sum_rows(delta), ``[N]``
    input: Optional[Tensor]  #: dL/dx = delta W, ``[B, K]`` (``None`` when not asked for)


def check_layer(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> None:
    check_tensor("x", x, ndim=2)
    check_rows("x", x)
    check_tensor("weight", weight, shape=(None, x.shape[1]), like=x)
    if bias is not None:
        check_tensor("bias", bias, shape=(weight.shape[0],), like=x)


def layer_forward(x: Tensor, weight: Tensor, bias: Tensor, activation: str = "relu") -> tuple[Tensor, Tensor]:
    """Forward of the layer.

    .. math:: pre = x W^T + b, \\qquad h = act(pre)

    Returns ``(h, pre)``; ``pre`` is what the update needs to form ``act'(pre)``.
    """
    check_layer(x, weight, bias)
    check_activation(activation)
    pre = x @ weight.T + bias
    return activate(pre, activation), pre


def layer_backward(
    x: Tensor,
    weight: Tensor,
    pre: Tensor,
    grad_h: Tensor,
    activation: str = "relu",
    *,
    need_input_grad: bool = True,
) -> LayerGrads:
    """Gradients of the layer's parameters (and input) from a gradient ``grad_h = dL/dh``.

    In DNI ``grad_h`` is the synthetic gradient ``SG(h)``; in backprop it is the true one.

    .. math::
        \\delta = grad_h \\odot act'(pre), \\quad
        dW = \\delta^T x, \\quad db = \\sum_b \\delta_b, \\quad dx = \\delta W

    ``dx`` uses the ``weight`` passed in, i.e. the weight *before* its update: it is the
    bootstrapped target for the synthetic gradient of the layer below.
    """
    check_layer(x, weight)
    check_tensor("pre", pre, shape=(x.shape[0], weight.shape[0]), like=x)
    check_tensor("grad_h", grad_h, shape=tuple(pre.shape), like=x)
    delta = grad_h * activation_derivative(pre, activation)
    return layer_grads_from_delta(x, weight, delta, need_input_grad=need_input_grad)


def layer_grads_from_delta(x: Tensor, weight: Tensor, delta: Tensor, *, need_input_grad: bool = True) -> LayerGrads:
    """``dW = delta^T x``, ``db = sum_b delta_b``, ``dx = delta W`` for ``delta = dL/dpre``."""
    grad_input = delta @ weight if need_input_grad else None
    return LayerGrads(weight=delta.T @ x, bias=delta.sum(0), input=grad_input)
