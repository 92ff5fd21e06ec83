"""Argument checks shared by the kernel launchers: every error names the argument and what was expected,
and is raised before anything is launched or written."""
from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float(name: str, t: object, ndim: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, bfloat16 or float16, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(t.shape)}")
    return t


def check_like(name: str, t: Tensor, like: Tensor, like_name: str, *, dtype: bool = True) -> None:
    if t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} (that of {like_name}), got {t.device}")
    if dtype and t.dtype != like.dtype:
        raise TypeError(f"{name}: expected dtype {like.dtype} (that of {like_name}), got {t.dtype}")


def check_updated(name: str, t: object, shape: tuple, like: Tensor, like_name: str) -> Tensor:
    """A tensor updated in place: float, the given shape, the device (and dtype) of ``like``, contiguous
    (a hidden ``.contiguous()`` copy would silently drop the update)."""
    t = check_float(name, t, len(shape))
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    check_like(name, t, like, like_name)
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (it is updated in place), got strides {t.stride()}")
    return t


def check_device(name: str, t: Tensor, interpreted: bool) -> None:
    if not interpreted and t.device.type != "cuda":
        raise ValueError(f"{name}: the Triton kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1), "
                         f"got device {t.device}")
