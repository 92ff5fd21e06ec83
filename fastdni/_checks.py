"""Argument checks shared by the reference, the modules and the op wrappers.

Every failure names the argument and what was expected, so a user sees
``weight: expected shape (256, 784), got (784, 256)`` instead of a matmul error
from deep inside a step.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .contract import LABEL_DTYPES, check_label_range

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: Optional[int] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    like: Optional[Tensor] = None,
    floating: bool = True,
) -> Tensor:
    """Check that ``value`` is a tensor of the expected rank/shape, matching ``like``'s dtype and device.

    ``shape`` entries that are ``None`` are not checked.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(value.shape)}")
    if shape is not None:
        for got, want in zip(value.shape, shape):
            if want is not None and got != want:
                shown = ", ".join("*" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "")
                raise ValueError(f"{name}: expected shape ({shown}), got {tuple(value.shape)}")
    if like is not None:
        if value.device != like.device:
            raise ValueError(f"{name}: expected device {like.device}, got {value.device}")
        if floating and value.dtype != like.dtype:
            raise TypeError(f"{name}: expected dtype {like.dtype}, got {value.dtype}")
    return value


def check_rows(name: str, batch: Tensor) -> None:
    """A batch ``[B, ...]`` that an op learns from needs ``B >= 1``: with none, a mean over the batch is 0/0 and
    an optimizer step on a zero gradient is not a no-op (Adam's momentum still moves). Every backend rejects it
    with this message (the C++ ops with the same one, ``csrc/common/op_args.h``)."""
    if batch.shape[0] < 1:
        raise ValueError(f"{name}: expected a batch of at least 1 row, got shape {tuple(batch.shape)}")


def check_context(context: object, *, batch: int, features: int, like: Tensor, label_range: bool = True) -> Tensor:
    """A cDNI context: class labels (int tensor ``[batch]``) or features (float ``[batch, features]``).
    ``label_range=False`` leaves the labels' range (a device sync) to the op that reads them: every backend checks it."""
    if not isinstance(context, Tensor):
        raise TypeError(f"context: expected a torch.Tensor, got {type(context).__name__}")
    if context.device != like.device:
        raise ValueError(f"context: expected device {like.device}, got {context.device}")
    if not context.dtype.is_floating_point:
        # Labels index a row gather, which takes int32/int64 only (a uint8 index would act as a mask).
        if context.dtype not in LABEL_DTYPES or context.dim() != 1 or context.shape[0] != batch:
            raise ValueError(
                f"context: integer labels must be int32/int64 of shape ({batch},), got {tuple(context.shape)} "
                f"of dtype {context.dtype}"
            )
        if label_range:
            check_label_range("context", context, features)
        return context
    return check_tensor("context", context, shape=(batch, features), like=like)


def check_int(name: str, value: object, minimum: int) -> int:
    """An int (not a bool) of at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    if not (value > 0 or (allow_zero and value == 0)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected a number {bound}, got {value!r}")
    return value


def check_context_presence(context: object, conditioned: bool) -> None:
    """A cDNI SG model needs a context; an unconditioned one must not be given one."""
    if context is None and conditioned:
        raise ValueError("context: the SG model is conditioned on a context (cDNI) but none was given")
    if context is not None and not conditioned:
        raise ValueError("context: the SG model takes no context (context_features=0), but one was given")
