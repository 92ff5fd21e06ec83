"""The contract of the ``torch.ops.fastdni`` ops, written once: what every backend (reference, C++ CPU,
CUDA C++, Triton) agrees on besides the schemas (:mod:`fastdni.ops.schema`).

- activations: their names, the integer codes the compiled kernels switch on, which ones need the
  pre-activation to form ``act'``;
- optimizers: the ``hyper`` fields and the state tensors per parameter, and the checks of ``hyper``;
- the SG parameter layout: the order of an SG model's parameters (and of their optimizer state) in the
  ops' ``state`` list, with helpers to split and join it;
- the cDNI label check.

The C++ backends mirror it under the same names in ``csrc/common/dni_math.h`` (``Activation``,
``kLeakyReluSlope``) and ``csrc/common/op_args.h`` (``parse_activation``, ``needs_pre``,
``state_per_param``, ``parse_optimizer``, ``split_state``, ``check_labels``). Where to change what when
adding an activation or an optimizer: ``docs/ops.md``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")

# --- activations ------------------------------------------------------------------------------------

#: The activations of a DNI layer; a name's index is its code in the kernels (``Activation`` in dni_math.h).
ACTIVATIONS = ("identity", "relu", "tanh", "gelu", "leaky_relu")
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
#: Activations whose derivative cannot be formed from the output alone: ``dni_forward`` returns ``pre`` for them.
NEEDS_PRE = ("gelu",)
#: The negative slope of ``leaky_relu`` (``torch.nn.functional.leaky_relu``'s default), fixed by the contract.
LEAKY_RELU_SLOPE = 0.01


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


# --- optimizers -------------------------------------------------------------------------------------

#: The ``hyper`` list of each optimizer, field by field (layout and formulae: :mod:`fastdni.ops.optim`).
HYPER_FIELDS = {
    "adam": ("lr", "beta1", "beta2", "eps", "weight_decay", "decoupled", "step"),
    "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov", "first_step"),
}
#: The state tensors of each parameter, in the ops' order (SGD keeps none when momentum is 0).
STATE_FIELDS = {
    "adam": ("exp_avg", "exp_avg_sq"),
    "sgd": ("momentum_buffer",),
}


def check_hyper(optimizer: str, hyper: Sequence[float]) -> list[float]:
    """``hyper`` as floats, checked against :data:`HYPER_FIELDS`: the right count, ``lr >= 0``, Adam's
    ``step`` an integer from 1. Raises ``ValueError`` naming ``optimizer`` or ``hyper``."""
    if optimizer not in HYPER_FIELDS:
        raise ValueError(f"optimizer: expected one of {tuple(HYPER_FIELDS)}, got {optimizer!r}")
    fields = HYPER_FIELDS[optimizer]
    try:
        values = [float(v) for v in hyper]
    except (TypeError, ValueError):
        raise ValueError(f"hyper: expected a sequence of {len(fields)} floats ({', '.join(fields)}), got {hyper!r}") from None
    if len(values) != len(fields):
        raise ValueError(f"hyper: expected {len(fields)} values ({', '.join(fields)}) for {optimizer!r}, got {len(values)}")
    if optimizer == "adam" and not (values[6] >= 1 and values[6].is_integer()):
        raise ValueError(f"hyper: Adam's step must be an integer >= 1 (steps count from 1), got {hyper[6]!r}")
    if not values[0] >= 0:
        raise ValueError(f"hyper: lr must be >= 0, got {hyper[0]!r}")
    return values


def check_kernel_hyper(optimizer: str, hyper: Sequence[float]) -> list[float]:
    """:func:`check_hyper`, and what the fused GPU kernels' fp32 scalars further need: finite values, Adam's
    betas in ``[0, 1)``, SGD's nesterov with momentum and no dampening (``torch.optim`` enforces the same)."""
    values = check_hyper(optimizer, hyper)
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"hyper: expected finite values, got {values!r}")
    if optimizer == "adam":
        for name, beta in (("beta1", values[1]), ("beta2", values[2])):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"hyper: {name} must be in [0, 1), got {beta!r}")
    elif values[4] != 0.0 and (values[1] <= 0.0 or values[2] != 0.0):
        raise ValueError("hyper: nesterov requires momentum > 0 and dampening == 0")
    return values


def state_per_param(optimizer: str, hyper: Sequence[float]) -> int:
    """State tensors per parameter: adam 2 (exp_avg, exp_avg_sq), sgd 1 (momentum buffer) or 0 (momentum 0)."""
    if optimizer == "adam":
        return len(STATE_FIELDS["adam"])
    return len(STATE_FIELDS["sgd"]) if float(hyper[1]) != 0.0 else 0


def split_state(state: Sequence[T], count: int, per: int) -> list[list[T]]:
    """The ops' flat ``state`` list as one list per parameter (``count`` parameters, ``per`` tensors each)."""
    if len(state) != count * per:
        raise ValueError(f"state: expected {count * per} tensors for {count} parameters, got {len(state)}")
    return [list(state[i * per:(i + 1) * per]) for i in range(count)]


# --- the SG parameter layout ---------------------------------------------------------------------------

def join_sg_params(weights: Sequence[T], biases: Sequence[T], context_weight: Optional[T] = None) -> list[T]:
    """An SG model's parameters in the ops' order: ``W_1, b_1, ..., W_L, b_L`` then ``U`` (cDNI)."""
    out = [t for pair in zip(weights, biases) for t in pair]
    if context_weight is not None:
        out.append(context_weight)
    return out


def split_sg_params(params: Sequence[T], num_layers: int) -> tuple[list[T], list[T], Optional[T]]:
    """``(weights, biases, context_weight)`` from a list in :func:`join_sg_params`'s order."""
    layers = list(params[:2 * num_layers])
    tail = list(params[2 * num_layers:])
    if len(tail) > 1:
        raise ValueError(f"params: expected {2 * num_layers} or {2 * num_layers + 1} entries, got {len(params)}")
    return layers[0::2], layers[1::2], tail[0] if tail else None


# --- cDNI labels --------------------------------------------------------------------------------------

LABEL_DTYPES = (torch.int32, torch.int64)


def check_label_range(name: str, labels: Tensor, classes: int) -> None:
    """Labels index a row gather of ``U``: every value in ``[0, classes)``. One device sync (one transfer of
    ``(min, max)``); the C++ backends check the same with the same message and the same ValueError
    (``check_labels``, op_args.h). Each op's call path checks once: the backend that runs, not the wrapper."""
    if labels.numel():
        low, high = torch.stack(torch.aminmax(labels)).tolist()
        if low < 0 or high >= classes:
            raise ValueError(f"{name}: labels must lie in [0, {classes}), got values in [{low}, {high}]")
