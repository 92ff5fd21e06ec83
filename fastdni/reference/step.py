"""One whole DNI layer step, composed from the pieces; the contract of the fused ops.

For a layer ``h = act(x W^T + b)`` with SG model ``M``:

1. forward: ``h, pre = layer_forward(x, W, b)`` and the prediction ``g = M(h, c)``;
2. update unlocking: the layer's gradients from ``g`` (``dW, db`` and, for bootstrapping the
   layer below, ``dx = (g * act'(pre)) W`` with the pre-update ``W``), to which an update
   rule (:mod:`.optim`) is then applied;
3. SG regression, once a target ``t`` for ``dL/dh`` is known (the true gradient, or the
   bootstrapped ``dx`` of the layer above): ``l = mean_b ||M(h_b, c_b) - t_b||^2`` and its
   gradients w.r.t. the SG parameters.

With an "oracle" ``M`` that returns the true ``dL/dh``, steps 1-2 are exactly backprop.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor

from .layer import LayerGrads, layer_backward, layer_forward
from .synthetic import SGParams, SGRegression, sg_predict, sg_regression


class DNILayerStep(NamedTuple):
    h: Tensor  #: layer output ``[B, N]``
    pre: Tensor  #: pre-activation ``[B, N]``
    synthetic_gradient: Tensor  #: ``M(h, c)``, ``[B, N]``
    layer_grads: LayerGrads  #: gradients of W, b (and x) from the synthetic gradient
    sg: Optional[SGRegression]  #: SG loss and gradients; ``None`` when no target was given


def dni_layer_step(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    sg_params: SGParams,
    *,
    activation: str = "relu",
    context: Optional[Tensor] = None,
    target: Optional[Tensor] = None,
    need_input_grad: bool = False,
) -> DNILayerStep:
    """Forward, SG prediction, the layer's gradients from it, and (given ``target``) the SG regression."""
    h, pre = layer_forward(x, weight, bias, activation)
    if target is None:
        prediction, regression = sg_predict(h, sg_params, context), None
    else:
        regression = sg_regression(h, sg_params, target, context)
        prediction = regression.prediction
    grads = layer_backward(x, weight, pre, prediction, activation, need_input_grad=need_input_grad)
    return DNILayerStep(h, pre, prediction, grads, regression)
