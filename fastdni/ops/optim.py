"""The optimizer step the fused ops apply in place, and the bridge from ``torch.optim``.

An op takes ``optimizer`` (a name), ``hyper`` (a float list) and ``state`` (the optimizer's tensors for
each parameter, in the parameters' order):

=========  ===============================================================  ==========================
optimizer  hyper                                                            state per parameter
=========  ===============================================================  ==========================
"adam"     lr, beta1, beta2, eps, weight_decay, decoupled (0/1), step       exp_avg, exp_avg_sq
"sgd"      lr, momentum, dampening, weight_decay, nesterov (0/1),           momentum_buffer
           first_step (0/1)                                                 (none if momentum == 0)
=========  ===============================================================  ==========================

The fields and state counts are part of the op contract (:mod:`fastdni.contract`: ``HYPER_FIELDS``,
``STATE_FIELDS``). The formulae are those of :mod:`fastdni.reference.optim` (``torch.optim.Adam``/``AdamW``/``SGD``);
``step`` counts from 1 and ``first_step`` makes SGD's buffer start at the gradient, as torch's does.
:func:`fused_optimizer_args` reads them out of a ``torch.optim`` optimizer, so its ``state_dict`` stays
the single source of truth (checkpoints, switching backends, falling back to ``optimizer.step()``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..contract import HYPER_FIELDS, check_hyper, state_per_param
from ..reference.optim import adam_update, sgd_momentum_update

__all__ = ["HYPER_FIELDS", "state_per_param", "check_optimizer_args", "optimizer_step_", "fused_optimizer_args", "advance",
           "check_fusable_optimizer", "fusable_optimizer_key", "fused_step"]


def check_optimizer_args(optimizer: str, hyper: Sequence[float], state: Sequence[Tensor], params: Sequence[Tensor]) -> None:
    """``hyper`` (:func:`fastdni.contract.check_hyper`) and ``state``: one tensor like its parameter per state field."""
    check_hyper(optimizer, hyper)
    per = state_per_param(optimizer, hyper)
    if len(state) != len(params) * per:
        raise ValueError(f"state: expected {len(params) * per} tensors for {len(params)} parameters with {optimizer!r}, got {len(state)}")
    for i, t in enumerate(state):
        p = params[i // per]  # per >= 1 here: with no state the loop does not run
        if not isinstance(t, Tensor) or t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
            raise ValueError(f"state[{i}]: expected a tensor like its parameter ({tuple(p.shape)}, {p.dtype}, {p.device})")


def optimizer_step_(optimizer: str, hyper: Sequence[float], param: Tensor, grad: Tensor, state: Sequence[Tensor]) -> None:
    """The reference step, written back in place (the oracle of the backends' optimizer epilogues)."""
    with torch.no_grad():
        if optimizer == "adam":
            lr, beta1, beta2, eps, weight_decay, decoupled, step = hyper
            new = adam_update(
                param, grad, state[0], state[1], int(step), lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, decoupled_weight_decay=bool(decoupled),
            )
        else:
            lr, momentum, dampening, weight_decay, nesterov, first_step = hyper
            buffer = None if (momentum == 0 or first_step) else state[0]
            new = sgd_momentum_update(
                param, grad, buffer, lr=lr, momentum=momentum, dampening=dampening,
                weight_decay=weight_decay, nesterov=bool(nesterov),
            )
        for dst, src in zip((param, *state), new):
            if src is not None:
                dst.copy_(src)


_UNSUPPORTED_FLAGS = ("amsgrad", "maximize", "capturable", "differentiable")


def fused_optimizer_args(opt: torch.optim.Optimizer, params: Sequence[Tensor],
                         group: Optional[dict] = None) -> tuple[str, list[float], list[Tensor]]:
    """``(optimizer, hyper, state)`` for the next step of ``opt`` on ``params`` (all in one param group).

    Missing state is created as ``torch.optim`` would; call :func:`advance` after the op ran. ``group``: the param
    group :func:`check_fusable_optimizer` returned for ``params`` to a caller that keeps its verdict (see
    :func:`fusable_optimizer_key`); None: check here. The hyper-parameters are read from the group at every call.
    """
    if group is None:
        group = check_fusable_optimizer(opt, params)
    lr = float(group["lr"])
    if isinstance(opt, torch.optim.Adam):
        beta1, beta2 = (float(b) for b in group["betas"])
        decoupled = bool(group.get("decoupled_weight_decay", False)) or isinstance(opt, torch.optim.AdamW)
        state: list[Tensor] = []
        step = None
        for p in params:
            s = opt.state[p]
            if not s:
                s["step"] = torch.tensor(0.0)
                s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            step = float(s["step"]) + 1
            state += [s["exp_avg"], s["exp_avg_sq"]]
        hyper = [lr, beta1, beta2, float(group["eps"]), float(group["weight_decay"]), float(decoupled), step]
        return "adam", hyper, state
    # torch.optim.SGD: the only other kind check_fusable_optimizer admits
    momentum = float(group["momentum"])
    first = any(opt.state[p].get("momentum_buffer") is None for p in params)
    state = []
    if momentum != 0:
        for p in params:
            if opt.state[p].get("momentum_buffer") is None:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state.append(opt.state[p]["momentum_buffer"])
    hyper = [lr, momentum, float(group["dampening"]), float(group["weight_decay"]), float(group["nesterov"]), float(first)]
    return "sgd", hyper, state


def check_fusable_optimizer(opt: torch.optim.Optimizer, params: Sequence[Tensor]) -> dict:
    """The param group holding every one of ``params``, if the fused ops can step ``opt`` on them: Adam, AdamW or
    SGD, one param group, none of ``amsgrad``, ``maximize``, ``capturable``, ``differentiable``. Raises
    ``TypeError``/``ValueError`` naming ``optimizer`` otherwise; changes nothing."""
    if not isinstance(opt, (torch.optim.Adam, torch.optim.SGD)):
        raise TypeError(f"optimizer: the fused ops support torch.optim.Adam, AdamW and SGD, got {type(opt).__name__}")
    group = _group_of(opt, params)
    for flag in _UNSUPPORTED_FLAGS:
        if group.get(flag, False):
            raise ValueError(f"optimizer: {flag}=True is not supported by the fused ops")
    return group


def fusable_optimizer_key(opt: torch.optim.Optimizer) -> tuple[tuple, tuple]:
    """What :func:`check_fusable_optimizer`'s verdict on ``opt`` reads that a user can change between steps, for a
    caller that keeps the verdict: ``(objects, values)``, the first to compare by identity (the param groups and
    every parameter in them: ``add_param_group``, a group swapped, a parameter added, removed or replaced), the
    second by value (the optimizer's class, each group's size and its unsupported flags, e.g. ``amsgrad`` set)."""
    groups = opt.param_groups
    objects = (*groups, *(p for g in groups for p in g["params"]))
    values = (type(opt), *((len(g["params"]), *(g.get(f, False) for f in _UNSUPPORTED_FLAGS)) for g in groups))
    return objects, values


def fused_step(opt: torch.optim.Optimizer, params: Sequence[Tensor], op, *args, group: Optional[dict] = None, **kwargs):
    """``op(*args, optimizer_name, hyper, state, **kwargs)`` run as ``opt``'s step on ``params`` (an update op of
    :mod:`fastdni.ops`), then :func:`advance`; returns what ``op`` returns. ``group``: as in
    :func:`fused_optimizer_args` (None: checked here)."""
    result = op(*args, *fused_optimizer_args(opt, params, group), **kwargs)
    advance(opt, params)
    return result


def advance(opt: torch.optim.Optimizer, params: Sequence[Tensor]) -> None:
    """Count the step the fused op took (Adam's ``step``; SGD's buffers now exist)."""
    if isinstance(opt, torch.optim.Adam):
        for p in params:
            opt.state[p]["step"] += 1


def _group_of(opt: torch.optim.Optimizer, params: Sequence[Tensor]) -> dict:
    found: Optional[dict] = None
    for p in params:
        group = next((g for g in opt.param_groups if any(q is p for q in g["params"])), None)
        if group is None:
            raise ValueError("optimizer: a parameter of the fused step is not in this optimizer")
        if found is not None and group is not found:
            raise ValueError("optimizer: the parameters of one fused step must share one param group")
        found = group
    return found
