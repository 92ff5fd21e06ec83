"""An MLP trained with a synthetic gradient after every hidden layer, each layer step run by the fused ops."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import ops
from .._checks import check_int, check_positive
from ..reference.activations import activate, check_activation
from .decoupled import (SG_TARGETS, DecoupledTrainer, LossFunction, OptimizerFactory, StepResult, block_optimizers,
                        default_optimizer, step_optimizer)
from .synthetic_gradient import SyntheticGradient


class DecoupledMLP(DecoupledTrainer):
    """``in -> [Linear -> (BatchNorm ->) act -> SG] x len(hidden) -> Linear -> out``, stepped by :mod:`fastdni.ops`.

    The same training as :class:`DecoupledSequential` over ``Linear + act`` blocks, layer by layer in
    three fused ops: :func:`~fastdni.ops.dni_forward` (``h`` and the SG prediction),
    :func:`~fastdni.ops.dni_update_` (the layer's optimizer step on the synthetic gradient, and ``dx``,
    the bootstrapped target of the SG below) and :func:`~fastdni.ops.sg_regression_` (the SG's step
    towards its target). The output layer learns from the true gradient of the loss, which is also the
    top SG's target. Optimizers are ordinary ``torch.optim.Adam``, ``AdamW`` or ``SGD`` objects: the ops
    read their hyper-parameters and update their state in place, so ``optimizer_state_dict`` and
    checkpoints work as usual.

    With ``batch_norm=True`` each hidden layer is ``Linear -> BatchNorm1d -> act`` (the paper's FCN; the same
    training as :class:`DecoupledSequential` over ``nn.Sequential(Linear, BatchNorm1d, act)`` blocks): in training the
    layer step is ``dni_forward`` (the GEMM, identity) -> :func:`~fastdni.ops.batch_norm_act` (batch statistics,
    the running statistics copied into the ``BatchNorm1d``'s buffers) -> :func:`~fastdni.ops.sg_predict`, then
    :func:`~fastdni.ops.batch_norm_act_update_` (gamma, beta stepped; ``dL/dpre``) -> ``dni_update_`` (``W``, ``b``
    stepped; ``dx``) -> ``sg_regression_``. Each hidden layer's optimizer holds ``W, b, gamma, beta`` (one param
    group, in ``nn.Sequential(Linear, BatchNorm1d).parameters()``'s order). In eval mode the normalisation uses the
    running statistics (``F.batch_norm``, then the activation: no fused step). ``norms[i]`` holds layer ``i``'s
    ``BatchNorm1d`` (gamma, beta, running statistics: in the ``state_dict``).

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
        batch_norm: a ``BatchNorm1d`` between each hidden layer's GEMM and its activation.
        bn_momentum, bn_eps: the ``BatchNorm1d``'s ``momentum`` (a number: the cumulative average, ``None``, is not
            supported) and ``eps``.
        sg_targets: ``"bootstrap"`` or ``"true"``, as in :class:`DecoupledSequential`. With ``"true"`` every layer's
            forward keeps its autograd graph (the ops are differentiable) so that the loss's gradient is carried down
            as input gradients before any weight moves; each SG is regressed onto it, then every layer steps from
            its SG's prediction (``dni_update_`` without ``dx``).
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
        batch_norm: bool = False,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        sg_targets: str = "true",
    ):
        super().__init__()
        if sg_targets not in SG_TARGETS:
            raise ValueError(f"sg_targets: expected one of {SG_TARGETS}, got {sg_targets!r}")
        self.sg_targets = sg_targets
        hidden = tuple(hidden)
        for name, value in (("in_features", in_features), ("out_features", out_features), *(("hidden", h) for h in hidden)):
            check_int(name, value, 1)
        if not hidden:
            raise ValueError("hidden: expected at least one hidden layer (each gets a synthetic gradient)")
        check_activation(activation)
        sizes = (in_features, *hidden, out_features)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:]))
        if batch_norm:
            if not isinstance(bn_momentum, (int, float)) or not 0.0 <= bn_momentum <= 1.0:
                raise ValueError(f"bn_momentum: expected a number in [0, 1], got {bn_momentum!r}")
            check_positive("bn_eps", float(bn_eps))
            self.norms: Optional[nn.ModuleList] = nn.ModuleList(
                nn.BatchNorm1d(h, eps=float(bn_eps), momentum=float(bn_momentum)) for h in hidden)
        else:
            self.norms = None
        self.synthetic_gradients = nn.ModuleList(SyntheticGradient(h, sg_hidden, context_features) for h in hidden)
        self.activation = activation
        self.sg_loss_weight = check_positive("sg_loss_weight", float(sg_loss_weight))
        self.gradient_scale = check_positive("gradient_scale", float(gradient_scale))
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend: expected one of {ops.BACKENDS}, got {backend!r}")
        self.backend = backend
        self.mode = mode
        if self.norms is None:
            self.optimizers = block_optimizers(self.layers, optimizer, head_optimizer)
        else:  # one optimizer per hidden layer over W, b, gamma, beta (DecoupledSequential's per-block optimizer)
            self.optimizers = [optimizer([*layer.parameters(), *norm.parameters()])
                               for layer, norm in zip(self.layers, self.norms)]
            self.optimizers.append((head_optimizer or optimizer)(self.layers[-1].parameters()))
        self.sg_optimizers = [(sg_optimizer or optimizer)(sg.parameters()) for sg in self.synthetic_gradients]

    def forward(self, x: Tensor) -> Tensor:
        """The network's output (differentiable: backprop mode trains through it)."""
        h = x
        for i, layer in enumerate(self.layers[:-1]):
            if self.norms is None:
                h = ops.dni_forward(h, layer.weight, layer.bias, activation=self.activation, backend=self.backend).h
            else:
                pre = ops.dni_forward(h, layer.weight, layer.bias, activation="identity", backend=self.backend).h
                h = self._normalise(i, pre).h
        return self.layers[-1](h)

    def _normalise(self, i: int, pre: Tensor) -> ops.BatchNormResult:
        return normalise(self.norms[i], pre, self.activation, self.backend)

    def _dni_step(self, x: Tensor, target: Tensor, loss_fn: LossFunction, context: Optional[Tensor]) -> StepResult:
        if self.sg_targets == "true":
            return self._true_target_step(x, target, loss_fn, context)
        sg_losses: list[Optional[Tensor]] = [None] * len(self.synthetic_gradients)
        below = None  # (SG index, the forward whose prediction awaits a target; its h is the SG's input)
        h = x.detach()
        with torch.no_grad():
            for i, (layer, sg) in enumerate(zip(self.layers, self.synthetic_gradients)):
                if self.norms is not None:
                    dx, forward = self._bn_layer_step(i, h, context, need_input_grad=below is not None)
                else:
                    forward = ops.dni_forward(h, layer.weight, layer.bias, sg.reference_params(), context,
                                              activation=self.activation, backend=self.backend)
                    dx = self._layer_update(i, h, forward, need_input_grad=below is not None)
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

    def _true_target_step(self, x: Tensor, target: Tensor, loss_fn: LossFunction, context: Optional[Tensor]) -> StepResult:
        """``sg_targets="true"``: differentiable forwards (each layer from a detached input), the true gradient carried
        down and regressed onto at every SG, then the layers' fused steps from their SGs' predictions."""
        inputs, outputs, forwards = [], [], []
        h = x.detach()
        for i, (layer, sg) in enumerate(zip(self.layers, self.synthetic_gradients)):
            h = h.detach().requires_grad_(i > 0)
            inputs.append(h)
            if self.norms is None:
                forward = ops.dni_forward(h, layer.weight, layer.bias, sg.reference_params(), context,
                                          activation=self.activation, backend=self.backend)
                out = forward.h
            else:
                pre = ops.dni_forward(h, layer.weight, layer.bias, activation="identity", backend=self.backend).h
                normed = self._normalise(i, pre)
                out = normed.h
                with torch.no_grad():
                    forward = (normed, ops.sg_predict(out.detach(), sg.reference_params(), context, backend=self.backend))
            outputs.append(out)
            forwards.append(_detached(forward))
            h = out
        h_top = h.detach().requires_grad_()
        output = self.layers[-1](h_top)
        loss = loss_fn(output, target)
        loss.backward()  # the true gradient: the output layer's, and the top SG's target
        true, sg_losses = h_top.grad, [None] * len(forwards)
        for i in reversed(range(len(forwards))):
            below = torch.autograd.grad(outputs[i], inputs[i], true)[0] if i > 0 else None
            with torch.no_grad():
                sg_losses[i] = self._regress(i, forwards[i] if self.norms is None else forwards[i][1], true, context)
            true = below
        with torch.no_grad():
            for i, forward in enumerate(forwards):
                if self.norms is None:
                    self._layer_update(i, inputs[i].detach(), forward, need_input_grad=False)
                else:
                    self._bn_layer_update(i, inputs[i].detach(), *forward, need_input_grad=False)
        step_optimizer(self.optimizers[-1])
        return StepResult(loss.detach(), output.detach(), tuple(sg_losses))

    def _layer_update(self, i: int, x: Tensor, forward: ops.ForwardResult, *, need_input_grad: bool) -> Tensor:
        """Hidden layer ``i`` without BatchNorm: ``W``, ``b`` stepped on its SG's prediction; ``dx`` or empty."""
        layer = self.layers[i]
        return ops.fused_step(self.optimizers[i], [layer.weight, layer.bias], ops.dni_update_, x, layer.weight,
                              layer.bias, forward, grad_scale=self.gradient_scale, activation=self.activation,
                              need_input_grad=need_input_grad, backend=self.backend)

    def _bn_layer_step(self, i: int, x: Tensor, context: Optional[Tensor], *,
                       need_input_grad: bool) -> tuple[Tensor, ops.Prediction]:
        """Hidden layer ``i`` with BatchNorm: forward, SG prediction, the steps of gamma, beta (from the prediction)
        and ``W``, ``b`` (from ``dL/dpre``); returns ``dx`` (empty without ``need_input_grad``) and the prediction."""
        layer = self.layers[i]
        pre = ops.dni_forward(x, layer.weight, layer.bias, activation="identity", backend=self.backend).h
        normed = self._normalise(i, pre)
        predicted = ops.sg_predict(normed.h, self.synthetic_gradients[i].reference_params(), context, backend=self.backend)
        return self._bn_layer_update(i, x, normed, predicted, need_input_grad=need_input_grad), predicted

    def _bn_layer_update(self, i: int, x: Tensor, normed: ops.BatchNormResult, predicted: ops.Prediction, *,
                         need_input_grad: bool) -> Tensor:
        """The steps of gamma, beta (from the SG's prediction) and ``W``, ``b`` (from ``dL/dpre``); ``dx`` or empty."""
        layer, norm = self.layers[i], self.norms[i]
        grad_pre = step_batch_norm(self.optimizers[i], norm, normed, predicted.prediction, grad_scale=self.gradient_scale,
                                   activation=self.activation, backend=self.backend)
        return step_on_delta(self.optimizers[i], [layer.weight, layer.bias], x, grad_pre, need_input_grad=need_input_grad,
                             backend=self.backend)

    def _regress(self, index: int, forward: Union[ops.ForwardResult, ops.Prediction], target: Tensor, context: Optional[Tensor]) -> Tensor:
        sg = self.synthetic_gradients[index].reference_params()
        return ops.fused_step(self.sg_optimizers[index], ops.ordered_params(sg), ops.sg_regression_,
                              forward, target, sg, context=context, target_scale=self.gradient_scale,
                              loss_weight=self.sg_loss_weight, backend=self.backend)

    def extra_repr(self) -> str:
        norm = ", batch_norm=True" if self.norms is not None else ""
        return f"activation={self.activation!r}, mode={self.mode!r}, backend={self.backend!r}{norm}"


def _detached(result):
    """A forward's NamedTuple (or a tuple of them) with every tensor detached: what the in-place update ops take."""
    if isinstance(result, Tensor):
        return result.detach()
    if isinstance(result, list):
        return [_detached(r) for r in result]
    if hasattr(result, "_fields"):
        return type(result)(*(_detached(r) for r in result))
    return tuple(_detached(r) for r in result)


def normalise(norm: nn.Module, pre: Tensor, activation: str, backend: str) -> ops.BatchNormResult:
    """``act(BatchNorm(pre))`` over the rows of ``pre`` ``[rows, N]`` with ``norm``'s gamma, beta and statistics: the batch
    statistics in training (the running ones updated in ``norm``'s buffers), the running statistics in eval mode (a
    plain composition; only ``h`` is set then). A ``BatchNorm2d`` over channels-last rows ``[B*H*W, C]`` is the same
    math as over its map (statistics over batch and positions)."""
    if not norm.training:
        y = torch.nn.functional.batch_norm(pre, norm.running_mean, norm.running_var, norm.weight, norm.bias,
                                           False, 0.0, norm.eps)
        return ops.BatchNormResult(activate(y, activation), pre.new_empty(0), pre.new_empty(0),
                                   norm.running_mean, norm.running_var)
    out = ops.batch_norm_act(pre, norm.weight, norm.bias, norm.running_mean, norm.running_var, momentum=norm.momentum,
                             eps=norm.eps, activation=activation, backend=backend)
    with torch.no_grad():  # the op is functional (differentiable): the buffers take its new statistics here
        norm.running_mean.copy_(out.running_mean)
        norm.running_var.copy_(out.running_var)
        norm.num_batches_tracked.add_(1)
    return out


def step_batch_norm(optimizer: torch.optim.Optimizer, norm: nn.Module, normed: ops.BatchNormResult, prediction: Tensor, *,
                    grad_scale: float, activation: str, backend: str) -> Tensor:
    """Step ``norm``'s gamma and beta on the synthetic gradient ``prediction / grad_scale`` of ``normed.h``; returns
    ``dL/dpre`` (from their pre-update values), the delta of the GEMM under the norm."""
    return ops.fused_step(optimizer, [norm.weight, norm.bias], ops.batch_norm_act_update_, norm.weight, norm.bias, normed,
                          prediction, grad_scale=grad_scale, activation=activation, backend=backend)


def step_on_delta(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], x: Tensor, delta: Tensor, *,
                  need_input_grad: bool, backend: str, weight_operand: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Step a GEMM's ``params = [weight, bias]`` on its delta ``dL/dpre`` ``[rows, N]`` for the input ``x`` ``[rows, K]``
    (``dW = delta^T x``, ``db = sum_rows delta``, the optimizer in the op's epilogue); returns ``dx`` (empty without
    ``need_input_grad``). ``weight_operand`` views a weight of another shape (a conv's ``[N, C, k, k]`` over unfolded
    input) as the op's ``[N, K]``, the optimizer's state alike (:func:`fused_step_on_views`)."""
    weight, bias = params
    # dni_update_ with identity and scale 1 takes the delta as its "prediction".
    forward = ops.ForwardResult(delta, delta.new_empty(0), delta, [])
    operand = weight_operand(weight) if weight_operand else weight
    return fused_step_on_views(optimizer, params, [weight_operand, None], ops.dni_update_, x, operand, bias, forward,
                               activation="identity", need_input_grad=need_input_grad, backend=backend)


def fused_step_on_views(optimizer: torch.optim.Optimizer, params: Sequence[Tensor],
                        operands: Sequence[Optional[Callable[[Tensor], Tensor]]], op, *args, **kwargs):
    """:func:`fastdni.ops.fused_step` for an op that takes ``params[i]`` as ``operands[i](params[i])`` (a view: a conv
    weight as a GEMM's ``[N, K]``; None: as it is): the optimizer's state, kept in the parameters' shapes (its
    ``state_dict`` unchanged), is passed through the same views, so the op's in-place steps land in both."""
    name, hyper, state = ops.fused_optimizer_args(optimizer, params)
    per = max(1, len(state) // len(params))
    state = [s if operands[j // per] is None else operands[j // per](s) for j, s in enumerate(state)]
    result = op(*args, name, hyper, state, **kwargs)
    ops.advance(optimizer, params)
    return result
