"""An MLP trained with a synthetic gradient after every hidden layer, each layer step run by the fused ops."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .. import ops
from .._checks import check_int, check_positive
from ..reference.activations import check_activation
from .decoupled import (DecoupledTrainer, LossFunction, OptimizerFactory, StepResult, block_optimizers, default_optimizer,
                        step_optimizer)
from .synthetic_gradient import SyntheticGradient


class DecoupledMLP(DecoupledTrainer):
    """``in -> [Linear -> act -> SG] x len(hidden) -> Linear -> out``, stepped by :mod:`fastdni.ops`.

    The same training as :class:`DecoupledSequential` over ``Linear + act`` blocks, layer by layer in
    three fused ops: :func:`~fastdni.ops.dni_forward` (``h`` and the SG prediction),
    :func:`~fastdni.ops.dni_update_` (the layer's optimizer step on the synthetic gradient, and ``dx``,
    the bootstrapped target of the SG below) and :func:`~fastdni.ops.sg_regression_` (the SG's step
    towards its target). The output layer learns from the true gradient of the loss, which is also the
    top SG's target. Optimizers are ordinary ``torch.optim.Adam``, ``AdamW`` or ``SGD`` objects: the ops
    read their hyper-parameters and update their state in place, so ``optimizer_state_dict`` and
    checkpoints work as usual.

    Args:
        in_features, hidden, out_features: layer sizes.
        activation: of the hidden layers: ``"identity"``, ``"relu"``, ``"tanh"``, ``"gelu"`` or
            ``"leaky_relu"`` (``fastdni.contract.ACTIVATIONS``).
        sg_hidden: hidden sizes of every SG model (``()``: linear, as cDNI in the paper).
        context_features: cDNI: the SG models also see a context (e.g. the labels, ``[B]`` ints).
        optimizer, sg_optimizer: build each layer's / SG model's optimizer from its parameters.
        head_optimizer: the output layer's (default ``optimizer``); it learns from the true gradient.
        mode: ``"dni"`` or ``"backprop"`` (the same layers by ordinary backprop, for comparison).
        sg_loss_weight, gradient_scale: as in :class:`DNI`.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"`` (see :mod:`fastdni.ops`).
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int,
        *,
        activation: str = "relu",
        sg_hidden: Sequence[int] = (),
        context_features: int = 0,
        optimizer: OptimizerFactory = default_optimizer,
        sg_optimizer: Optional[OptimizerFactory] = None,
        head_optimizer: Optional[OptimizerFactory] = None,
        mode: str = "dni",
        sg_loss_weight: float = 1.0,
        gradient_scale: float = 1.0,
        backend: str = "auto",
    ):
        super().__init__()
        hidden = tuple(hidden)
        for name, value in (("in_features", in_features), ("out_features", out_features), *(("hidden", h) for h in hidden)):
            check_int(name, value, 1)
        if not hidden:
            raise ValueError("hidden: expected at least one hidden layer (each gets a synthetic gradient)")
        check_activation(activation)
        sizes = (in_features, *hidden, out_features)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:]))
        self.synthetic_gradients = nn.ModuleList(SyntheticGradient(h, sg_hidden, context_features) for h in hidden)
        self.activation = activation
        self.sg_loss_weight = check_positive("sg_loss_weight", float(sg_loss_weight))
        self.gradient_scale = check_positive("gradient_scale", float(gradient_scale))
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend: expected one of {ops.BACKENDS}, got {backend!r}")
        self.backend = backend
        self.mode = mode
        self.optimizers = block_optimizers(self.layers, optimizer, head_optimizer)
        self.sg_optimizers = [(sg_optimizer or optimizer)(sg.parameters()) for sg in self.synthetic_gradients]

    def forward(self, x: Tensor) -> Tensor:
        """The network's output (differentiable: backprop mode trains through it)."""
        h = x
        for layer in self.layers[:-1]:
            h = ops.dni_forward(h, layer.weight, layer.bias, activation=self.activation, backend=self.backend).h
        return self.layers[-1](h)

    def _dni_step(self, x: Tensor, target: Tensor, loss_fn: LossFunction, context: Optional[Tensor]) -> StepResult:
        sg_losses: list[Optional[Tensor]] = [None] * len(self.synthetic_gradients)
        below = None  # (SG index, the forward whose prediction awaits a target; its h is the SG's input)
        h = x.detach()
        with torch.no_grad():
            for i, (layer, sg) in enumerate(zip(self.layers, self.synthetic_gradients)):
                forward = ops.dni_forward(h, layer.weight, layer.bias, sg.reference_params(), context,
                                          activation=self.activation, backend=self.backend)
                dx = ops.fused_step(self.optimizers[i], [layer.weight, layer.bias], ops.dni_update_,
                                    h, layer.weight, layer.bias, forward, grad_scale=self.gradient_scale,
                                    activation=self.activation, need_input_grad=below is not None, backend=self.backend)
                if below is not None:  # dx: the bootstrapped target of the SG below
                    sg_losses[below[0]] = self._regress(*below, dx, context)
                below, h = (i, forward), forward.h
        h_top = h.requires_grad_()
        output = self.layers[-1](h_top)
        loss = loss_fn(output, target)
        loss.backward()  # the true gradient: the output layer's, and the top SG's target
        step_optimizer(self.optimizers[-1])
        with torch.no_grad():
            sg_losses[below[0]] = self._regress(*below, h_top.grad, context)
        return StepResult(loss.detach(), output.detach(), tuple(sg_losses))

    def _regress(self, index: int, forward: ops.ForwardResult, target: Tensor, context: Optional[Tensor]) -> Tensor:
        sg = self.synthetic_gradients[index].reference_params()
        return ops.fused_step(self.sg_optimizers[index], ops.ordered_params(sg), ops.sg_regression_,
                              forward, target, sg, context=context, target_scale=self.gradient_scale,
                              loss_weight=self.sg_loss_weight, backend=self.backend)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, mode={self.mode!r}, backend={self.backend!r}"
