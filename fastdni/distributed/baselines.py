"""The baselines a decoupled pipeline is measured against, on the same blocks and the same split:
backprop in one process, and ``torch.distributed.pipelining``'s GPipe and 1F1B schedules.

Each steps its optimizers once per batch of ``micro_batches`` micro-batches (gradients summed over
them), the way those schedules train.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..train.loop import BatchOrder

SCHEDULES = ("gpipe", "1f1b")


def _mean_over_micro_batches(loss_fn: Callable, micro_batches: int) -> Callable:
    # The schedules sum the micro-batches' gradients; dividing each loss makes that the batch mean.
    return lambda output, target: loss_fn(output, target) / micro_batches


def train_backprop(model: nn.Module, optimizer: torch.optim.Optimizer, train_x: Tensor, train_y: Tensor, *,
                   steps: int, micro_batches: int, micro_batch_size: int, seed: int, loss_fn: Callable,
                   on_step: Callable[[int, float], None] = lambda step, seconds: None) -> float:
    """Backprop on one process with the same micro-batching; returns training seconds (hooks excluded)."""
    order = BatchOrder(len(train_x), micro_batches * micro_batch_size, seed)
    loss_fn = _mean_over_micro_batches(loss_fn, micro_batches)
    seconds = 0.0
    model.train()
    for step in range(steps):
        started = time.perf_counter()
        idx = order(step)
        for x, y in zip(train_x[idx].split(micro_batch_size), train_y[idx].split(micro_batch_size)):
            loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - started
        on_step(step + 1, seconds)
    return seconds


def train_schedule(schedule_name: str, stage_module: nn.Module, stage_index: int, num_stages: int,
                   optimizer: torch.optim.Optimizer, train_x: Tensor, train_y: Tensor, *, steps: int,
                   micro_batches: int, micro_batch_size: int, seed: int, loss_fn: Callable,
                   example_input: Tensor, on_step: Callable[[int, float], None] = lambda step, seconds: None) -> float:
    """This rank's stage under GPipe or 1F1B; returns this rank's training seconds (hooks excluded).
    All ranks draw the same batches (same seed); the first feeds the inputs, the last the targets."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    if schedule_name not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule_name!r}")
    schedule_cls = ScheduleGPipe if schedule_name == "gpipe" else Schedule1F1B
    stage = PipelineStage(stage_module, stage_index, num_stages, torch.device("cpu"), input_args=(example_input,))
    schedule = schedule_cls(stage, n_microbatches=micro_batches, loss_fn=_mean_over_micro_batches(loss_fn, micro_batches))
    order = BatchOrder(len(train_x), micro_batches * micro_batch_size, seed)
    is_first, is_last = stage_index == 0, stage_index == num_stages - 1
    seconds = 0.0
    stage_module.train()
    for step in range(steps):
        started = time.perf_counter()
        idx = order(step)
        args = (train_x[idx],) if is_first else ()
        kwargs = dict(target=train_y[idx], losses=[]) if is_last else {}
        schedule.step(*args, **kwargs)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - started
        on_step(step + 1, seconds)
    return seconds


def gather_state_dicts(module: nn.Module) -> list[dict]:
    """Every rank's ``module.state_dict()`` on every rank (collective)."""
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, module.state_dict())
    return states


def assemble(stage_modules: Sequence[nn.Module], states: Sequence[dict]) -> nn.Sequential:
    """The whole model from the stages' modules, loaded with each rank's state."""
    for module, state in zip(stage_modules, states, strict=True):
        module.load_state_dict(state)
    return nn.Sequential(*stage_modules)
