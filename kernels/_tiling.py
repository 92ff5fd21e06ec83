"""Autotune configurations shared by the Triton GEMM kernels."""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import triton
import triton.language as tl

#: Under TRITON_INTERPRET=1 (the CPU checks) kernels run on numpy and cannot autotune over more than one config.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def gemm_configs(keys: Sequence[str], shapes: Sequence[tuple[int, ...]], group_key: Optional[str] = None) -> list[triton.Config]:
    """One config per ``(*block sizes for keys, num_warps[, num_stages])``; interpreted, a single one with
    32-wide blocks: fast, and still several tiles with a ragged edge in every dimension of an odd test shape."""
    group = {group_key: 8} if group_key else {}  # grouped program order: tiles sharing an operand run together
    if INTERPRETED:
        return [triton.Config({**{k: 32 for k in keys}, **group}, num_warps=4, num_stages=1)]
    return [
        triton.Config({**dict(zip(keys, shape[: len(keys)])), **group}, num_warps=shape[len(keys)],
                      **({"num_stages": shape[len(keys) + 1]} if len(shape) > len(keys) + 1 else {}))
        for shape in shapes
    ]


def pruner(sizes: dict[str, str]):
    """An ``early_config_prune`` dropping configs whose blocks exceed twice the (power-of-two rounded) problem
    size (``sizes``: block key -> size argument): they only add masked-out work and tuning time."""

    def prune(configs, named_args, **kwargs):
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
