"""A training loop for :class:`fastdni.nn.DecoupledSequential` with evaluation, logs and resume.

Batches are a pure function of ``(seed, step)`` (a fresh permutation per epoch), so a run
resumed from a checkpoint sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..nn import DecoupledSequential
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint

LOG_FIELDS = ("step", "train_loss", "sg_loss", "test_error", "train_seconds")


class BatchOrder:
    """Indices of the batch of a given step: epoch ``e`` shuffles with seed ``seed + e``; the last
    incomplete batch of an epoch is dropped."""

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if batch_size < 1 or batch_size > num_examples:
            raise ValueError(f"batch_size: expected 1..{num_examples}, got {batch_size}")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.steps_per_epoch = num_examples // batch_size
        self._epoch, self._perm = -1, None

    def __call__(self, step: int) -> Tensor:
        epoch, offset = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_examples, generator=gen)
        return self._perm[offset * self.batch_size : (offset + 1) * self.batch_size]


@torch.no_grad()
def evaluate_error(model: torch.nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """Classification error in percent, in eval mode (BatchNorm running statistics)."""
    was_training = model.training
    model.eval()
    wrong = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size])
        wrong += int((logits.argmax(1) != labels[start : start + batch_size]).sum())
    model.train(was_training)
    return 100.0 * wrong / len(images)


class TrainResult(NamedTuple):
    history: list  #: one dict per evaluation, keys :data:`LOG_FIELDS`
    train_seconds: float  #: time in train steps only (no evaluation, no checkpoints)
    steps: int


def train(
    model: DecoupledSequential,
    train_data: tuple[Tensor, Tensor],
    test_data: tuple[Tensor, Tensor],
    *,
    steps: int,
    batch_size: int,
    seed: int,
    eval_every: int,
    use_context: bool = False,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    log_path: Optional[Union[str, Path]] = None,
    checkpoint_path: Optional[Union[str, Path]] = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    run_config: Optional[dict] = None,
    lr_schedule: str = "constant",
    desc: str = "train",
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` for ``steps`` steps, evaluating every ``eval_every`` steps and at the end.

    With ``use_context`` the labels are passed as the cDNI context. ``checkpoint_every > 0``
    writes ``checkpoint_path`` that often and at the end; ``resume=True`` continues from it
    (it must have been written with the same ``run_config``). ``lr_schedule="cosine"`` scales
    every optimizer's learning rate by ``(1 + cos(pi * step / steps)) / 2``.
    """
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule: expected one of {tuple(LR_SCHEDULES)}, got {lr_schedule!r}")
    if steps < 0 or eval_every < 1:
        raise ValueError(f"steps/eval_every: expected steps >= 0 and eval_every >= 1, got {steps}, {eval_every}")
    if (checkpoint_every or resume) and checkpoint_path is None:
        raise ValueError("checkpoint_path: needed to save or resume checkpoints")
    images, labels = train_data
    order = BatchOrder(len(images), batch_size, seed)
    start, history, train_seconds = 0, [], 0.0
    if resume and Path(checkpoint_path).exists():
        start, history, train_seconds = _restore(model, load_checkpoint(checkpoint_path), run_config)
    if start > steps:
        raise CheckpointError(f"checkpoint: at step {start}, beyond the {steps} steps asked for")

    def checkpoint(step: int) -> None:
        save_checkpoint(checkpoint_path, {
            "step": step, "model": model.state_dict(), "optimizers": model.optimizer_state_dict(),
            "history": history, "train_seconds": train_seconds, "config": run_config or {},
        })

    bar = tqdm(total=steps, initial=start, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in range(start, steps):
        idx = order(step)
        x, y = images[idx], labels[idx]
        _set_lr_scale(model, LR_SCHEDULES[lr_schedule](step, steps))
        began = time.perf_counter()
        result = model.train_step(x, y, loss_fn, context=y if use_context else None)
        train_seconds += time.perf_counter() - began
        done = step + 1
        if done % eval_every == 0 or done == steps:
            sg = [float(loss) for loss in result.sg_losses if loss is not None]
            history.append({
                "step": done,
                "train_loss": float(result.loss),
                "sg_loss": sum(sg) / len(sg) if sg else float("nan"),
                "test_error": evaluate_error(model, *test_data),
                "train_seconds": train_seconds,
            })
            bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", test_err=f"{history[-1]['test_error']:.2f}%")
            if log_path is not None:
                write_log(log_path, history)
        if checkpoint_every and (done % checkpoint_every == 0 or done == steps):
            checkpoint(done)
        bar.update(1)
    bar.close()
    return TrainResult(history, train_seconds, steps)


LR_SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "constant": lambda step, steps: 1.0,
    "cosine": lambda step, steps: 0.5 * (1.0 + math.cos(math.pi * step / steps)),
}


def _set_lr_scale(model: DecoupledSequential, scale: float) -> None:
    """Every param group's lr becomes ``scale`` times its lr at the first step (kept as ``base_lr``,
    which optimizer state dicts, and so checkpoints, carry)."""
    for opt in (*model.optimizers, *model.sg_optimizers):
        if opt is not None:
            for group in opt.param_groups:
                group["lr"] = group.setdefault("base_lr", group["lr"]) * scale


def _restore(model: DecoupledSequential, state: dict, run_config: Optional[dict]) -> tuple[int, list, float]:
    if state.get("config", {}) != (run_config or {}):
        raise CheckpointError(
            f"checkpoint: written for a different run ({state.get('config')}), not {run_config}; "
            "use another output folder or drop --resume"
        )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:  # e.g. an fcn-bn checkpoint of DecoupledSequential, before fcn-bn ran on the fused ops
        raise CheckpointError(f"checkpoint: its model state does not fit this {type(model).__name__} "
                              f"({str(error).splitlines()[0]}); use another output folder or drop --resume") from None
    model.load_optimizer_state_dict(state["optimizers"])
    return state["step"], list(state["history"]), state["train_seconds"]


def write_log(path: Union[str, Path], history: list) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(history)
