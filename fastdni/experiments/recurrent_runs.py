"""Many recurrent-DNI runs in one process and one set of GEMMs: the budget behind the recurrent grid.

A :class:`RunGroup` holds ``R`` independent runs (a method and a seed each) of the recurrent experiments'
model (one-layer LSTM, linear readout, linear SG over ``(h, c)`` at every truncation boundary, DNI+Aux's
linear aux predictor), every parameter stacked on a leading run dimension, so each step of all runs is one
batched GEMM (``torch.baddbmm``) and one Adam over the stacked tensors (elementwise: exactly ``R``
independent Adams). The methods differ only in two numbers per run: the scale of the synthetic gradient
the segment receives (0 for ``bptt``) and the aux weight (0 unless ``dni-aux``); every run's SG is
regressed, so the alignment diagnostic is defined for all of them.

The math is :class:`fastdni.nn.TruncationDNI`'s, written out for the stacked runs (tests check the two
agree in fp64): per window of ``T`` steps,

* loss ``L`` of the window (per run: summed over steps and outputs, mean over its ``B`` streams);
* the segment's backward pass starts from ``L``, ``sg_scale * M(s_end) / B`` at its end state and, for
  DNI+Aux, ``aux_weight * mean_{j,b} ||P(o_j) - M(s_end)||^2``;
* ``M`` at the start boundary is regressed onto ``B`` times the gradient arriving there, with its bootstrap
  term weighted ``bootstrap`` instead of ``sg_scale`` and without the aux loss's part (``aux_in_target=True``
  keeps it, see ``TruncationDNI``): one second, state-only backward pass for both.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..nn.recurrent import alignment_of, calibration_gain, fold_calibration_
from ..reference import SGParams

METHODS = ("bptt", "dni", "dni-aux")


class WindowStats(NamedTuple):
    loss: Tensor  #: ``[R]`` the window's task loss per run (nats, mean over streams)
    sg_loss: Tensor  #: ``[R]`` the SG regression loss at the window's start boundary
    sg_target_norm: Tensor  #: ``[R]`` ``mean_b ||target||^2`` of that regression: sg_loss / it is the normalised loss
    aux_loss: Tensor  #: ``[R]`` the DNI+Aux loss (0 for the other methods)


PerRun = Union[float, Sequence[float]]


def _per_run(name: str, value: PerRun, runs: int, maximum: Optional[float] = None) -> list[float]:
    """One float per run (a single float is shared); each >= 0 (and <= ``maximum`` when given)."""
    values = [float(value)] * runs if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != runs or not all(0 <= v <= (math.inf if maximum is None else maximum) for v in values):
        bounds = ">= 0" if maximum is None else f"in [0, {maximum:g}]"
        raise ValueError(f"{name}: expected a float {bounds} or {runs} of them (one per run), got {value!r}")
    return values


def _stack(tensors: Sequence[Tensor]) -> nn.Parameter:
    return nn.Parameter(torch.stack([t.detach().clone() for t in tensors]))


class RunGroup(nn.Module):
    """``R`` independent LSTM runs stacked on dim 0; ``methods[r]`` and ``seeds[r]`` define run ``r``.

    Run ``r`` starts from the weights ``torch.manual_seed(seeds[r])`` gives ``nn.LSTM(in, hidden)`` and
    ``nn.Linear(hidden, out)`` built in that order (the per-run experiment's initialisation); SG and aux
    predictor start at zero, as in the paper."""

    def __init__(self, methods: Sequence[str], seeds: Sequence[int], in_features: int, hidden: int,
                 out_features: int, *, sg_scale: PerRun = 0.1, aux_weight: PerRun = 0.1, bootstrap: PerRun = 1.0,
                 sg_hidden: int = 0, forget_bias: PerRun = 0.0, sg_solver: Union[str, Sequence[str]] = "adam",
                 rls_decay: float = 0.999, rls_ridge: float = 1e-3, rls_every: int = 10, aux_in_target: bool = False,
                 calibrate: Union[bool, Sequence[bool]] = True, calibration_decay: float = 0.99,
                 sg_lambda: PerRun = 0.0):
        super().__init__()
        if len(methods) != len(seeds) or not methods:
            raise ValueError(f"methods/seeds: expected equal, non-zero lengths, got {len(methods)} and {len(seeds)}")
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise ValueError(f"methods: unknown {unknown}; expected a subset of {METHODS}")
        self.methods, self.seeds, self.hidden = list(methods), list(seeds), hidden
        lstms, readouts = [], []
        for seed in seeds:
            torch.manual_seed(seed)
            lstms.append(nn.LSTM(in_features, hidden))
            readouts.append(nn.Linear(hidden, out_features))
        # Stored transposed so that every product is x @ W: [R, rows, in] @ [R, in, out].
        self.w_ih = _stack([m.weight_ih_l0.t() for m in lstms])
        self.w_hh = _stack([m.weight_hh_l0.t() for m in lstms])
        self.b_ih = _stack([m.bias_ih_l0[None] for m in lstms])
        with torch.no_grad():  # gates i, f, g, o: a forget bias > 0 makes the initial cell keep its memory longer
            self.b_ih[:, 0, hidden : 2 * hidden] += torch.tensor(_per_run("forget_bias", forget_bias, len(seeds)))[:, None]
        self.b_hh = _stack([m.bias_hh_l0[None] for m in lstms])
        self.w_out = _stack([m.weight.t() for m in readouts])
        self.b_out = _stack([m.bias[None] for m in readouts])
        runs, state = len(methods), 2 * hidden
        # The SG: linear (the paper's), or with one ReLU hidden layer of sg_hidden units (nn.Linear's default
        # init from a generator of its own per run, not the core's stream); the output layer at zero. Its weights
        # are stored as nn.Linear's ([R, out, in], unlike the core's): each run's slice is then the fused ops'
        # operand in place (use_fused_sg).
        if sg_hidden:
            bound = 1.0 / state ** 0.5
            gens = [torch.Generator().manual_seed(10_000 + seed) for seed in seeds]
            self.sg_w1 = _stack([(torch.rand(state, sg_hidden, generator=g) * 2 * bound - bound).t() for g in gens])
            self.sg_b1 = _stack([torch.rand(1, sg_hidden, generator=g) * 2 * bound - bound for g in gens])
        self.sg_w = nn.Parameter(torch.zeros(runs, state, sg_hidden or state))
        self.sg_b = nn.Parameter(torch.zeros(runs, 1, state))
        self.aux_w = nn.Parameter(torch.zeros(runs, hidden, state))
        self.aux_b = nn.Parameter(torch.zeros(runs, 1, state))
        # Python floats, not buffers: a buffer would be rounded to the parameters' dtype once and for all.
        sg_scale, aux_weight = _per_run("sg_scale", sg_scale, runs), _per_run("aux_weight", aux_weight, runs)
        self.sg_scales = [0.0 if m == "bptt" else s for m, s in zip(methods, sg_scale)]
        self.aux_weights = [w if m == "dni-aux" else 0.0 for m, w in zip(methods, aux_weight)]
        self.bootstraps = _per_run("bootstrap", bootstrap, runs)
        self.aux_in_target = bool(aux_in_target)
        solvers = [sg_solver] * runs if isinstance(sg_solver, str) else list(sg_solver)
        if len(solvers) != runs or not set(solvers) <= {"adam", "rls"} or (sg_hidden and "rls" in solvers):
            raise ValueError(f"sg_solver: expected 'adam' or 'rls' (linear SG only), or one per run, got {sg_solver!r}")
        # "rls": the linear SG is the ridge solution over exponentially weighted (state, target) statistics,
        # re-solved every rls_every windows, instead of Adam steps on each window's noisy target.
        self.register_buffer("rls_runs", torch.tensor([x == "rls" for x in solvers]))
        if bool(self.rls_runs.any()):
            self.register_buffer("rls_a", torch.zeros(runs, state + 1, state + 1, dtype=torch.float64))
            self.register_buffer("rls_c", torch.zeros(runs, state + 1, state, dtype=torch.float64))
            self.rls_decay, self.rls_ridge, self.rls_every, self.rls_count = rls_decay, rls_ridge, rls_every, 0
        # Calibration (TruncationDNI's default; False: the paper's method): M's output is used as alpha * M, alpha
        # the least-squares scale of its targets on its predictions (<M, t> / <M, M>, running means over the
        # windows, clamped to [0, 1]): 0 where M predicts nothing of its target (the run is then BPTT), 1 where it
        # is unbiased (see TruncationDNI's calibrate).
        calibrated = [bool(calibrate)] * runs if isinstance(calibrate, bool) else [bool(x) for x in calibrate]
        if len(calibrated) != runs or not 0.0 <= calibration_decay < 1.0:
            raise ValueError(f"calibrate/calibration_decay: expected a bool or one per run and a decay in [0, 1), "
                             f"got {calibrate!r} and {calibration_decay!r}")
        self.register_buffer("calibrated", torch.tensor(calibrated))
        self.register_buffer("calibration", torch.zeros(runs, 2, dtype=torch.float64))  # running <M, t>, <M, M>
        self.calibration_decay = calibration_decay
        # sg_lambda (TruncationDNI's): M regressed one window late onto the lambda-return over two windows; when any run
        # has it, every run's regression waits a window (a run with 0 then regresses onto its one-window target).
        self.sg_lambdas = _per_run("sg_lambda", sg_lambda, runs, maximum=1.0)
        self._pending = None  # sg_lambda: the window whose start M regresses at the next window
        self.sg_optimizer: Optional[torch.optim.Optimizer] = None  # set by use_fused_sg
        self.backend = "auto"

    @property
    def runs(self) -> int:
        return len(self.methods)

    def core_parameters(self) -> list[nn.Parameter]:
        return [self.w_ih, self.w_hh, self.b_ih, self.b_hh, self.w_out, self.b_out]

    def sg_parameters(self) -> list[nn.Parameter]:
        hidden = [self.sg_w1, self.sg_b1] if hasattr(self, "sg_w1") else []
        return hidden + [self.sg_w, self.sg_b, self.aux_w, self.aux_b]

    def initial_state(self, streams: int) -> tuple[Tensor, Tensor]:
        zeros = self.w_hh.new_zeros(self.runs, streams, self.hidden)
        return zeros, zeros.clone()

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor], resets: Optional[Tensor] = None, *,
                readout: bool = True) -> tuple[Optional[Tensor], Tensor, tuple[Tensor, Tensor]]:
        """``x`` ``[T, R, B, in]`` -> logits ``[T, R, B, out]`` (None without ``readout``), outputs ``[T, R, B,
        hidden]``, final state. ``resets`` ``[T, R, B]`` (bool): zero the state before those steps (episodes: no
        gradient crosses)."""
        steps, runs, batch, _ = x.shape
        xw = torch.baddbmm(self.b_ih + self.b_hh, x.transpose(0, 1).reshape(runs, steps * batch, -1), self.w_ih)
        xw = xw.view(runs, steps, batch, -1)
        h, c = state
        outputs = []
        keep = None if resets is None or not bool(resets.any()) else (~resets).to(x.dtype)[..., None]
        for t in range(steps):
            if keep is not None:
                h, c = h * keep[t], c * keep[t]
            gates = torch.baddbmm(xw[:, t], h, self.w_hh)
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        out = torch.stack(outputs, dim=1)  # [R, T, B, H]
        if not readout:
            return None, out.transpose(0, 1), (h, c)
        logits = torch.baddbmm(self.b_out, out.view(runs, steps * batch, -1), self.w_out).view(runs, steps, batch, -1)
        return logits.transpose(0, 1), out.transpose(0, 1), (h, c)

    def sg_gain(self) -> Tensor:
        """``[R]``: the factor each run's ``M`` is used with (1 unless calibrated)."""
        alpha = calibration_gain(self.calibration)
        return torch.where(self.calibrated, alpha, torch.ones_like(alpha))

    def sg_layers(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """The SG's ``(weight [R, out, in], bias [R, 1, out])`` per layer, input first."""
        return ([(self.sg_w1, self.sg_b1)] if hasattr(self, "sg_w1") else []) + [(self.sg_w, self.sg_b)]

    def predict(self, flat: Tensor) -> Tensor:
        """``M(s)`` of every run: ``[R, B, 2H]``."""
        return self._sg_forward(flat)[-1]

    def _sg_forward(self, flat: Tensor) -> list[Tensor]:
        """The SG's hidden activations, then its prediction, every run's (``[R, B, *]`` each)."""
        out, layers = [], self.sg_layers()
        for i, (w, b) in enumerate(layers):
            flat = torch.baddbmm(b, flat, w.transpose(1, 2))
            if i < len(layers) - 1:
                flat = torch.relu(flat)
            out.append(flat)
        return out

    def use_fused_sg(self, optimizer: torch.optim.Optimizer, backend: str = "auto") -> Optional[str]:
        """Run each run's SG regression and ``optimizer``'s step on it as one fused op
        (:func:`fastdni.ops.sg_regression_`, the optimizer in its epilogue) instead of accumulating ``.grad`` for
        ``optimizer.step()``; the SG parameters then get no ``.grad`` (the caller's step skips them) and their state
        stays in ``optimizer`` (checkpoints unchanged). Returns why it cannot (and then changes nothing), else None.
        The aux predictor stays on ``optimizer.step()``."""
        like = self.sg_w
        reason = ops.fused_backend_blocker(backend, like.device, like.dtype)
        if reason is None and bool(self.rls_runs.any()):
            reason = "the rls solver sets the SG's weights itself"
        if reason is None:
            try:
                ops.check_fusable_optimizer(optimizer, self._sg_ordered())
            except (TypeError, ValueError) as error:
                reason = str(error)
        if reason is None:
            self.sg_optimizer, self.backend = optimizer, backend
        return reason

    def _sg_ordered(self) -> list[nn.Parameter]:
        return [t for layer in self.sg_layers() for t in layer]  # the ops' order: W_1, b_1, ..., W_L, b_L

    def train_window(self, x: Tensor, loss_fn, state: tuple[Tensor, Tensor], *, resets: Optional[Tensor] = None,
                     final: bool = False, oracle: Optional[Tensor] = None):
        """One truncated-BPTT window of every run: accumulates ``.grad`` of the core and SG parameters (the
        caller steps the optimizers). ``loss_fn(logits)`` returns the per-run loss ``[R]``. Returns the
        logits (detached), the final state (detached) and :class:`WindowStats`. ``oracle`` ``[R, B, 2H]``: the
        true gradient beyond the window (see :func:`dropped_gradient`) used in place of ``M(s_end) / B``, the
        ceiling a perfect SG would reach (M is still regressed, as usual)."""
        batch = x.shape[2]
        h0 = state[0].detach().requires_grad_()
        c0 = state[1].detach().requires_grad_()
        logits, outputs, (h1, c1) = self(x, (h0, c0), resets)
        loss = loss_fn(logits)
        end = torch.cat([h1, c1], dim=-1)
        with torch.no_grad():
            m_end = torch.zeros_like(end) if final else self.predict(end) if oracle is None else oracle * batch
            if oracle is None and bool(self.calibrated.any()):
                m_end = m_end * self.sg_gain().to(end.dtype)[:, None, None]
        scale = end.new_tensor(self.sg_scales)[:, None, None]
        aux_weight = end.new_tensor(self.aux_weights)
        terms, grads = [loss.sum()], [None]
        aux_loss = torch.zeros_like(loss)
        if any(self.aux_weights):
            steps = outputs.shape[0]
            flat_out = outputs.transpose(0, 1).reshape(self.runs, steps * batch, -1)
            pred = torch.baddbmm(self.aux_b, flat_out, self.aux_w).view(self.runs, steps, batch, -1)
            aux_loss = aux_weight * (pred - m_end[:, None]).pow(2).sum((1, 2, 3)) / (steps * batch)
            terms.append(aux_loss.sum())
            grads.append(None)
        # What M's target differs by from the gradient arriving at the start, in one state-only backward pass:
        # it bootstraps from bootstrap * M(s_end) where the segment learns from sg_scale * M(s_end), and it models
        # the task's future gradient, without the aux loss's part (left in, the aux loss, whose size is M's, feeds
        # M's target back into itself: docs/recurrent.md).
        off_target, off_grads = [], []
        if not final:
            terms.append(end)
            grads.append(m_end * scale / batch)
            extra = m_end * (end.new_tensor(self.bootstraps)[:, None, None] - scale) / batch
            if bool(extra.any()):
                off_target.append(end)
                off_grads.append(extra)
        if any(self.aux_weights) and not self.aux_in_target:
            off_target.append(aux_loss.sum())
            off_grads.append(aux_loss.new_tensor(-1.0))
        correction = (torch.autograd.grad(off_target, (h0, c0), off_grads, retain_graph=True, allow_unused=True)
                      if off_target else ())
        torch.autograd.backward(terms, grads)
        arriving = torch.cat([h0.grad, c0.grad], dim=-1)
        if any(g is not None for g in correction):
            arriving = arriving + torch.cat([g if g is not None else torch.zeros_like(h0) for g in correction], dim=-1)
        target = batch * arriving
        start = torch.cat([h0, c0], dim=-1).detach()
        if any(self.sg_lambdas):  # M regresses one window late (TruncationDNI's sg_lambda)
            bootstrap = m_end * end.new_tensor(self.bootstraps)[:, None, None]  # zero when final
            regressions = self._regressions_due(x, resets, start, target, bootstrap, final)
        else:
            regressions = [(start, target)]
        sg_loss = target_norm = torch.zeros_like(loss)
        if regressions:  # two boundaries due (a final window) are regressed as one batch, as TruncationDNI does
            start, target = (torch.cat(parts, dim=1) for parts in zip(*regressions))
            sg_loss = self._regress(start, target)
            target_norm = target.pow(2).sum((1, 2)) / start.shape[1]
        return logits.detach(), (h1.detach(), c1.detach()), WindowStats(loss.detach(), sg_loss, target_norm,
                                                                         aux_loss.detach())

    def pending_state(self) -> Optional[list]:
        """``sg_lambda``: the window whose start waits for its regression (inputs, resets, start, target, bootstrap),
        for a checkpoint; None when none waits."""
        return None if self._pending is None else list(self._pending)

    def load_pending_state(self, pending: Optional[Sequence]) -> None:
        self._pending = None if pending is None else tuple(pending)

    def _regressions_due(self, x: Tensor, resets: Optional[Tensor], start: Tensor, target: Tensor, bootstrap: Tensor,
                         final: bool) -> list[tuple[Tensor, Tensor]]:
        """``sg_lambda``: the previous window's start ``a`` with its lambda-return target ``t(a) + lambda J_ab^T (t(b) -
        bootstrap M(b))`` (``b``: this window's start, ``J_ab`` by running the previous window again from ``a`` with
        the current weights); this window is kept for the next (after a ``final`` one: regressed at once onto
        ``t(b)``, nothing follows)."""
        pending = self._pending
        self._pending = None if final else (x, resets, start, target, bootstrap)
        due = []
        if pending is not None:
            x_a, resets_a, start_a, target_a, bootstrap_a = pending
            delta = (target - bootstrap_a) * target.new_tensor(self.sg_lambdas)[:, None, None]
            h, c = start_a.split(self.hidden, dim=-1)
            h, c = h.clone().requires_grad_(), c.clone().requires_grad_()
            with torch.enable_grad():
                _, _, end = self(x_a, (h, c), resets_a, readout=False)  # only the state's path matters
                pushed = torch.autograd.grad(torch.cat(end, dim=-1), (h, c), delta)
            due.append((start_a, target_a + torch.cat(pushed, dim=-1)))
        if final:
            due.append((start, target))
        return due

    def _regress(self, start: Tensor, target: Tensor) -> Tensor:
        """Accumulate the gradient of ``mean_b ||M(s) - target||^2`` into the SG (with :meth:`use_fused_sg`: step the
        SG on it); returns it per run."""
        batch = start.shape[1]
        if self.sg_optimizer is not None:
            return self._regress_fused(start, target)
        if hasattr(self, "sg_w1"):  # an MLP SG: its gradient by autograd
            with torch.enable_grad():
                prediction = self.predict(start)
                self._calibrate(prediction.detach(), target)
                error = prediction.detach() - target
                prediction.backward(error * (2.0 / batch))
            return error.pow(2).sum((1, 2)) / batch
        with torch.no_grad():
            prediction = self.predict(start)
            self._calibrate(prediction, target)
            error = prediction - target
            if hasattr(self, "rls_a"):
                self._rls_update(start, target)
            for p, g in ((self.sg_w, torch.bmm(error.transpose(1, 2), start) * (2.0 / batch)),
                         (self.sg_b, error.sum(1, keepdim=True) * (2.0 / batch))):
                if hasattr(self, "rls_a"):
                    g = g * (~self.rls_runs).to(g.dtype)[:, None, None]
                p.grad = g if p.grad is None else p.grad + g
            return error.pow(2).sum((1, 2)) / batch

    def _regress_fused(self, start: Tensor, target: Tensor) -> Tensor:
        """:meth:`_regress` on the ops: the prediction (all runs, one batched GEMM per layer), then per run one
        ``sg_regression_`` on views of the stacked parameters and optimizer state."""
        with torch.no_grad():
            *hidden, prediction = self._sg_forward(start)
        self._calibrate(prediction, target)
        stacked = self._sg_ordered()
        name, hyper, state = ops.fused_optimizer_args(self.sg_optimizer, stacked)
        per = len(state) // len(stacked)
        losses = []
        for r in range(self.runs):
            # a bias [R, 1, out] and its state: the run's [out]; a weight [R, out, in]: the run's [out, in]
            views = [t[r, 0] if i % 2 else t[r] for i, t in enumerate(stacked)]
            run_state = [s[r, 0] if (i // per) % 2 else s[r] for i, s in enumerate(state)]
            params = SGParams(tuple(views[0::2]), tuple(views[1::2]), None)
            predicted = ops.Prediction(start[r], prediction[r], [z[r] for z in hidden])
            losses.append(ops.sg_regression_(predicted, target[r], params, name, hyper, run_state,
                                             backend=self.backend))
        ops.advance(self.sg_optimizer, stacked)
        return torch.stack(losses)

    def _calibrate(self, prediction: Tensor, target: Tensor) -> None:
        """Fold this boundary's moments into the calibrated runs' running means (:func:`fold_calibration_`)."""
        if bool(self.calibrated.any()):
            fold_calibration_(self.calibration, prediction, target, self.calibration_decay, dims=(1, 2))

    def _rls_update(self, start: Tensor, target: Tensor) -> None:
        z = torch.cat([start, torch.ones_like(start[..., :1])], -1).double()
        self.rls_a.mul_(self.rls_decay).add_(torch.bmm(z.transpose(1, 2), z))
        self.rls_c.mul_(self.rls_decay).add_(torch.bmm(z.transpose(1, 2), target.double()))
        self.rls_count += 1
        if self.rls_count % self.rls_every:
            return
        dim = self.rls_a.shape[-1]
        ridge = self.rls_ridge * self.rls_a.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-12)
        solution = torch.linalg.solve(self.rls_a + ridge[:, None, None] * torch.eye(dim, dtype=torch.float64), self.rls_c)
        rls = self.rls_runs[:, None, None]
        self.sg_w.copy_(torch.where(rls, solution[:, :-1].transpose(1, 2).to(self.sg_w.dtype), self.sg_w))
        self.sg_b.copy_(torch.where(rls, solution[:, -1:].to(self.sg_b.dtype), self.sg_b))

    def alignment(self, state: tuple[Tensor, Tensor], future_loss) -> tuple[Tensor, Tensor]:
        """Per run: cosine and norm ratio between ``gain * M(s) / B`` (:meth:`sg_gain`) and :func:`dropped_gradient`, the gradient
        truncation drops at ``s``. Parameters' ``.grad`` are left alone."""
        dropped = dropped_gradient(state, future_loss)
        with torch.no_grad():
            gain = self.sg_gain().to(state[0].dtype)[:, None, None]
            synthetic = self.predict(torch.cat(state, -1).detach()) * gain / state[0].shape[1]
        a = alignment_of(synthetic, dropped, dims=(1, 2))
        return a.cosine, a.norm_ratio


def dropped_gradient(state: tuple[Tensor, Tensor], future_loss) -> Tensor:
    """``[R, B, 2H]``: the gradient of ``future_loss(state)`` (per-run losses ``[R]`` of the core run on from
    ``state`` over what follows, by the caller) with respect to ``(h, c)``, by full BPTT."""
    h = state[0].detach().requires_grad_()
    c = state[1].detach().requires_grad_()
    with torch.enable_grad():
        dh, dc = torch.autograd.grad(future_loss((h, c)).sum(), (h, c), allow_unused=True)
    return torch.cat([torch.zeros_like(h) if dh is None else dh, torch.zeros_like(c) if dc is None else dc], -1)


def masked_bce(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Per run ``[R]``: binary cross-entropy (nats) of the scored steps, summed over steps and outputs,
    mean over the streams. ``logits``/``targets`` ``[T, R, B, out]``, ``mask`` ``[T, R, B]``."""
    nats = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1)
    return (nats * mask).sum((0, 2)) / logits.shape[2]
