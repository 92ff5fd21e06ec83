"""The decoupled neural interface: cut a model's graph at an activation and feed the part
below a synthetic gradient at once (update unlocking)."""
from __future__ import annotations

import contextlib
import math
import operator
import warnings
from typing import Callable, Iterable, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from .. import ops
from .._checks import check_positive
from ..reference import SGParams
from .synthetic_gradient import SyntheticGradient

#: What ``DNI(optimizer=...)`` takes: the SG model's optimizer, or a factory building it from the SG's parameters.
SGOptimizer = Union[torch.optim.Optimizer, Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]]

#: The divergence check of the SG regression: past twice this many regressions (the first are a transient), warn
#: once when the running mean of
#: ``||M - s t||^2 / ||s t||^2`` is above the limit (M's error over 3x its target's norm: the SG feeds the layers
#: below more noise than signal) or when the loss is not finite.
DIVERGENCE_WARMUP, DIVERGENCE_LIMIT, DIVERGENCE_DECAY = 100, 10.0, 0.99
DIVERGENCE_CHECK_EVERY = 25  # regressions between host reads of the running means (one device sync each)


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
    def forward(ctx, h: Tensor, prediction: Tensor, interface: nn.Module, scale: Optional[float] = None) -> Tensor:
        ctx.save_for_backward(prediction)
        ctx.interface = interface
        ctx.scale = interface.gradient_scale if scale is None else scale  # a per-call scale (DNI's "batch")
        return h.view_as(h)

    @staticmethod
    def backward(ctx, target: Tensor):
        (prediction,) = ctx.saved_tensors
        interface = ctx.interface
        scaled = ctx.scale * target
        error = prediction - scaled
        batch = prediction.shape[0]
        squared = (error * error).sum().detach()
        interface.last_sg_loss = interface.loss_weight * squared / batch
        _watch_divergence(interface, squared, (scaled * scaled).sum().detach())
        _observe(interface, prediction, scaled, 1.0)
        return None, error * (2.0 * interface.loss_weight / batch), None, None


class _RegressFusedOnArrivingGradient(torch.autograd.Function):
    """:class:`_RegressOnArrivingGradient` on the fused ops: identity on ``h`` (detached, made to require grad so
    that the backward runs) whose backward regresses the SG onto ``s t`` and steps its optimizer in one
    :func:`fastdni.ops.sg_regression_`, from the prediction and hidden activations :func:`fastdni.ops.sg_predict`
    kept. Nothing flows on into the SG parameters: they have been stepped, and get no ``.grad``."""

    @staticmethod
    def forward(ctx, h: Tensor, interface: nn.Module, predicted: "ops.Prediction", context: Optional[Tensor],
                scale: float) -> Tensor:
        ctx.interface, ctx.predicted, ctx.context, ctx.scale = interface, predicted, context, scale
        return h.view_as(h)

    @staticmethod
    def backward(ctx, target: Tensor):
        interface, predicted = ctx.interface, ctx.predicted
        ctx.predicted = None  # one regression per prediction; free it now
        flat = target.reshape(predicted.h.shape)  # a view where the arriving gradient is contiguous
        _observe(interface, predicted.prediction, flat, ctx.scale)  # before the op: it may reuse the prediction
        loss = interface._fused_regression(predicted, flat, ctx.context, ctx.scale)
        interface.last_sg_loss = loss
        batch = flat.shape[0]
        # The watch's sums, as the autograd path forms them: ||M - s t||^2 from the op's loss, ||s t||^2 one reduction.
        _watch_divergence(interface, loss * (batch / interface.loss_weight), (flat * flat).sum() * ctx.scale ** 2)
        return None, None, None, None, None


def _observe(interface: nn.Module, prediction: Tensor, target: Tensor, scale: float) -> None:
    """Hand a regression's prediction and its target ``scale * target`` to an interface that calibrates its SG
    (TruncationDNI's ``calibrate``)."""
    if getattr(interface, "calibrate", False):
        with torch.no_grad():
            interface._observe_regression(prediction.detach(), target.detach() * scale)


def _watch_divergence(interface: nn.Module, squared_error: Tensor, squared_target: Tensor) -> None:
    """Warn once per interface when its SG regression diverges (see ``DIVERGENCE_LIMIT``).

    The running means and a count of non-finite losses stay on the loss's device; the host reads them (one
    transfer) at the first regression and every ``DIVERGENCE_CHECK_EVERY`` after, not at every step."""
    if getattr(interface, "_divergence_warned", False):
        return
    calls = getattr(interface, "_regressions", 0) + 1
    interface._regressions = calls
    pair = torch.stack((squared_error, squared_target)).double()
    bad = (~torch.isfinite(pair)).sum()
    interface._nonfinite = bad if calls == 1 else interface._nonfinite + bad
    if calls > DIVERGENCE_WARMUP:  # past the start-up transient of a zero-initialised SG
        # Running means of the error and of the target, then their ratio: robust to a few tiny targets.
        means = getattr(interface, "_regression_means", None)
        d = DIVERGENCE_DECAY
        interface._regression_means = pair if means is None else d * means + (1 - d) * pair
    if calls > 1 and calls % DIVERGENCE_CHECK_EVERY:
        return
    means = getattr(interface, "_regression_means", pair)
    # One transfer: the running means, the non-finite count, and this regression's loss (named if it is the bad one).
    error, target, nonfinite, current = torch.cat((means, interface._nonfinite.reshape(1).double(), pair[:1])).tolist()
    reason = None
    if nonfinite or not math.isfinite(error):
        reason = (f"the SG regression loss is {current}" if not math.isfinite(current)
                  else f"the SG regression loss was not finite in one of the last {DIVERGENCE_CHECK_EVERY} regressions")
    elif calls >= 2 * DIVERGENCE_WARMUP and target > 0 and error / target > DIVERGENCE_LIMIT:
        reason = (f"the SG's squared error is {error / target:.3g}x its target's (running mean over the last ~100 "
                  f"regressions): it feeds the layers below more noise than signal")
    if reason is not None:
        interface._divergence_warned = True
        warnings.warn(f"{type(interface).__name__}: {reason}. Lower the SG learning rate, check gradient_scale, "
                      f"or use a smaller SG model.", RuntimeWarning, stacklevel=2)


# Outside a graph the ops' Python autograd formula (ops/registration.py) only redispatches: skip it there.
_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", contextlib.nullcontext)


def _predict_direct(flat: Tensor, params: SGParams) -> "ops.Prediction":
    """``ops.sg_predict`` of an SG without context on the C++ kernels: without the wrapper's checks (the kernel runs
    them) and below autograd; under ``no_grad``."""
    with _below_autograd():
        prediction, hidden = torch.ops.fastdni.sg_predict(flat, list(params.weights), list(params.biases), None, None)
    return ops.Prediction(flat, prediction, list(hidden))


def _regress_direct(plan: "_FusedPlan", optimizer: torch.optim.Optimizer, predicted: "ops.Prediction", target: Tensor,
                    scale: float, loss_weight: float) -> Tensor:
    """``ops.fused_step(optimizer, ..., ops.sg_regression_, ...)`` of an SG without context on the C++ kernels: without
    the wrapper's checks (the kernel runs them), with the plan's param group."""
    params = plan.key.params
    name, hyper, state = ops.fused_optimizer_args(optimizer, plan.key.ordered, plan.group)
    with torch.no_grad():
        loss = torch.ops.fastdni.sg_regression_(predicted.h, list(predicted.sg_hidden), predicted.prediction, target,
                                                list(params.weights), list(params.biases), None, None, state, name,
                                                hyper, float(scale), float(loss_weight))
    ops.advance(optimizer, plan.key.ordered)
    return loss


class _FusionKey(NamedTuple):
    """What a fusion verdict depends on (:meth:`FusedSG._fusion_key`), and the parameters it was read from."""

    objects: tuple  #: compared by identity: the SG, its optimizer, the SG's parameters, the optimizer's groups
    values: tuple  #: compared by value: backend, h's dtype, device, feature count, the parameters' flags, the groups'
    params: SGParams  #: the SG's parameters in the ops' layout (aliased)
    ordered: list[Tensor]  #: the same in the order of the ops' optimizer state


class _FusedPlan(NamedTuple):
    """A fused verdict of :meth:`FusedSG.fusion_blocker` and what the fused calls reuse while it holds."""

    key: _FusionKey
    group: dict  #: the optimizer's param group of the SG's parameters (ops.check_fusable_optimizer passed)
    #: call torch.ops.fastdni directly (_predict_direct, _regress_direct): the C++ kernels run, and check what the
    #: Python wrappers would but the context (so only for an SG without one)
    direct: bool

    def holds_for(self, key: _FusionKey) -> bool:
        return self.key.values == key.values and len(self.key.objects) == len(key.objects) and all(
            map(operator.is_, self.key.objects, key.objects))


class FusedSG:
    """The fused SG step of an interface (:class:`DNI`, :class:`~fastdni.nn.TruncationDNI`) that holds its SG model
    (``synthetic_gradient``) and, optionally, that model's optimizer: when and how the ops replace autograd."""

    synthetic_gradient: nn.Module

    def _init_fused_sg(self, optimizer: Optional[SGOptimizer], backend: str) -> None:
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            if not callable(optimizer):
                raise TypeError(f"optimizer: expected a torch.optim.Optimizer, a factory of one, or None, got "
                                f"{type(optimizer).__name__}")
            optimizer = optimizer(self.synthetic_gradient.parameters())
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(f"optimizer: the factory returned {type(optimizer).__name__}, not a torch.optim.Optimizer")
        self.optimizer: Optional[torch.optim.Optimizer] = optimizer
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend: expected one of {ops.BACKENDS}, got {backend!r}")
        self.backend = backend
        self.fused = False  #: whether the last training call ran the fused ops
        self._fused_plan: Optional[_FusedPlan] = None  # the kept fused verdict (fusion_blocker)

    # Run as Python under torch.compile: Dynamo, tracing a read of a torch.optim param group, sets the group's
    # capturable=True, which the fused ops reject (the interface then fell back to autograd, the user's optimizer
    # changed). One graph break, where the interface breaks anyway (h.backward).
    @torch.compiler.disable
    def fusion_blocker(self, h: Tensor, context: Optional[Tensor] = None) -> Optional[str]:
        """Why a training call on ``h`` would run the SG by autograd instead of the fused ops; None where it runs fused.

        A fused verdict is kept, and the checks run again only when something it depends on changed
        (:meth:`_fusion_key`): an SG parameter frozen or replaced, the optimizer swapped or given an option the ops
        cannot run, an ``h`` of another dtype, device or feature count."""
        plan = self._fused_plan_for(h)
        return plan if isinstance(plan, str) else None

    def _fused_plan_for(self, h: Tensor) -> Union["_FusedPlan", str]:
        """The kept plan while its key holds for ``h``, else the checks again: a new plan, or why the call cannot fuse
        (not kept: such a call takes the autograd path, which costs far more than the checks)."""
        key = self._fusion_key(h)
        plan = self._fused_plan
        if key is not None and plan is not None and plan.holds_for(key):
            return plan
        reason = self._check_fusion(h)
        if reason is not None:
            self._fused_plan = None
            return reason
        group = ops.check_fusable_optimizer(self.optimizer, key.ordered)  # passed in _check_fusion
        direct = key.params.context_weight is None and ops.runs_cpp_kernels(self.backend, h.device)
        self._fused_plan = _FusedPlan(key, group, direct)
        return self._fused_plan

    def _fusion_key(self, h: Tensor) -> Optional["_FusionKey"]:
        """What the fusion verdict on ``h`` reads that a user can change between calls; None where it is no at once
        (no optimizer, not a :class:`SyntheticGradient`)."""
        sg, opt = self.synthetic_gradient, self.optimizer
        if opt is None or not isinstance(sg, SyntheticGradient):
            return None
        params = sg.reference_params()
        ordered = ops.ordered_params(params)
        opt_objects, opt_values = ops.fusable_optimizer_key(opt)
        objects = (sg, opt, *ordered, *opt_objects)
        # h by its feature count (DNI checks a map [B, C, H, W], its regression the flattened [B, C*H*W]).
        values = (self.backend, h.dtype, h.device, h.dim() > 1, h.shape[1:].numel(),
                  *((p.requires_grad, p.dtype, p.device) for p in ordered), opt_values)
        return _FusionKey(objects, values, params, ordered)

    def _check_fusion(self, h: Tensor) -> Optional[str]:
        """:meth:`fusion_blocker`'s checks, all of them."""
        sg = self.synthetic_gradient
        if self.optimizer is None:
            return "no SG optimizer was given"
        if not isinstance(sg, SyntheticGradient) or type(sg).forward is not SyntheticGradient.forward:
            return f"the SG model is a {type(sg).__name__}; the ops run SyntheticGradient's"
        params = list(sg.parameters())
        if not all(p.requires_grad for p in params):
            return "some SG parameters are frozen (requires_grad=False)"
        like = sg.layers[0].weight
        if h.dtype != like.dtype or h.device != like.device:
            return f"h ({h.dtype}, {h.device}) is not like the SG's parameters ({like.dtype}, {like.device})"
        if h.dim() < 2 or math.prod(h.shape[1:]) != sg.features:
            return f"h of shape {tuple(h.shape)} does not have the SG's {sg.features} features"
        reason = ops.fused_backend_blocker(self.backend, h.device, h.dtype)
        if reason is not None:
            return reason
        try:
            ops.check_fusable_optimizer(self.optimizer, ops.ordered_params(sg.reference_params()))
        except (TypeError, ValueError) as error:
            return str(error)
        return None

    def _fused_regression(self, predicted: "ops.Prediction", target: Tensor, context: Optional[Tensor],
                          scale: float) -> Tensor:
        """``sg_regression_`` and the optimizer's step for a prediction of :meth:`_predict_fused`: on the kept plan
        where it still holds (the optimizer not checked again), else checked as a plain ``ops.fused_step`` (an option
        the ops cannot run, set since the prediction, raises there)."""
        plan = self._fused_plan_for(predicted.h)
        if isinstance(plan, str):
            params = self.synthetic_gradient.reference_params()
            return ops.fused_step(self.optimizer, ops.ordered_params(params), ops.sg_regression_, predicted, target,
                                  params, context=context, target_scale=scale, loss_weight=self.loss_weight,
                                  backend=self.backend)
        if plan.direct and context is None:
            return _regress_direct(plan, self.optimizer, predicted, target, scale, self.loss_weight)
        return ops.fused_step(self.optimizer, plan.key.ordered, ops.sg_regression_, predicted, target, plan.key.params,
                              context=context, target_scale=scale, loss_weight=self.loss_weight, backend=self.backend,
                              group=plan.group)

    # Run as Python under torch.compile, as fusion_blocker: the kept plan holds the optimizer.
    @torch.compiler.disable
    def _predict_fused(self, flat: Tensor, context: Optional[Tensor]) -> "ops.Prediction":
        """``sg_predict`` on ``flat`` ``[B, features]``, outside any graph; called where :meth:`fusion_blocker` has
        just said fused for ``flat`` (its kept plan is then current)."""
        plan = self._fused_plan
        with torch.no_grad():
            if plan is not None and plan.direct and context is None:
                return _predict_direct(flat, plan.key.params)
            return ops.sg_predict(flat, self.synthetic_gradient.reference_params(), context, backend=self.backend)

    def _fused_extra_repr(self) -> str:
        return "" if self.optimizer is None else f", optimizer={type(self.optimizer).__name__}, backend={self.backend!r}"


class DNI(FusedSG, nn.Module):
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

    ``M`` predicts ``s * dL/dh`` and the part below receives ``M / s``. The scale changes nothing
    for the layers below, but lets ``M`` learn targets of order one: with a loss averaged over a
    batch of ``B`` the true gradient of one example is ``O(1/B)``, so ``s = B`` (the per-example
    gradient) suits the usual SG learning rates; our MNIST sweep needed an SG learning rate about
    ``B`` times smaller without it. ``gradient_scale="batch"`` (the default) takes ``s`` from each
    call, ``h.shape[0]``: a user never passes it, and a last, smaller batch is scaled right. A
    number fixes ``s`` (``1``: ``M`` predicts the gradient itself, for a loss summed over the batch).

    A warning (``RuntimeWarning``, once) says when the regression diverges: its loss is not finite,
    or, past its first 200 regressions, ``M``'s squared error runs above 10x its target's
    (see ``DIVERGENCE_LIMIT``).

    **The SG's step.** Without ``optimizer`` the SG parameters are not stepped here: they get ``.grad`` from the
    regression (autograd), for an optimizer of their own. With ``optimizer`` (a ``torch.optim`` optimizer over the
    SG's parameters, or a factory building one from them; ``fastdni.nn.decouple`` passes its own) and a
    :class:`SyntheticGradient` SG (linear or MLP, with or without context), the step is fused wherever the ops have
    kernels for ``h``'s device and dtype (``backend``, as in :mod:`fastdni.ops`): the prediction is one op,
    :func:`fastdni.ops.sg_predict`, on ``h`` flattened to ``[B, prod(rest)]`` (a view where ``h`` is contiguous),
    and the arriving gradient's regression and the optimizer's step are one more, :func:`fastdni.ops.sg_regression_`,
    which updates the SG parameters and the optimizer's state in place (``optimizer.state_dict()`` stays the one
    copy of the state). The SG parameters then get no ``.grad``: do not step ``optimizer`` again. The regression
    loss, :attr:`last_sg_loss` and the divergence warning are those of the autograd path. Anywhere else (another SG
    model, e.g. :class:`~fastdni.nn.ConvSyntheticGradient`; an optimizer the ops cannot run, e.g. RMSprop; frozen
    SG parameters; a device or dtype without kernels) the interface falls back to autograd as without
    ``optimizer``, and the caller steps ``optimizer``: :meth:`fusion_blocker` says why, :attr:`fused` whether the
    last training call ran fused. One difference remains: the fused step runs at each regression, where autograd
    sums the gradients of all regressions before the caller's one step (they differ for an interface called more
    than once per step).

    In eval mode, with grad disabled, or on a batch of no examples, the interface is the identity.
    """

    def __init__(self, synthetic_gradient: nn.Module, *, loss_weight: float = 1.0,
                 gradient_scale: Union[float, str] = "batch", optimizer: Optional[SGOptimizer] = None,
                 backend: str = "auto"):
        super().__init__()
        self.synthetic_gradient = synthetic_gradient
        self._init_fused_sg(optimizer, backend)
        self.loss_weight = check_positive("loss_weight", float(loss_weight))
        if isinstance(gradient_scale, str):
            if gradient_scale != "batch":
                raise ValueError(f"gradient_scale: expected a number > 0 or 'batch', got {gradient_scale!r}")
            self.gradient_scale: Union[float, str] = gradient_scale
        else:
            self.gradient_scale = check_positive("gradient_scale", float(gradient_scale))
        self.last_sg_loss: Optional[Tensor] = None

    def scale_for(self, h: Tensor) -> float:
        """The gradient scale of a call on ``h``: the batch size, or the fixed number given."""
        return float(h.shape[0]) if self.gradient_scale == "batch" else self.gradient_scale

    def forward(self, h: Tensor, context: Optional[Tensor] = None, *, retain_graph: bool = False) -> Tensor:
        """``retain_graph``: keep the graph below ``h`` after sending ``M / s`` into it, for a caller that pushes
        another gradient through it later (``decouple(..., sg_targets="true")`` carries the true one)."""
        if not (self.training and torch.is_grad_enabled()):
            return h
        if not isinstance(h, Tensor):
            raise TypeError(f"h: expected a torch.Tensor, got {type(h).__name__}")
        if h.dim() == 0 or h.shape[0] == 0:  # no examples: nothing to predict or regress; pass it through
            return h
        self.fused = self.fusion_blocker(h, context) is None
        if self.fused:
            return self._fused_forward(h, context, retain_graph)
        # An SG model without context may be any module taking h alone (e.g. an oracle in tests).
        args = (h.detach(),) if context is None else (h.detach(), context)
        prediction = self.synthetic_gradient(*args)
        if prediction.shape != h.shape:
            raise ValueError(
                f"synthetic_gradient: returned shape {tuple(prediction.shape)} for h of shape {tuple(h.shape)}"
            )
        scale = self.scale_for(h)
        if h.requires_grad:
            h.backward(prediction.detach() / scale, retain_graph=retain_graph)
        if not prediction.requires_grad:  # an SG without trainable parameters (e.g. an oracle)
            return h.detach().requires_grad_()
        return _RegressOnArrivingGradient.apply(h.detach(), prediction, self, scale)

    def _fused_forward(self, h: Tensor, context: Optional[Tensor], retain_graph: bool = False) -> Tensor:
        """The training call on the fused ops (see the class docstring): predict, send ``M / s`` down, and return
        ``h`` cut from the graph below, wired to regress and step the SG when its gradient arrives."""
        predicted = self._predict_fused(h.detach().reshape(h.shape[0], -1), context)  # a view where h is contiguous
        scale = self.scale_for(h)
        if h.requires_grad:
            h.backward(predicted.prediction.view(h.shape) / scale, retain_graph=retain_graph)
        return _RegressFusedOnArrivingGradient.apply(h.detach().requires_grad_(), self, predicted, context, scale)

    def extra_repr(self) -> str:
        return f"loss_weight={self.loss_weight}, gradient_scale={self.gradient_scale}{self._fused_extra_repr()}"
