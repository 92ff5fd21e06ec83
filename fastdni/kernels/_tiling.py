"""Autotune configurations shared by the Triton GEMM kernels."""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

#: Under TRITON_INTERPRET=1 (the CPU checks) kernels run on numpy and cannot autotune over more than one config.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


#: torch dtype -> the names fastdni/kernels/aot.py uses.
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def gemm_configs(keys: Sequence[str], shapes: Sequence[tuple[int, ...]], group_key: Optional[str] = None,
                 fp32_shapes: Sequence[tuple[int, ...]] = ()) -> list[triton.Config]:
    """One config per ``(*block sizes for keys, num_warps[, num_stages])``; interpreted, a single one with
    32-wide blocks: fast, and still several tiles with a ragged edge in every dimension of an odd test shape.

    With ``fp32_shapes``, those configs serve fp32 operands and ``shapes`` 16-bit ones (:func:`for_dtype`):
    IEEE fp32 has no tensor-core path, ``tl.dot`` runs on FMAs with both operand tiles in registers, so fp32
    needs fewer elements per thread and a shorter reduction block than bf16/fp16 before it spills."""
    group = {group_key: 8} if group_key else {}  # grouped program order: tiles sharing an operand run together
    if INTERPRETED:
        return [triton.Config({**{k: 32 for k in keys}, **group}, num_warps=4, num_stages=1)]

    def build(shape, dtypes):
        config = triton.Config({**dict(zip(keys, shape[: len(keys)])), **group}, num_warps=shape[len(keys)],
                               **({"num_stages": shape[len(keys) + 1]} if len(shape) > len(keys) + 1 else {}))
        config.dtypes = dtypes  # None: any dtype
        return config

    if not fp32_shapes:
        return [build(shape, None) for shape in shapes]
    return [build(shape, ("bf16", "fp16")) for shape in shapes] + [build(shape, ("fp32",)) for shape in fp32_shapes]


def for_dtype(configs: Sequence[triton.Config], dtype: str) -> list[triton.Config]:
    """The configs that serve operands of ``dtype`` (``"fp32"``, ``"bf16"``, ``"fp16"``)."""
    return [c for c in configs if getattr(c, "dtypes", None) is None or dtype in c.dtypes]


def pruner(sizes: dict[str, str], dtype_arg: Optional[str] = None):
    """An ``early_config_prune`` keeping the configs of the dtype of tensor argument ``dtype_arg``
    (:func:`for_dtype`) and dropping those whose blocks exceed twice the (power-of-two rounded) problem size
    (``sizes``: block key -> size argument): they only add masked-out work and tuning time."""

    def prune(configs, named_args, **kwargs):
        if dtype_arg is not None:
            configs = for_dtype(configs, DTYPE_NAMES[named_args[dtype_arg].dtype])
        caps = {k: 2 * max(32, triton.next_power_of_2(named_args[arg])) for k, arg in sizes.items()}
        kept = [c for c in configs if all(c.kwargs[k] <= cap for k, cap in caps.items())]
        area = lambda c: 1 if not sizes else math.prod(c.kwargs[k] for k in sizes)  # noqa: E731
        return kept or [min(configs, key=area)]

    return {"early_config_prune": prune} if not INTERPRETED else None


@triton.jit
def grouped_tile(pid, ROWS, COLS, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    """``(row tile, column tile)`` of program ``pid`` in grouped order: ``GROUP`` consecutive row tiles share
    each column tile, so the operand block it reads stays in L2 while they run."""
    num_r = tl.cdiv(ROWS, BLOCK_R)
    num_c = tl.cdiv(COLS, BLOCK_C)
    per_group = GROUP * num_c
    first_r = (pid // per_group) * GROUP
    size = min(num_r - first_r, GROUP)
    return first_r + ((pid % per_group) % size), (pid % per_group) // size
