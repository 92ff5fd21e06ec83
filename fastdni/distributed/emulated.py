"""Emulated compute cost: a block that also sleeps in its forward and its backward.

On a machine with fewer cores than stages, real compute of K ranks is serialised and no schedule
can show its overlap. Sleeping releases the core, so with a fixed sleep per micro-batch every stage
costs the same wall time under every schedule and throughput ratios measure the schedules alone.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor, nn


class _SleepInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, seconds: float) -> Tensor:
        ctx.seconds = seconds
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        time.sleep(ctx.seconds)
        return grad, None


class EmulatedCost(nn.Module):
    """``block`` plus ``forward_seconds`` of sleep per training forward and ``backward_seconds`` per
    backward (none in eval mode, so evaluation is not slowed)."""

    def __init__(self, block: nn.Module, forward_seconds: float, backward_seconds: float):
        super().__init__()
        if forward_seconds < 0 or backward_seconds < 0:
            raise ValueError(f"forward_seconds, backward_seconds: expected >= 0, got {forward_seconds}, {backward_seconds}")
        self.block, self.forward_seconds, self.backward_seconds = block, forward_seconds, backward_seconds

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self.block(x)
        time.sleep(self.forward_seconds)
        out = self.block(x)
        return _SleepInBackward.apply(out, self.backward_seconds) if out.requires_grad else out

    def extra_repr(self) -> str:
        return f"forward_seconds={self.forward_seconds}, backward_seconds={self.backward_seconds}"
