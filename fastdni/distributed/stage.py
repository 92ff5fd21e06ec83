"""One pipeline stage of a :class:`~fastdni.nn.DecoupledSequential`: a run of its blocks, the SG
model at the stage's output, and their optimizers; the math of one micro-batch, without transport."""
from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from ..nn import DecoupledSequential
from ..nn.decoupled import LossFunction, step_optimizer


class MicroBatchResult(NamedTuple):
    output: Tensor  #: the stage's output (detached), for the next stage
    input_grad: Optional[Tensor]  #: gradient target for the previous stage's SG (None at stage 0)
    loss: Optional[Tensor]  #: the task loss (last stage only)


class DecoupledStage:
    """Blocks ``[first, stop)`` of a decoupled model as one stage of a pipeline.

    :meth:`train_micro_batch` runs the blocks, pushes the synthetic gradient of the stage's output
    (or the true one at the last stage) back through them and steps their optimizers at once. The
    gradient that thereby reaches the stage's input is the target of the previous stage's SG:
    bootstrapped from this stage's SG, or true at the last stage. When the target for an output
    comes back from the next stage, :meth:`apply_target` regresses the SG model onto it, if it is
    at most ``max_staleness`` micro-batches old (older outputs are forgotten: their targets are
    counted as dropped).
    """

    def __init__(self, model: DecoupledSequential, first: int, stop: int, *, max_staleness: int, use_context: bool):
        if not isinstance(model, DecoupledSequential) or not model.has_synthetic_gradients:
            raise ValueError("model: expected a DecoupledSequential with synthetic gradients")
        if not 0 <= first < stop <= len(model.blocks):
            raise ValueError(f"first, stop: expected 0 <= first < stop <= {len(model.blocks)}, got {first}, {stop}")
        if max_staleness < 0:
            raise ValueError(f"max_staleness: expected >= 0, got {max_staleness}")
        self.first, self.stop = first, stop
        self.is_first, self.is_last = first == 0, stop == len(model.blocks)
        self.blocks = nn.Sequential(*model.blocks[first:stop])
        self.optimizers = [o for o in model.optimizers[first:stop] if o is not None]
        self.interface = None if self.is_last else model.interfaces[stop - 1]
        self.sg_optimizer = None if self.is_last else model.sg_optimizers[stop - 1]
        self.max_staleness, self.use_context = max_staleness, use_context
        self.steps = 0  #: micro-batches trained
        self.staleness: list[int] = []  #: staleness of every target applied since the last :meth:`pop_stats`
        self.dropped = 0  #: targets that arrived too late (or for an output never kept)
        self.sg_losses: list[float] = []
        self._pending: OrderedDict[int, tuple] = OrderedDict()  # micro-batch -> (output, context, step)

    def modules(self) -> nn.ModuleDict:
        parts = {"blocks": self.blocks}
        if self.interface is not None:
            parts["interface"] = self.interface
        return nn.ModuleDict(parts)

    def train_micro_batch(self, micro_batch: int, x: Tensor, labels: Tensor, loss_fn: LossFunction) -> MicroBatchResult:
        self.blocks.train()
        if not self.is_first:
            x = x.detach().requires_grad_()
        out = self.blocks(x)
        loss = None
        if self.is_last:
            loss = loss_fn(out, labels)
            loss.backward()
        else:
            # Through the DNI: the SG's prediction goes into the blocks now. The output (and context)
            # is kept for the regression of the SG model when the target comes back (apply_target).
            self.interface.train()
            context = labels if self.use_context else None
            self.interface(out, context)
            # Staleness counts the micro-batches this stage trains after this one.
            self._pending[micro_batch] = (out.detach(), context, self.steps + 1)
        for opt in self.optimizers:
            step_optimizer(opt)
        self.steps += 1
        self._forget_stale()
        input_grad = None if self.is_first else x.grad.detach()
        return MicroBatchResult(out.detach(), input_grad, None if loss is None else loss.detach())

    def _forget_stale(self) -> None:
        while self._pending and self.steps - next(iter(self._pending.values()))[-1] > self.max_staleness:
            self._pending.popitem(last=False)

    def apply_target(self, micro_batch: int, target: Tensor) -> bool:
        """Regress the SG onto ``target`` if its output is still kept; True if applied."""
        entry = self._pending.pop(micro_batch, None)
        if entry is None:
            self.dropped += 1
            return False
        output, context, produced_at = entry
        if target.shape != output.shape or target.dtype != output.dtype:
            raise ValueError(f"target: expected {output.dtype}{list(output.shape)} for micro-batch {micro_batch}, "
                             f"got {target.dtype}{list(target.shape)}")
        # The prediction is made again with the SG's *current* parameters: regressing the one made
        # when the output was produced would apply a gradient taken at stale parameters, and with a
        # delay of just two micro-batches that made cDNI on MNIST several times worse (docs/distributed.md).
        self.interface(output, context).backward(target)
        step_optimizer(self.sg_optimizer)
        self.staleness.append(self.steps - produced_at)
        self.sg_losses.append(float(self.interface.last_sg_loss))
        return True

    @torch.no_grad()
    def evaluate(self, x: Tensor) -> Tensor:
        self.blocks.eval()
        out = self.blocks(x)
        self.blocks.train()
        return out

    def state_dict(self) -> dict:
        return {
            "modules": self.modules().state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "sg_optimizer": None if self.sg_optimizer is None else self.sg_optimizer.state_dict(),
            "steps": self.steps,
            "blocks": (self.first, self.stop),
        }

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["blocks"]) != (self.first, self.stop):
            raise ValueError(f"state: saved for blocks {tuple(state['blocks'])}, this stage has {(self.first, self.stop)}")
        self.modules().load_state_dict(state["modules"])
        for opt, saved in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(saved)
        if self.sg_optimizer is not None:
            self.sg_optimizer.load_state_dict(state["sg_optimizer"])
        self.steps = int(state["steps"])
        self._pending.clear()  # targets in flight at save time are lost: as if dropped as stale


def stage_bounds(num_blocks: int, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous runs of blocks, as equal in count as possible, one per stage."""
    if not 1 <= num_stages <= num_blocks:
        raise ValueError(f"num_stages: expected 1..{num_blocks} (the number of blocks), got {num_stages}")
    base, extra = divmod(num_blocks, num_stages)
    bounds, start = [], 0
    for k in range(num_stages):
        stop = start + base + (1 if k < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def split_stages(model: DecoupledSequential, num_stages: int, *, max_staleness: int = 8,
                 use_context: bool = False, bounds: Optional[Sequence[tuple[int, int]]] = None) -> list[DecoupledStage]:
    """The stages of ``model`` (all of them; each rank keeps its own): ``bounds`` or :func:`stage_bounds`. The stages
    regress each SG onto what the next stage sends back, the bootstrapped target: ``model.sg_targets`` must say so."""
    if getattr(model, "sg_targets", "bootstrap") != "bootstrap":
        raise ValueError(f"model: its sg_targets is {model.sg_targets!r}; the stages exchange bootstrapped targets "
                         "(build it with sg_targets='bootstrap')")
    bounds = list(bounds) if bounds is not None else stage_bounds(len(model.blocks), num_stages)
    return [DecoupledStage(model, a, b, max_staleness=max_staleness, use_context=use_context) for a, b in bounds]
