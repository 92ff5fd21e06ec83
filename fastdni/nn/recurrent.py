"""Synthetic gradients at the truncation boundaries of truncated BPTT (the paper's recurrent DNI).

Truncated BPTT cuts a long sequence into segments and backpropagates within each. With DNI the
state ``s`` that leaves a segment is given a synthetic gradient ``M(s) ~ dL_future/ds`` that flows back
into the segment together with its own loss, so the segment learns from what lies beyond its window.
``M`` is regressed onto the gradient that actually reaches ``s`` when the next segment is trained:
that segment's true gradient plus its own synthetic gradient pushed back through it (bootstrapping).

    boundary = TruncationDNI(SyntheticGradient(2 * hidden))   # over the LSTM state (h, c)
    state = initial_state
    for inputs, targets in segments:
        state = boundary.begin_segment(state)                  # cut here; regress M at this boundary
        outputs, state = core(inputs, state)
        boundary.end_segment(loss_fn(outputs, targets), state) # one backward: loss + M(state) into it
        optimizer.step(); sg_optimizer.step()                  # then zero both

States are a tensor or a tuple of tensors (``(h, c)`` of ``nn.LSTMCell``: batch on dim 0; of
``nn.LSTM``: ``[layers, B, H]``, pass ``batch_dim=1``); ``M`` sees them flattened to ``[B, features]``.
When a sequence ends with a segment (an episode such as one copy-task sequence), pass ``final=True``:
nothing lies beyond it, so no synthetic gradient is given to its end state.

DNI+Aux (Jaderberg et al., 2017, "Decoupled Neural Interfaces using Synthetic Gradients", ICML, Sec. 3.1
and Fig. 2b: as an auxiliary task the core also does *future synthetic gradient prediction*, an extra output
at every step trained to match a synthetic gradient produced later). Here: an ``aux_predictor`` ``P`` reads
the core's output ``o_j`` at every step ``j`` of the segment and is regressed onto the synthetic gradient
produced at the segment's end boundary, ``M(s_end)`` (zero for a ``final`` segment), with the loss

    aux_weight * mean_{j, b} || P(o_{j,b}) - M(s_end)_b ||^2        (M(s_end) a constant target)

added to the segment's loss in the same backward pass. Its gradient trains ``P`` and, through ``o_j``, the
core inside the window. It also reaches the segment's start state; that part is taken out of the SG's target
there (a state-only backward pass), so ``M`` models the task's future gradient. Left in
(``aux_in_target=True``), ``M`` would model the whole objective's, and since the aux loss is sized by ``M`` itself,
its target feeds back into ``M``: on the copy task it diverged (docs/recurrent.md). The paper's extra output
predicts the SG a fixed ``T`` steps ahead; with one backward pass per segment the only synthetic gradient
known while the segment's graph is alive is the one at the segment's end, so here the output of step ``j``
of a ``T``-step segment predicts it ``T - j`` steps ahead (``T - 1`` down to 0). ``aux_weight=0`` is exactly DNI.

    boundary = TruncationDNI(SyntheticGradient(2 * hidden), aux_predictor=nn.Linear(hidden, 2 * hidden))
    outputs, state = lstm(inputs, state)                        # outputs [T, B, hidden]: every step's h
    boundary.end_segment(loss, state, aux_inputs=outputs)

Two-window targets (``sg_lambda``, beyond the paper, in the spirit of TD(lambda) and BP(lambda), Pemberton and
Costa, TMLR 2024): ``M`` at a boundary ``a`` is regressed one segment later, onto the lambda-return over the two
segments that follow it,

    G(a) = t(a) + sg_lambda * J_ab^T (t(b) - bootstrap * M(b))      (b: the next boundary)

``t`` the one-segment target above and ``J_ab`` the Jacobian of the segment from ``a`` to ``b``: with
``sg_lambda=1``, the true gradient of two segments plus the bootstrap at the second's end. ``M``'s error then
compounds over half as many bootstrap links (at ``T = 2`` on repeat copy, DNI solved 3 where it solved 2 with
one-segment targets: docs/recurrent.md). ``J_ab^T`` is a backward pass through the segment run again from ``a``
with the current weights, so :meth:`end_segment` then needs ``segment``, the segment's core as a function of its
start state, and a segment costs one more forward and backward of the core:

    boundary = TruncationDNI(SyntheticGradient(2 * hidden), sg_lambda=1.0, batch_dim=1)
    state = boundary.begin_segment(state)
    outputs, end = lstm(inputs, state)
    boundary.end_segment(loss, end, segment=lambda s: lstm(inputs, s)[1])
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .._checks import check_int, check_positive
from .interface import FusedSG, SGOptimizer, _RegressFusedOnArrivingGradient, _RegressOnArrivingGradient, has_trainable_params

State = Union[Tensor, tuple[Tensor, ...]]
StepOutputs = Union[Tensor, Sequence[Tensor]]


def calibration_gain(moments: Tensor) -> Tensor:
    """``alpha`` of the calibrated SG from running moments ``[..., 2]`` (``<M, t>``, ``<M, M>``): their ratio, clamped
    to ``[0, 1]``; 0 where nothing was measured yet."""
    product, square = moments.unbind(-1)
    return torch.where(square > 0, product / square.clamp(min=1e-300), torch.zeros_like(square)).clamp(0.0, 1.0)


def fold_calibration_(moments: Tensor, prediction: Tensor, target: Tensor, decay: float, dims: tuple[int, int]) -> None:
    """Fold one boundary's ``<M, t>`` and ``<M, M>`` per stream (summed over ``dims``, the batch dim first) into the
    running ``moments`` (float64), in place; ``M`` is the prediction before it is fitted to ``t``, so the ratio is
    measured out of sample."""
    batch = prediction.shape[dims[0]]
    new = torch.stack([(prediction * target).sum(dims), (prediction * prediction).sum(dims)], -1).double() / batch
    moments.mul_(decay).add_(new.to(moments.device), alpha=1.0 - decay)


def truncation_windows(steps: int, truncation: int) -> list[slice]:
    """The segments of truncated BPTT over a sequence of ``steps`` steps: windows of ``truncation`` steps
    (the last one shorter when ``truncation`` does not divide ``steps``)."""
    check_int("truncation", truncation, 1)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: expected a sequence of at least 1 step, got {steps!r} (an empty sequence?)")
    return [slice(start, min(start + truncation, steps)) for start in range(0, steps, truncation)]


def flatten_state(state: State, batch_dim: int = 0) -> Tensor:
    """``[B, features]``: every state tensor with its batch dim moved first, flattened, concatenated."""
    parts = (state,) if isinstance(state, Tensor) else tuple(state)
    if not parts or not all(isinstance(p, Tensor) for p in parts):
        raise TypeError(f"state: expected a tensor or a non-empty tuple of tensors, got {type(state).__name__}")
    batch = {p.shape[batch_dim] if -p.dim() <= batch_dim < p.dim() else None for p in parts}
    if None in batch:
        raise ValueError(f"state: batch_dim={batch_dim} is out of range for shapes {[tuple(p.shape) for p in parts]}")
    if len(batch) != 1:
        raise ValueError(f"state: tensors disagree on the batch size along dim {batch_dim}: {[tuple(p.shape) for p in parts]}")
    (b,) = batch
    return torch.cat([p.movedim(batch_dim, 0).reshape(b, -1) for p in parts], dim=1)


def unflatten_state(flat: Tensor, like: State, batch_dim: int = 0) -> State:
    """The inverse of :func:`flatten_state`, shaped like ``like``."""
    parts = (like,) if isinstance(like, Tensor) else tuple(like)
    out, start = [], 0
    for p in parts:
        moved = p.movedim(batch_dim, 0).shape
        size = p.numel() // p.shape[batch_dim]
        # contiguous: a slice of the flat state is strided, and cuDNN's LSTM rejects a strided hx or cx
        out.append(flat[:, start : start + size].reshape(moved).movedim(0, batch_dim).contiguous())
        start += size
    return out[0] if isinstance(like, Tensor) else tuple(out)


class TruncationDNI(FusedSG, nn.Module):
    """A DNI at the boundaries between truncated-BPTT segments (see the module docstring).

    ``synthetic_gradient`` maps ``[B, features]`` to ``[B, features]`` (e.g. a linear
    :class:`~fastdni.nn.SyntheticGradient`, as in the paper). It predicts ``gradient_scale * dL/ds``;
    the segment receives ``sg_scale * M / gradient_scale``. ``M`` at the segment's start is regressed onto
    ``gradient_scale`` times the gradient of the segment's loss plus ``bootstrap * M(s_end) / gradient_scale``
    pushed back through the segment: ``bootstrap=1`` (the default) is the undiscounted future gradient
    whatever ``sg_scale`` the segment learns from (a value other than ``sg_scale`` costs a second, state-only
    backward pass); ``bootstrap < 1`` discounts each further boundary, which a continuous stream may need to
    keep the bootstrapped targets bounded. :attr:`last_sg_loss` is the regression loss of the last boundary
    whose target arrived. :func:`sg_alignment` measures how well ``M`` predicts the gradient truncation drops.

    With ``aux_predictor`` (a module mapping ``[N, step_features]`` to ``[N, features]``) the boundary is
    DNI+Aux: :meth:`end_segment` takes the segment's per-step core outputs and adds the auxiliary loss of
    the module docstring, weighted by ``aux_weight`` (0: exactly DNI); :attr:`last_aux_loss` holds its
    value. The SG and aux parameters, both in :meth:`parameters`, are stepped by the caller's optimizer.
    ``aux_in_target``: keep the aux loss's gradient in ``M``'s target (see the module docstring; default off).

    ``calibrate`` (default on; ``False`` is the paper's method): use ``alpha * M`` wherever ``M`` is used (the
    synthetic gradient, the bootstrap, DNI+Aux's target), ``alpha`` the least-squares scale of ``M``'s regression
    targets on its predictions, ``<M, t> / <M, M>`` over the boundaries seen (running means, ``calibration_decay``;
    each prediction measured before it is fitted to its target), clamped to ``[0, 1]``; 0 until measured. An SG that
    predicts nothing of its target (on short windows, whose bootstrapped targets are mostly noise) is then turned
    down to truncated BPTT instead of injecting that noise; one that predicts its target is used as is. On the copy
    tasks it reached lengths equal to or longer than the uncalibrated SG's at every ``T`` (docs/recurrent.md).
    :meth:`sg_gain` is ``alpha``; an SG with no trainable parameters (never regressed, e.g. an oracle) is used as is.

    ``sg_lambda`` (default 0, the paper's one-segment target): regress ``M`` one segment late onto the lambda-return
    over the two segments that follow its boundary (see the module docstring); :meth:`end_segment` then needs
    ``segment``. The copy tasks' experiments use 1 at ``T <= 3`` and 0.5 above.

    With ``optimizer`` (the SG's, or a factory of it) and a :class:`~fastdni.nn.SyntheticGradient`, the SG side runs
    on the fused ops as in :class:`~fastdni.nn.DNI`: :func:`fastdni.ops.sg_predict` at each boundary (and for the
    bootstrap prediction of :meth:`end_segment`), and :func:`fastdni.ops.sg_regression_` (regression and the
    optimizer's step) when the boundary's target arrives; the SG parameters then get no ``.grad`` (a caller's
    optimizer over all of :meth:`parameters` skips them). Elsewhere it falls back to autograd
    (:meth:`fusion_blocker`).
    """

    def __init__(
        self,
        synthetic_gradient: nn.Module,
        *,
        batch_dim: int = 0,
        loss_weight: float = 1.0,
        gradient_scale: float = 1.0,
        aux_predictor: Optional[nn.Module] = None,
        aux_weight: float = 1.0,
        sg_scale: float = 1.0,
        bootstrap: float = 1.0,
        aux_in_target: bool = False,
        calibrate: bool = True,
        calibration_decay: float = 0.99,
        sg_lambda: float = 0.0,
        optimizer: Optional[SGOptimizer] = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.synthetic_gradient = synthetic_gradient
        self._init_fused_sg(optimizer, backend)
        self.aux_predictor = aux_predictor
        self.batch_dim = batch_dim
        self.loss_weight = check_positive("loss_weight", float(loss_weight))
        self.gradient_scale = check_positive("gradient_scale", float(gradient_scale))
        self.aux_weight = check_positive("aux_weight", float(aux_weight), allow_zero=True)
        self.sg_scale = check_positive("sg_scale", float(sg_scale))
        self.bootstrap = check_positive("bootstrap", float(bootstrap), allow_zero=True)
        self.aux_in_target = bool(aux_in_target)
        self.calibrate = bool(calibrate)
        if not (isinstance(calibration_decay, (int, float)) and 0.0 <= calibration_decay < 1.0):
            raise ValueError(f"calibration_decay: expected a float in [0, 1), got {calibration_decay!r}")
        self.calibration_decay = float(calibration_decay)
        if not (isinstance(sg_lambda, (int, float)) and 0.0 <= sg_lambda <= 1.0):
            raise ValueError(f"sg_lambda: expected a float in [0, 1], got {sg_lambda!r}")
        self.sg_lambda = float(sg_lambda)
        self._arrived = _Correction()  # sg_lambda: the one-segment target t(a) captured at the open segment's start
        self._pending: Optional[_PendingBoundary] = None  # sg_lambda: the boundary M regresses one segment late
        self._start_like: Optional[State] = None  # the open segment's start state as begin_segment was given it
        # running <M, t> and <M, M> per stream (float64: sums of squares of gradients)
        self.register_buffer("calibration", torch.zeros(2, dtype=torch.float64))
        self.last_sg_loss: Optional[Tensor] = None
        self._segment_start: Optional[Tensor] = None  # the flattened state the open segment consumed
        self._target_correction = _Correction()
        self.last_aux_loss: Optional[Tensor] = None

    def sg_gain(self) -> Tensor:
        """The factor ``M`` is used with: ``alpha`` of ``calibrate`` (a 0-d float64 tensor), else 1."""
        if not self.calibrate or not has_trainable_params(self.synthetic_gradient):
            return torch.ones((), dtype=torch.float64, device=self.calibration.device)
        return calibration_gain(self.calibration)

    def _observe_regression(self, prediction: Tensor, target: Tensor) -> None:
        """Called by the regression of a calibrated boundary with ``M``'s prediction there and the (scaled) target it
        is fitted to."""
        fold_calibration_(self.calibration, prediction, target, self.calibration_decay, dims=(0, 1))

    def _predict(self, flat: Tensor) -> Tensor:
        prediction = self.synthetic_gradient(flat)
        if prediction.shape != flat.shape:
            raise ValueError(
                f"synthetic_gradient: returned shape {tuple(prediction.shape)} for a flattened state of shape "
                f"{tuple(flat.shape)}"
            )
        return prediction

    def begin_segment(self, state: State) -> State:
        """The state to start the next segment from: cut from the graph of the previous segment, and
        wired so that the gradient reaching it trains ``M`` at this boundary (with the current parameters)."""
        if not (self.training and torch.is_grad_enabled()):
            return state
        flat = flatten_state(state, self.batch_dim).detach()
        if has_trainable_params(self.synthetic_gradient):
            if self.sg_lambda:  # M regresses here one segment later (_regress_pending): only keep what arrives
                self._arrived.value = None
                flat = _CaptureArrivingGradient.apply(flat.requires_grad_(), self._arrived)
            else:
                flat = self._wire_regression(flat)
            # The target M regresses onto: what arrives here plus the correction of end_segment (_correction_at).
            flat = _AddToArrivingGradient.apply(flat, self._target_correction)
            self._segment_start = flat
            self._start_like = state.detach() if isinstance(state, Tensor) else tuple(p.detach() for p in state)
        else:  # nothing to train (e.g. an oracle SG): just cut the graph
            flat = flat.requires_grad_()
            self.fused = False
            self._segment_start = None
        return unflatten_state(flat, state, self.batch_dim)

    def _wire_regression(self, flat: Tensor) -> Tensor:
        """``flat`` (detached) wired so that the gradient arriving for it regresses ``M`` there (with the current
        parameters): on the fused ops where they run, else by autograd."""
        self.fused = self.fusion_blocker(flat) is None
        if self.fused:
            return _RegressFusedOnArrivingGradient.apply(flat.requires_grad_(), self, self._predict_fused(flat, None),
                                                         None, self.gradient_scale)
        return _RegressOnArrivingGradient.apply(flat, self._predict(flat), self)

    def end_segment(
        self, loss: Optional[Tensor], state: State, *, aux_inputs: Optional[StepOutputs] = None, final: bool = False,
        segment: Optional[Callable[[State], State]] = None,
    ) -> Tensor:
        """Backpropagate ``loss``, the synthetic gradient ``M(state) / gradient_scale`` (none when ``final``)
        and, for DNI+Aux, the auxiliary loss on ``aux_inputs`` (the segment's per-step core outputs,
        time-major ``[steps, B, *]`` or a list of ``[B, *]``) through the segment in one pass; returns the
        synthetic gradient given to ``state`` (flattened, detached; zero when ``final``). With ``sg_lambda``,
        ``segment`` maps the segment's start state (as :meth:`begin_segment` returned it) to its end state: the
        next segment's target is pushed back through it (see the module docstring)."""
        capturing = self._segment_start is not None and self.sg_lambda > 0
        if capturing and not callable(segment):
            raise ValueError("segment: this boundary has sg_lambda > 0; pass the segment's core as a function of its "
                             f"start state (e.g. segment=lambda s: lstm(inputs, s)[1]), got {segment!r}")
        flat = flatten_state(state, self.batch_dim)
        with torch.no_grad():
            if final:
                prediction = torch.zeros_like(flat)
            elif self.fusion_blocker(flat) is None:
                prediction = self._predict_fused(flat.detach(), None).prediction
            else:
                prediction = self._predict(flat.detach())
            if self.calibrate and not final:
                prediction = prediction * self.sg_gain().to(prediction.dtype)
        synthetic = prediction * (self.sg_scale / self.gradient_scale)
        tensors, grads = ([], []) if final else ([flat], [synthetic])
        self._target_correction.value = None
        start = self._segment_start
        self._segment_start = None
        if loss is not None:
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise ValueError(f"loss: expected a scalar tensor or None, got {loss!r}")
            tensors.append(loss)
            grads.append(None)
        aux_loss = self._aux_loss(aux_inputs, prediction)  # P learns M's own output, in M's scale
        if aux_loss is not None:
            tensors.append(aux_loss)
            grads.append(None)
        if start is not None:
            self._target_correction.value = self._correction_at(start, flat, prediction, final, aux_loss)
        live = [(t, g) for t, g in zip(tensors, grads) if t.requires_grad]
        if live:
            torch.autograd.backward([t for t, _ in live], [g for _, g in live])
        self._target_correction.value = None
        if capturing:
            self._regress_pending(start.detach(), segment, prediction * (self.bootstrap / self.gradient_scale),
                                  final)
        return synthetic

    def _regress_pending(self, start: Tensor, segment: Callable[[State], State], bootstrap: Tensor,
                         final: bool) -> None:
        """``sg_lambda``: regress ``M`` at the previous boundary ``a`` onto ``t(a) + lambda J_ab^T (t(b) - bootstrap
        M(b))``, ``b`` this segment's start, then keep ``b`` for the next segment (after a ``final`` one, regress it
        at once, in the same batch as ``a``: nothing follows, its target is ``t(b)``)."""
        arrived = self._arrived.value
        self._arrived.value = None
        arrived = torch.zeros_like(start) if arrived is None else arrived.detach()
        pending = self._pending
        self._pending = None if final else _PendingBoundary(start, arrived, bootstrap, segment, self._start_like)
        starts, targets = [], []
        if pending is not None:
            flat = pending.start.clone().requires_grad_()
            with torch.enable_grad():
                end = flatten_state(pending.segment(unflatten_state(flat, pending.like, self.batch_dim)), self.batch_dim)
                (pushed,) = torch.autograd.grad(end, flat, (arrived - pending.bootstrap) * self.sg_lambda,
                                                allow_unused=True)
            starts.append(pending.start)
            targets.append(pending.target if pushed is None else pending.target + pushed)
        if final:
            starts.append(start)
            targets.append(arrived)
        if starts:  # two boundaries due (a final segment) are regressed as one batch: one step of a fused optimizer
            self._wire_regression(torch.cat(starts)).backward(torch.cat(targets))

    def _correction_at(self, start: Tensor, flat: Tensor, prediction: Tensor, final: bool,
                       aux_loss: Optional[Tensor]) -> Optional[Tensor]:
        """What ``M``'s target at the segment's ``start`` differs by from the gradient the segment's pass brings there,
        in one state-only backward pass (None: nothing): the segment learns from ``sg_scale * M`` but ``M``'s target
        bootstraps from ``bootstrap * M`` (their difference, pushed back), and it leaves out the aux loss's part
        unless ``aux_in_target``."""
        outputs, grads = [], []
        if not final and self.bootstrap != self.sg_scale and flat.requires_grad:
            outputs.append(flat)
            grads.append(prediction * ((self.bootstrap - self.sg_scale) / self.gradient_scale))
        if aux_loss is not None and not self.aux_in_target and aux_loss.requires_grad:
            outputs.append(aux_loss)
            grads.append(torch.full_like(aux_loss, -1.0))
        if not outputs:
            return None
        (correction,) = torch.autograd.grad(outputs, start, grads, retain_graph=True, allow_unused=True)
        return correction

    def _aux_loss(self, aux_inputs: Optional[StepOutputs], target: Tensor) -> Optional[Tensor]:
        """DNI+Aux: ``aux_weight * mean_{j,b} ||P(o_{j,b}) - target_b||^2``; None without an aux predictor
        or with ``aux_weight == 0``."""
        if self.aux_predictor is None:
            if aux_inputs is not None:
                raise ValueError("aux_inputs: given, but this boundary has no aux_predictor (DNI+Aux needs one)")
            return None
        if aux_inputs is None:
            raise ValueError(
                "aux_inputs: this boundary is DNI+Aux (it has an aux_predictor); pass the segment's per-step core "
                "outputs, time-major [steps, B, *] or a list of [B, *]"
            )
        if self.aux_weight == 0:
            return None
        outputs = _stack_steps(aux_inputs, target)
        steps, batch = outputs.shape[:2]
        prediction = self.aux_predictor(outputs.reshape(steps * batch, -1))
        if prediction.shape != (steps * batch, target.shape[1]):
            raise ValueError(
                f"aux_predictor: returned shape {tuple(prediction.shape)} for {steps * batch} step outputs, expected "
                f"({steps * batch}, {target.shape[1]}) (the flattened state's features)"
            )
        error = prediction.view(steps, batch, -1) - target
        loss = self.aux_weight * (error * error).sum() / (steps * batch)
        self.last_aux_loss = loss.detach()
        return loss

    def extra_repr(self) -> str:
        aux = (f", aux_weight={self.aux_weight}{', aux_in_target=True' if self.aux_in_target else ''}"
               if self.aux_predictor is not None else "")
        calibrate = f", calibration_decay={self.calibration_decay}" if self.calibrate else ", calibrate=False"
        return (f"batch_dim={self.batch_dim}, loss_weight={self.loss_weight}, gradient_scale={self.gradient_scale}, "
                f"sg_scale={self.sg_scale}, bootstrap={self.bootstrap}{aux}{calibrate}"
                f"{f', sg_lambda={self.sg_lambda}' if self.sg_lambda else ''}{self._fused_extra_repr()}")


class _PendingBoundary(NamedTuple):
    """``sg_lambda``: a boundary whose regression waits for the next segment's target."""

    start: Tensor  #: the flattened state at the boundary (detached)
    target: Tensor  #: its one-segment target t(a) (gradient units)
    bootstrap: Tensor  #: bootstrap * M(b) / gradient_scale, what t(a) bootstrapped from at the segment's end b
    segment: Callable[[State], State]  #: the segment from a to b, as a function of its start state
    like: State  #: the structure of the segment's start state


class _CaptureArrivingGradient(torch.autograd.Function):
    """Identity whose backward stores the gradient passing through in ``slot.value`` (added up)."""

    @staticmethod
    def forward(ctx, flat: Tensor, slot: "_Correction") -> Tensor:
        ctx.slot = slot
        return flat.view_as(flat)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.slot.value = grad if ctx.slot.value is None else ctx.slot.value + grad
        return None, None


class _Correction:
    """A slot for the correction of the open segment's SG target (TruncationDNI._correction_at; None: nothing to add)."""

    value: Optional[Tensor] = None


class _AddToArrivingGradient(torch.autograd.Function):
    """Identity whose backward adds ``correction.value`` (when set) to the gradient passing through."""

    @staticmethod
    def forward(ctx, flat: Tensor, correction: _Correction) -> Tensor:
        ctx.correction = correction
        return flat.view_as(flat)

    @staticmethod
    def backward(ctx, grad: Tensor):
        extra = ctx.correction.value
        return (grad if extra is None else grad + extra), None


class Alignment(NamedTuple):
    """Floats when reduced over everything; tensors of the remaining dims when :func:`alignment_of` keeps some."""

    cosine: Union[float, Tensor]  #: cosine between the synthetic and the dropped gradient
    norm_ratio: Union[float, Tensor]  #: ||synthetic|| / ||dropped||
    dropped_norm: Union[float, Tensor]  #: ||dropped||


def sg_alignment(boundary: TruncationDNI, state: State, future_loss: Callable[[State], Tensor]) -> Alignment:
    """How well the boundary's SG predicts the gradient that truncation drops at ``state``.

    ``future_loss(state)`` runs the core on from ``state`` over what follows the boundary (the rest of the
    sequence, or a horizon of it) and returns that loss; its gradient with respect to ``state`` by full
    BPTT is what truncated BPTT drops. It is compared with the SG's estimate of it, ``M(state) /
    gradient_scale`` (times :meth:`TruncationDNI.sg_gain`); the segment itself is handed ``sg_scale`` times this. Nothing is stepped or
    accumulated (parameters' ``.grad`` are left as they are)."""
    flat = flatten_state(state, boundary.batch_dim).detach().requires_grad_()
    with torch.enable_grad():
        loss = future_loss(unflatten_state(flat, state, boundary.batch_dim))
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError(f"future_loss: expected a scalar tensor, got {loss!r}")
        (dropped,) = torch.autograd.grad(loss, flat, allow_unused=True)
    if dropped is None:
        dropped = torch.zeros_like(flat)
    with torch.no_grad():
        synthetic = boundary._predict(flat.detach()) * (boundary.sg_gain().to(flat.dtype) / boundary.gradient_scale)
        return alignment_of(synthetic, dropped)


def alignment_of(synthetic: Tensor, dropped: Tensor, dims: Optional[Sequence[int]] = None) -> Alignment:
    """Cosine and norm ratio of two gradients, reduced over ``dims`` (default all); nan where undefined."""
    dims = tuple(range(synthetic.dim())) if dims is None else tuple(dims)
    dot = (synthetic * dropped).sum(dims)
    # vector_norm: Tensor.norm with a tuple of more than two dims would take a matrix norm (and refuse).
    s_norm, d_norm = torch.linalg.vector_norm(synthetic, dim=dims), torch.linalg.vector_norm(dropped, dim=dims)
    nan = torch.full_like(dot, float("nan"))
    cosine = torch.where((s_norm > 0) & (d_norm > 0), dot / (s_norm * d_norm), nan)
    ratio = torch.where(d_norm > 0, s_norm / d_norm, nan)
    if cosine.dim() == 0:
        return Alignment(float(cosine), float(ratio), float(d_norm))
    return Alignment(cosine, ratio, d_norm)


def _stack_steps(aux_inputs: StepOutputs, target: Tensor) -> Tensor:
    """``aux_inputs`` as ``[steps, B, *]``, checked against the flattened state ``target`` ``[B, features]``."""
    if isinstance(aux_inputs, Tensor):
        outputs = aux_inputs.unsqueeze(0) if aux_inputs.dim() == 2 else aux_inputs
    elif isinstance(aux_inputs, (list, tuple)) and all(isinstance(o, Tensor) for o in aux_inputs):
        if not aux_inputs:
            raise ValueError("aux_inputs: empty (0 steps); pass the segment's per-step core outputs")
        shapes = {tuple(o.shape) for o in aux_inputs}
        if len(shapes) != 1:
            raise ValueError(f"aux_inputs: the steps' outputs differ in shape: {sorted(shapes)}")
        outputs = torch.stack(list(aux_inputs))
    else:
        raise TypeError(f"aux_inputs: expected a tensor or a list of tensors, got {type(aux_inputs).__name__}")
    if outputs.dim() < 3:
        raise ValueError(f"aux_inputs: expected time-major [steps, B, *] (or [B, *] for one step), got {tuple(outputs.shape)}")
    if outputs.shape[0] == 0:
        raise ValueError("aux_inputs: empty (0 steps); pass the segment's per-step core outputs")
    if outputs.shape[1] != target.shape[0]:
        raise ValueError(
            f"aux_inputs: batch size {outputs.shape[1]} (dim 1 of time-major [steps, B, *]) differs from the "
            f"state's {target.shape[0]}"
        )
    if outputs.dtype != target.dtype or outputs.device != target.device:
        raise TypeError(f"aux_inputs: expected {target.dtype} on {target.device}, got {outputs.dtype} on {outputs.device}")
    return outputs
