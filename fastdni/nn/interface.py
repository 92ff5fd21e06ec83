"""The decoupled neural interface: cut a model's graph at an activation and feed the part
below a synthetic gradient at once (update unlocking)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .._checks import check_positive


def has_trainable_params(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class _RegressOnArrivingGradient(torch.autograd.Function):
    """Identity on ``h`` (detached: the graph below ends here) whose backward turns the gradient
    ``t`` that arrives for ``h`` into the SG regression gradient ``w * 2 (M - s t) / B`` for the
    prediction ``M`` (``s``: the gradient scale), so the same backward pass goes on into the SG
    model's parameters.

    ``t`` is the true gradient when the loss is above, or the bootstrapped one when another
    interface's synthetic gradient was pushed back through the block above. ``interface`` is the
    :class:`DNI` or :class:`~fastdni.nn.TruncationDNI` that owns ``M``: its ``gradient_scale`` and
    ``loss_weight`` are read, and its ``last_sg_loss`` is set.
    """

    @staticmethod
    def forward(ctx, h: Tensor, prediction: Tensor, interface: nn.Module) -> Tensor:
        ctx.save_for_backward(prediction)
        ctx.interface = interface
        return h.view_as(h)

    @staticmethod
    def backward(ctx, target: Tensor):
        (prediction,) = ctx.saved_tensors
        interface = ctx.interface
        error = prediction - interface.gradient_scale * target
        batch = prediction.shape[0]
        interface.last_sg_loss = interface.loss_weight * (error * error).sum().detach() / batch
        return None, error * (2.0 * interface.loss_weight / batch), None


class DNI(nn.Module):
    """A decoupled neural interface that can be placed on any activation tensor of any model.

    In training, ``out = dni(h, context)``:

    1. predicts ``g = M(h, context)`` with the SG model ``M``;
    2. backpropagates ``g`` into the part of the model below ``h`` at once: its parameters
       have their ``.grad`` now and their optimizer may step (update unlocking);
    3. returns ``out``, equal to ``h`` but with the graph below cut away. When a gradient ``t``
       for ``out`` arrives later (``loss.backward()`` above it: the true gradient; or another
       interface above pushing its synthetic gradient back: a bootstrapped one), ``M`` is
       regressed onto it: the SG parameters receive the gradient of
       ``loss_weight * mean_b ||M(h_b) - s t_b||^2``, and :attr:`last_sg_loss` holds its value.

    ``M`` predicts ``s * dL/dh`` with ``s = gradient_scale`` and the part below receives
    ``M / s``. The scale changes nothing for the layers below, but lets ``M`` learn targets of
    order one: with a loss averaged over a batch of ``B`` the true gradient of one example is
    ``O(1/B)``, so ``gradient_scale=B`` (the per-example gradient) suits the usual SG learning
    rates. Our MNIST sweep needed an SG learning rate about ``B`` times smaller without it.

    The SG parameters are not stepped here: give them to an optimizer of their own. In eval
    mode, or with grad disabled, the interface is the identity.
    """

    def __init__(self, synthetic_gradient: nn.Module, *, loss_weight: float = 1.0, gradient_scale: float = 1.0):
        super().__init__()
        self.synthetic_gradient = synthetic_gradient
        self.loss_weight = check_positive("loss_weight", float(loss_weight))
        self.gradient_scale = check_positive("gradient_scale", float(gradient_scale))
        self.last_sg_loss: Optional[Tensor] = None

    def forward(self, h: Tensor, context: Optional[Tensor] = None) -> Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return h
        if not isinstance(h, Tensor):
            raise TypeError(f"h: expected a torch.Tensor, got {type(h).__name__}")
        # An SG model without context may be any module taking h alone (e.g. an oracle in tests).
        args = (h.detach(),) if context is None else (h.detach(), context)
        prediction = self.synthetic_gradient(*args)
        if prediction.shape != h.shape:
            raise ValueError(
                f"synthetic_gradient: returned shape {tuple(prediction.shape)} for h of shape {tuple(h.shape)}"
            )
        if h.requires_grad:
            h.backward(prediction.detach() / self.gradient_scale)
        if not prediction.requires_grad:  # an SG without trainable parameters (e.g. an oracle)
            return h.detach().requires_grad_()
        return _RegressOnArrivingGradient.apply(h.detach(), prediction, self)

    def extra_repr(self) -> str:
        return f"loss_weight={self.loss_weight}, gradient_scale={self.gradient_scale}"
